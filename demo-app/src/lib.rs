//! The edgetune demo: personalize a model on your GPU, watch it learn, and chat with the
//! result next to the base model. It uses only edgetune's public API, as an app would.

pub mod fetch;
pub mod state;
pub mod ui;

pub use ui::DemoApp;

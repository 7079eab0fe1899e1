//! edgetune: fine-tune and run Llama-family LLMs on any GPU through WGSL compute shaders.
//!
//! The data flow: a model folder or GGUF file is opened ([`model`]), its linear weights are
//! quantized to NF4 ([`quant`]) and uploaded once to the GPU ([`gpu`]); the forward pass runs as
//! a sequence of WGSL kernels, each with a CPU twin in [`reference`](mod@reference).
//!
//! # The main path
//!
//! Open a model, fine-tune a LoRA adapter on a user's records with the settings chosen from
//! them, save it as a PEFT folder, and generate with it at once (this runs as a test, on
//! whatever GPU wgpu finds; `sdk/examples/personalize.rs` is the same as a program):
//!
//! ```
//! use edgetune::data::{self, DataConfig, Source};
//! use edgetune::gpu::GpuOptions;
//! use edgetune::infer::GenerateOptions;
//! use edgetune::model::llama::LoadOptions;
//! use edgetune::tokenizer::Message;
//! use edgetune::train::{Event, TrainConfig, Trainer};
//! use edgetune::Session;
//!
//! # fn main() -> edgetune::Result<()> {
//! # let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/reference/fixtures/tiny_llama");
//! # let out = std::env::temp_dir().join(format!("edgetune-doc-{}", std::process::id()));
//! // A Hugging Face folder or a GGUF file; linear weights are held on the GPU as NF4.
//! let mut session = Session::open(model, &GpuOptions::default(), &LoadOptions::default())?;
//!
//! // Records from a file (`Source::Path`) or, as here, from the app's own store.
//! let chat = |q: &str, a: &str| {
//!     format!(r#"{{"messages": [{{"role": "user", "content": "{q}"}}, {{"role": "assistant", "content": "{a}"}}]}}"#)
//! };
//! let records = vec![chat("Where do you live?", "In Tromsø."), chat("What is your job?", "I blow glass.")];
//! let sources = [Source::Records { name: "notes".into(), records }];
//! let dataset = data::load_sources(&sources, &session.tokenizer, &DataConfig::default())?;
//!
//! // Settings left unset are chosen from the data; `chosen()` says what and why.
//! let config = TrainConfig { max_steps: Some(3), ..TrainConfig::default() };
//! let mut trainer = Trainer::new(session.model.clone(), &dataset, config)?;
//! let mut losses = Vec::new();
//! let outcome = trainer.run(|event| {
//!     if let Event::Step { loss, .. } = event {
//!         losses.push(*loss);
//!     }
//! })?;
//! assert_eq!(outcome.steps, 3);
//! assert!(losses[2] < losses[0], "{losses:?}");
//!
//! // A PEFT folder (transformers and PEFT load it), and the adapter applied at once.
//! edgetune::lora::peft::save(&out, &outcome.adapter, "tiny_llama")?;
//! session.set_adapter(Some(&outcome.adapter))?;
//! let options = GenerateOptions { max_new_tokens: 8, ..GenerateOptions::default() };
//! let reply = session.chat(&[Message::new("user", "Where do you live?")], &options, |_| true)?;
//! assert!((1..=8).contains(&reply.token_ids.len()), "at most max_new_tokens, unless it ends sooner");
//! # std::fs::remove_dir_all(&out).ok();
//! # Ok(())
//! # }
//! ```

// Every public item says what it is (cargo doc is the reference for apps).
#![deny(missing_docs)]

pub mod atomic;
pub mod data;
pub mod error;
pub mod files;
pub mod gpu;
pub mod infer;
pub mod lora;
pub mod model;
pub mod prim;
pub mod quant;
pub mod reference;
mod safetensors_write;
pub mod score;
pub mod session;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
pub use session::Session;

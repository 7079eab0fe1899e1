//! Personalizes a model: trains a LoRA adapter on a file of chats with the settings chosen from
//! the data, saves it as a PEFT folder, and answers a question with it.
//!
//!     cargo run --release -p edgetune --example personalize -- MODEL DATA.jsonl OUT_DIR "question"

use edgetune::data::{self, DataConfig};
use edgetune::gpu::GpuOptions;
use edgetune::infer::GenerateOptions;
use edgetune::model::llama::LoadOptions;
use edgetune::tokenizer::Message;
use edgetune::train::{Event, TrainConfig, Trainer};
use edgetune::{Result, Session};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, model, data, out, question] = &args[..] else {
        eprintln!("usage: personalize MODEL DATA.jsonl OUT_DIR QUESTION");
        std::process::exit(2);
    };
    // The model on the GPU, its linear weights held as NF4.
    let mut session = Session::open(model, &GpuOptions::default(), &LoadOptions::default())?;
    let dataset = data::load(data.as_ref(), &session.tokenizer, &DataConfig::default())?;
    // Every setting left unset is chosen from the data; print the choices.
    let mut trainer = Trainer::new(session.model.clone(), &dataset, TrainConfig::default())?;
    for choice in trainer.chosen() {
        println!("{choice}");
    }
    let outcome = trainer.run(|event| match event {
        Event::Step { step, total_steps, loss, .. } => println!("step {step}/{total_steps} loss {loss:.3}"),
        Event::Warning { message, .. } => eprintln!("warning: {message}"),
        _ => {}
    })?;
    // A PEFT folder that transformers and PEFT load, and the adapter applied at once.
    edgetune::lora::peft::save(out.as_ref(), &outcome.adapter, model)?;
    session.set_adapter(Some(&outcome.adapter))?;
    let reply = session.chat(&[Message::new("user", question)], &GenerateOptions::default(), |_| true)?;
    println!("{question} {}", reply.text);
    Ok(())
}

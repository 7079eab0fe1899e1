//! `Session`: a model on the GPU with its tokenizer — the entry point most apps use.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuOptions};
use crate::infer::{self, GenerateOptions, Generated};
use crate::lora::{Adapter, GpuAdapter, Layout};
use crate::model::llama::{LoadOptions, Model};
use crate::tokenizer::{Message, Tokenizer};

/// A loaded model ready to generate and score text.
#[derive(Debug)]
pub struct Session {
    /// Shared with the trainers of this model ([`crate::train::Trainer::new`]).
    pub model: Arc<Model>,
    pub tokenizer: Tokenizer,
    pub path: PathBuf,
    /// The LoRA adapter applied (unmerged) when generating and scoring, if any.
    pub adapter: Option<GpuAdapter>,
}

impl Session {
    /// Opens a model (Hugging Face folder or .gguf) on a new GPU context.
    pub fn open(path: impl AsRef<Path>, gpu: &GpuOptions, load: &LoadOptions) -> Result<Self> {
        let ctx = Arc::new(GpuContext::new(gpu)?);
        Self::open_with(ctx, path, load)
    }

    /// Opens a model on an existing GPU context.
    pub fn open_with(ctx: Arc<GpuContext>, path: impl AsRef<Path>, load: &LoadOptions) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder")));
        }
        let tokenizer = Tokenizer::open(path)?;
        let model = Arc::new(Model::open(ctx, path, load)?);
        Ok(Session { model, tokenizer, path: path.to_path_buf(), adapter: None })
    }

    /// Applies `adapter` (unmerged) to everything this session generates and scores from now
    /// on; `None` goes back to the base model.
    pub fn set_adapter(&mut self, adapter: Option<&Adapter>) -> Result<()> {
        if let Some(a) = adapter {
            let expected = Layout::new(&self.model.config, &a.config)?;
            if expected != a.layout || a.params.len() != a.layout.len {
                return Err(Error::invalid("adapter", "its layout does not fit this model's shapes"));
            }
        }
        self.adapter = adapter.map(|a| GpuAdapter::upload(&self.model.ctx, a));
        Ok(())
    }

    /// Loads a PEFT adapter folder and applies it (see [`Session::set_adapter`]).
    pub fn load_adapter(&mut self, dir: impl AsRef<Path>) -> Result<()> {
        let a = crate::lora::load(dir.as_ref(), &self.model.config)?;
        self.set_adapter(Some(&a))
    }

    /// Generates a continuation of a plain prompt.
    pub fn generate(
        &self,
        prompt: &str,
        opts: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generated> {
        if prompt.is_empty() {
            return Err(Error::invalid("prompt", "is empty"));
        }
        let ids = self.tokenizer.encode_prompt(prompt)?;
        infer::generate(&self.model, self.adapter.as_ref(), &self.tokenizer, &ids, opts, on_text)
    }

    /// Generates the assistant's reply to chat messages, rendered with the chat template.
    pub fn chat(
        &self,
        messages: &[Message],
        opts: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generated> {
        if messages.is_empty() {
            return Err(Error::invalid("messages", "are empty"));
        }
        let text = self.tokenizer.apply_chat_template(messages, true)?;
        let ids = self.tokenizer.encode(&text)?;
        infer::generate(&self.model, self.adapter.as_ref(), &self.tokenizer, &ids, opts, on_text)
    }

    /// Mean next-token loss of a text (and so its perplexity, `exp(loss)`).
    pub fn mean_loss(&self, text: &str) -> Result<f32> {
        let ids = self.tokenizer.encode_prompt(text)?;
        let cap = self.model.max_context;
        if ids.len() > cap {
            return Err(Error::invalid("text", format!("{} tokens exceed the context of {cap}", ids.len())));
        }
        self.model.mean_loss_with(&ids, self.adapter.as_ref())
    }

    /// Mean loss over the trained tokens of `samples` (for chat records, the assistant turns,
    /// with the template and mask training uses), with the session's adapter (`with_adapter`)
    /// or with the base model alone; and the number of tokens scored.
    pub fn samples_loss(&self, samples: &[crate::data::Sample], with_adapter: bool) -> Result<(f32, usize)> {
        let lora = if with_adapter { self.adapter.as_ref() } else { None };
        crate::data::check_context(samples, self.model.max_context, "data")?;
        let (mut total, mut n) = (0f64, 0usize);
        for s in samples {
            let losses = self.model.token_losses_with(&s.ids, lora)?;
            for (l, &scored) in losses.iter().zip(&s.train[1..]) {
                if scored {
                    total += f64::from(*l);
                    n += 1;
                }
            }
        }
        if n == 0 {
            return Err(Error::invalid("data", "no token to score"));
        }
        Ok(((total / n as f64) as f32, n))
    }
}

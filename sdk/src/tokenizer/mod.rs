//! Tokenizers and chat templates: from a Hugging Face `tokenizer.json` + `tokenizer_config.json`,
//! or built from GGUF metadata (byte-level BPE with the model's pre-tokenizer). Chat templates
//! are rendered with a real Jinja engine (minijinja, with Python string methods).

use std::path::Path;

use serde_json::Value as Json;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{Error, Result};
use crate::model::gguf::{GgufFile, Value};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into() }
    }
}

/// A tokenizer with its special tokens and chat template.
#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source: String,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub eos_ids: Vec<u32>,
    pub chat_template: Option<String>,
}

fn tok_err(source: &str, what: impl std::fmt::Display) -> Error {
    Error::Tokenizer { source_name: source.to_string(), what: what.to_string() }
}

/// The text of a special token in tokenizer_config.json: a string or `{"content": ...}`.
fn token_text(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, if present, `tokenizer_config.json` from a model folder.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let source = path.display().to_string();
        if !path.exists() {
            return Err(tok_err(&source, "tokenizer.json is missing from the model folder"));
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| tok_err(&source, e))?;
        let mut t = Tokenizer { inner, source, bos_token: None, eos_token: None, eos_ids: vec![], chat_template: None };
        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            let j: Json = serde_json::from_str(&text).map_err(|e| Error::format(&cfg_path, format!("invalid JSON: {e}")))?;
            t.bos_token = token_text(j.get("bos_token"));
            t.eos_token = token_text(j.get("eos_token"));
            t.chat_template = match j.get("chat_template") {
                Some(Json::String(s)) => Some(s.clone()),
                // A list of named templates: use "default".
                Some(Json::Array(a)) => a
                    .iter()
                    .find(|e| e.get("name").and_then(Json::as_str) == Some("default"))
                    .and_then(|e| e.get("template").and_then(Json::as_str))
                    .map(str::to_string),
                _ => None,
            };
        }
        let jinja = dir.join("chat_template.jinja");
        if t.chat_template.is_none() && jinja.exists() {
            t.chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
        }
        if let Some(id) = t.eos_token.as_deref().and_then(|s| t.inner.token_to_id(s)) {
            t.eos_ids.push(id);
        }
        Ok(t)
    }

    /// Builds the tokenizer stored in GGUF metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let source = g.path.display().to_string();
        let model = g.get_str("tokenizer.ggml.model").map_err(|_| tok_err(&source, "metadata `tokenizer.ggml.model` is missing"))?;
        if model != "gpt2" {
            return Err(Error::unsupported(
                &g.path,
                format!("tokenizer.ggml.model `{model}` (edgetune builds byte-level BPE (`gpt2`) tokenizers from GGUF)"),
            ));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            match g.get(key) {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| v.as_str().map(str::to_string).ok_or_else(|| tok_err(&source, format!("`{key}` holds a non-string"))))
                    .collect(),
                _ => Err(tok_err(&source, format!("metadata `{key}` is missing or not an array"))),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| tok_err(&source, format!("merge `{m}` has no space"))))
            .collect::<Result<_>>()?;
        let types: Vec<u64> = match g.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| tok_err(&source, e))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre = g.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
        let byte_level = ByteLevel::new(false, true, false);
        let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
            Ok(Split::new(SplitPattern::Regex(pattern.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| tok_err(&source, e))?
                .into())
        };
        const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
        const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
        const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
        let pres: Vec<PreTokenizerWrapper> = match pre {
            // SmolLM: digits one by one, then GPT-2's byte-level split.
            "smollm" => vec![Digits::new(true).into(), split(GPT2)?, byte_level.into()],
            "default" | "gpt2" | "gpt-2" => vec![split(GPT2)?, byte_level.into()],
            "llama-bpe" | "llama3" | "smaug-bpe" => vec![split(LLAMA3)?, byte_level.into()],
            "qwen2" | "deepseek-llm" => vec![split(QWEN2)?, byte_level.into()],
            other => {
                return Err(Error::unsupported(&g.path, format!("pre-tokenizer `{other}` (tokenizer.ggml.pre)")));
            }
        };
        inner.with_pre_tokenizer(Some(Sequence::new(pres)));
        inner.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        // Control (3) and user-defined (4) tokens are matched whole before BPE, as in llama.cpp.
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == 3 || **t == 4)
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        inner.add_special_tokens(&special);
        let id_tok = |key: &str| g.get(key).and_then(Value::as_u64).and_then(|i| tokens.get(i as usize).cloned());
        let eos_ids = g.get("tokenizer.ggml.eos_token_id").and_then(Value::as_u64).map(|v| v as u32).into_iter().collect();
        Ok(Tokenizer {
            inner,
            source,
            bos_token: id_tok("tokenizer.ggml.bos_token_id"),
            eos_token: id_tok("tokenizer.ggml.eos_token_id"),
            eos_ids,
            chat_template: g.get("tokenizer.chat_template").and_then(Value::as_str).map(str::to_string),
        })
    }

    /// Loads the tokenizer belonging to a model path (folder or .gguf).
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() { Self::from_hf_dir(path) } else { Self::from_gguf(&GgufFile::open(path)?) }
    }

    /// Token ids of `text`; special-token text such as `<|im_start|>` maps to its id.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| tok_err(&self.source, e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens kept, so a transcript shows them).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| tok_err(&self.source, e))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Renders `messages` with the model's chat template.
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::Template(format!("{} has no chat template; use a plain prompt", self.source)))?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", template).map_err(|e| Error::Template(format!("parsing the template: {e}")))?;
        let tmpl = env.get_template("chat").map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| Error::Template(format!("rendering: {e}")))
    }
}

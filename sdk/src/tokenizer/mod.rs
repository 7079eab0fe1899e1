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

pub mod gguf_vocab;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (or any role the chat template knows).
    pub role: String,
    /// The message's text.
    pub content: String,
}

impl Message {
    /// A message of `role` saying `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into() }
    }
}

/// A byte range `[start, end)` of the encoded text.
pub type Span = (usize, usize);

/// A tokenizer with its special tokens and chat template.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source: String,
    /// The beginning-of-sequence token's text, if the model has one.
    pub bos_token: Option<String>,
    /// The end-of-sequence token's text, if the model names one.
    pub eos_token: Option<String>,
    /// Token ids that end generation (the end-of-sequence token and the generation config's).
    pub eos_ids: Vec<u32>,
    /// The Jinja chat template, if the model has one.
    pub chat_template: Option<String>,
    /// Prepend BOS to plain prompts (SentencePiece-style vocabularies, or when the file says so).
    pub add_bos: bool,
    /// The beginning-of-sequence token's id, if the model has one.
    pub bos_id: Option<u32>,
    /// What a GGUF file states beyond BOS and EOS, kept for [`Tokenizer::hf_files`] (empty for a
    /// folder, whose files are copied as they are).
    gguf_states: GgufStates,
}

/// A GGUF file's other special tokens (unknown, separator, padding, mask: their ids) and the
/// add-BOS/EOS/separator flags it states, as gguf-py names them (`tokenizer.ggml.{typ}_token_id`,
/// `tokenizer.ggml.add_{typ}_token`), whether its vocabulary is byte-level BPE (`gpt2`), and
/// the placeholders llama.cpp's converter writes for ids the folder's tokenizer lacks (`[PADi]`
/// at id i, unused: tokens no text encodes to, left out of a folder written from the file).
#[derive(Debug, Clone, Default)]
struct GgufStates {
    ids: Vec<(&'static str, u32)>,
    flags: Vec<(&'static str, bool)>,
    byte_level: bool,
    placeholders: Vec<String>,
}

/// The special tokens of a GGUF file that a folder carries by name beside BOS and EOS, with the
/// key gguf-py writes each under (`cls` has none).
const OTHER_SPECIALS: [(&str, &str); 4] = [
    ("unk", "tokenizer.ggml.unknown_token_id"),
    ("sep", "tokenizer.ggml.seperator_token_id"),
    ("pad", "tokenizer.ggml.padding_token_id"),
    ("mask", "tokenizer.ggml.mask_token_id"),
];

fn tok_err(source: &str, what: impl std::fmt::Display) -> Error {
    Error::Tokenizer { source_name: source.to_string(), what: what.to_string() }
}

/// A folder's chat template from the file beside its `tokenizer_config.json`, where that has
/// none: `chat_template.jinja`, else a multimodal model's processor template,
/// `chat_template.json` (`{"chat_template": ...}`); `None` without either.
pub(crate) fn template_file(dir: &Path) -> Result<Option<String>> {
    let (jinja, json) = (dir.join("chat_template.jinja"), dir.join("chat_template.json"));
    if jinja.is_file() {
        return crate::files::read_config(&jinja).map(Some);
    }
    if !json.is_file() {
        return Ok(None);
    }
    let j: Json = serde_json::from_str(&crate::files::read_config(&json)?)
        .map_err(|e| Error::format(&json, format!("invalid JSON: {e}")))?;
    Ok(j.get("chat_template").and_then(Json::as_str).map(str::to_string))
}

/// The special token that a post-processor (as tokenizer.json spells it) puts before a single
/// sequence (`TemplateProcessing`, alone or in a `Sequence`), if any.
fn leading_special(pp: &Json) -> Option<String> {
    let list: Vec<&Json> = match pp.get("processors").and_then(Json::as_array) {
        Some(a) => a.iter().collect(),
        None => vec![pp],
    };
    list.into_iter().filter(|p| p.get("type").and_then(Json::as_str) == Some("TemplateProcessing")).find_map(|p| {
        let single = p.get("single")?.as_array()?;
        if single.len() < 2 {
            return None;
        }
        single[0].get("SpecialToken")?.get("id")?.as_str().map(str::to_string)
    })
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
        let bytes = crate::files::read(&path, crate::files::TOKENIZER_BYTES, "tokenizer.json", "")?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| tok_err(&source, e))?;
        let mut t = Tokenizer {
            inner,
            source,
            bos_token: None,
            eos_token: None,
            eos_ids: vec![],
            chat_template: None,
            add_bos: false,
            bos_id: None,
            gguf_states: GgufStates::default(),
        };
        let mut add_bos_token = None;
        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.exists() {
            let text = crate::files::read_config(&cfg_path)?;
            let j: Json =
                serde_json::from_str(&text).map_err(|e| Error::format(&cfg_path, format!("invalid JSON: {e}")))?;
            t.bos_token = token_text(j.get("bos_token"));
            add_bos_token = j.get("add_bos_token").and_then(Json::as_bool);
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
        // Without `add_bos_token`, BOS is added where the loaded tokenizer's post-processor adds
        // it to a single sequence (Llama 3's and transformers' SentencePiece conversions), as
        // Hugging Face tokenizers adds it.
        t.add_bos = match add_bos_token {
            Some(b) => b,
            None => {
                let pp = t.inner.get_post_processor().and_then(|pp| serde_json::to_value(pp).ok());
                match pp.as_ref().and_then(leading_special) {
                    Some(first) => {
                        let bos = t.bos_token.get_or_insert_with(|| first.clone());
                        *bos == first
                    }
                    None => false,
                }
            }
        };
        if t.chat_template.is_none() {
            t.chat_template = template_file(dir)?;
        }
        if let Some(id) = t.eos_token.as_deref().and_then(|s| t.inner.token_to_id(s)) {
            t.eos_ids.push(id);
        }
        t.bos_id = t.bos_token.as_deref().and_then(|s| t.inner.token_to_id(s));
        Ok(t)
    }

    /// Builds the tokenizer stored in GGUF metadata: byte-level BPE (`gpt2`) with the model's
    /// pre-tokenizer, or a SentencePiece-style BPE (`llama`) with byte fallback.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let source = g.path.display().to_string();
        let model = g
            .get_str("tokenizer.ggml.model")
            .map_err(|_| tok_err(&source, "metadata `tokenizer.ggml.model` is missing"))?;
        let strings = |key: &str| -> Result<Vec<String>> {
            match g.get(key) {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| tok_err(&source, format!("`{key}` holds a non-string")))
                    })
                    .collect(),
                _ => Err(tok_err(&source, format!("metadata `{key}` is missing or not an array"))),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<u64> = match g.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let parse_merges = |list: Vec<String>| -> Result<Vec<(String, String)>> {
            list.into_iter()
                .map(|m| {
                    m.split_once(' ')
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .ok_or_else(|| tok_err(&source, format!("merge `{m}` has no space")))
                })
                .collect()
        };
        let (inner, default_add_bos) = match model {
            "gpt2" => {
                let merges = parse_merges(strings("tokenizer.ggml.merges")?)?;
                let pre = g.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
                (byte_level_bpe(&source, &g.path, vocab, merges, pre)?, false)
            }
            "llama" => {
                let merges = match g.get("tokenizer.ggml.merges") {
                    Some(_) => parse_merges(strings("tokenizer.ggml.merges")?)?,
                    None => {
                        let scores: Vec<f32> = match g.get("tokenizer.ggml.scores") {
                            Some(Value::Array(a)) => a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect(),
                            _ => {
                                return Err(tok_err(
                                    &source,
                                    "metadata `tokenizer.ggml.scores` is missing (needed without merges)",
                                ));
                            }
                        };
                        // Deriving merges splits every token at every character: bound that
                        // work by what real vocabularies need, so a crafted file cannot stall it.
                        let work: u64 = tokens.iter().map(|t| (t.len() as u64).pow(2)).sum();
                        if work > MAX_MERGE_WORK {
                            return Err(tok_err(
                                &source,
                                format!(
                                    "`tokenizer.ggml.tokens` are too long to derive merges from (the squares of \
                                     their lengths add up to {work}; at most {MAX_MERGE_WORK})"
                                ),
                            ));
                        }
                        merges_from_scores(&tokens, &scores)
                    }
                };
                // llama.cpp prepends a space unless the file says not to (Gemma's).
                let space_prefix = !matches!(g.get("tokenizer.ggml.add_space_prefix"), Some(Value::Bool(false)));
                (sentencepiece_bpe(&source, vocab, merges, space_prefix)?, true)
            }
            other => {
                return Err(Error::unsupported(
                    &g.path,
                    format!(
                        "tokenizer.ggml.model `{other}` (edgetune reads `gpt2` byte-level BPE and `llama` SentencePiece BPE)"
                    ),
                ));
            }
        };
        let mut inner = inner;
        // Control tokens (type 3) are matched whole as special tokens, user-defined ones (4)
        // whole as plain added tokens, as llama.cpp and transformers do.
        let added = |ty: u64, special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&types)
                .filter(|(_, t)| **t == ty)
                .map(|(s, _)| AddedToken::from(s.clone(), special))
                .collect()
        };
        inner.add_special_tokens(&added(3, true));
        inner.add_tokens(&added(4, false));
        let id_of = |key: &str| g.get(key).and_then(Value::as_u64).map(|v| v as u32);
        let name_of = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        let bos_id = id_of("tokenizer.ggml.bos_token_id");
        let eos_id = id_of("tokenizer.ggml.eos_token_id");
        let gguf_states = GgufStates {
            ids: OTHER_SPECIALS
                .iter()
                .filter_map(|&(typ, key)| id_of(key).filter(|&i| (i as usize) < tokens.len()).map(|i| (typ, i)))
                .collect(),
            flags: ["bos", "eos", "sep"]
                .into_iter()
                .filter_map(|typ| match g.get(&format!("tokenizer.ggml.add_{typ}_token")) {
                    Some(Value::Bool(b)) => Some((typ, *b)),
                    _ => None,
                })
                .collect(),
            byte_level: model == "gpt2",
            placeholders: (tokens.iter().zip(&types).enumerate())
                .filter(|&(i, (t, &ty))| ty == 5 && *t == format!("[PAD{i}]"))
                .map(|(_, (t, _))| t.clone())
                .collect(),
        };
        Ok(Tokenizer {
            inner,
            source,
            bos_token: name_of(bos_id),
            eos_token: name_of(eos_id),
            eos_ids: eos_id.into_iter().collect(),
            chat_template: g.get("tokenizer.chat_template").and_then(Value::as_str).map(str::to_string),
            add_bos: match g.get("tokenizer.ggml.add_bos_token") {
                Some(Value::Bool(b)) => *b,
                _ => default_add_bos,
            } && bos_id.is_some(),
            bos_id,
            gguf_states,
        })
    }

    /// Loads the tokenizer belonging to a model path (folder or .gguf).
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() { Self::from_hf_dir(path) } else { Self::from_gguf(&GgufFile::open(path)?) }
    }

    /// The tokenizer as Hugging Face files: `tokenizer.json` text and the `tokenizer_config.json`
    /// value (chat template; the BOS, EOS and, from a GGUF file, unknown, separator, padding and
    /// mask tokens by their texts; the add-token flags the file states, and add-BOS where BOS is
    /// added unstated, as in a SentencePiece vocabulary), so that a model read from GGUF can be
    /// written as a folder that transformers loads, and that llama.cpp's converter writes as
    /// GGUF again with the same special tokens.
    pub fn hf_files(&self, model_max_length: usize) -> Result<(String, serde_json::Value)> {
        let mut text = self.inner.to_string(true).map_err(|e| tok_err(&self.source, e))?;
        if !self.gguf_states.placeholders.is_empty() {
            // The converter's placeholders for ids the folder's tokenizer lacked: the folder
            // lacks them again (config.json's vocab_size still counts them).
            let mut j: Json = serde_json::from_str(&text).map_err(|e| tok_err(&self.source, e))?;
            if let Some(vocab) = j.pointer_mut("/model/vocab").and_then(Json::as_object_mut) {
                for t in &self.gguf_states.placeholders {
                    vocab.remove(t);
                }
            }
            text = serde_json::to_string_pretty(&j).map_err(|e| tok_err(&self.source, e))?;
        }
        let mut config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "chat_template": self.chat_template,
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": false,
        });
        for &(typ, id) in &self.gguf_states.ids {
            if let Some(t) = self.inner.id_to_token(id) {
                config[format!("{typ}_token")] = Json::String(t);
            }
        }
        for &(typ, v) in &self.gguf_states.flags {
            config[format!("add_{typ}_token")] = Json::Bool(v);
        }
        if self.add_bos {
            config["add_bos_token"] = Json::Bool(true);
        }
        Ok((text, config))
    }

    /// Whether the tokenizer was read from a GGUF file's byte-level BPE vocabulary
    /// (`tokenizer.ggml.model` `gpt2`).
    pub fn is_gguf_byte_level(&self) -> bool {
        self.gguf_states.byte_level
    }

    /// The ids of the special tokens a GGUF file names beside BOS and EOS, under the keys of a
    /// Hugging Face `config.json` (`pad_token_id`, `unk_token_id`, ...); none for a folder.
    pub fn special_token_ids(&self) -> Vec<(String, u32)> {
        self.gguf_states.ids.iter().map(|&(typ, id)| (format!("{typ}_token_id"), id)).collect()
    }

    /// Token ids of `text`; special-token text such as `<|im_start|>` maps to its id.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| tok_err(&self.source, e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` with each token's byte span in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<Span>)> {
        let enc = self.inner.encode(text, false).map_err(|e| tok_err(&self.source, e))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Token ids of a plain prompt: [`Tokenizer::encode`] with BOS first when the vocabulary
    /// expects it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if let (true, Some(bos)) = (self.add_bos, self.bos_id) {
            ids.push(bos);
        }
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// Text of `ids` (special tokens kept, so a transcript shows them).
    /// The text of `ids` (special tokens included).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| tok_err(&self.source, e))
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of the token whose text is `token`, if there is one.
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
        // A template comes with the model file: its work is bounded, so one that loops without
        // end is an error, not a hang. Real templates take a few hundred steps a message.
        let bytes: usize = messages.iter().map(|m| m.content.len() + m.role.len()).sum();
        let fuel = TEMPLATE_FUEL_BASE + TEMPLATE_FUEL_PER_BYTE * bytes as u64;
        env.set_fuel(Some(fuel));
        env.add_template("chat", template).map_err(|e| Error::Template(format!("parsing the template: {e}")))?;
        let tmpl = env.get_template("chat").map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| match e.kind() {
            minijinja::ErrorKind::OutOfFuel => Error::Template(format!(
                "{}'s chat template did more than {fuel} steps of work for {} messages and was stopped (a template \
                 that loops without end?)",
                self.source,
                messages.len()
            )),
            _ => Error::Template(format!("rendering: {e}")),
        })
    }
}

/// Steps of template work any conversation may take, plus [`TEMPLATE_FUEL_PER_BYTE`] per byte of
/// its messages: far above what real chat templates need (a few hundred steps a message), far
/// below a runaway loop's.
pub const TEMPLATE_FUEL_BASE: u64 = 1_000_000;
/// Fuel the chat template gets for each byte of the messages, on top of
/// [`TEMPLATE_FUEL_BASE`].
pub const TEMPLATE_FUEL_PER_BYTE: u64 = 100;

/// GPT-2's split (`ByteLevel`'s own regex; llama.cpp's `gpt2` pre-tokenizer).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's split (llama.cpp's `llama-bpe`).
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-4o's split, o200k (llama.cpp's `gpt-4o`: Phi-4-mini): words split where the case turns
/// from lower to upper, contractions kept on the word, `/` and line breaks after punctuation.
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split (llama.cpp's `qwen2`).
const QWEN2: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A byte-level BPE (GPT-2 style) with the pre-tokenizer llama.cpp names `pre`.
fn byte_level_bpe(
    source: &str,
    path: &Path,
    vocab: tokenizers::models::bpe::Vocab,
    merges: Vec<(String, String)>,
    pre: &str,
) -> Result<tokenizers::Tokenizer> {
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| tok_err(source, e))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, false);
    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        Ok(Split::new(SplitPattern::Regex(pattern.into()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| tok_err(source, e))?
            .into())
    };
    let pres: Vec<PreTokenizerWrapper> = match pre {
        // SmolLM: digits one by one, then GPT-2's byte-level split.
        "smollm" => vec![Digits::new(true).into(), split(GPT2)?, byte_level.into()],
        "default" | "gpt2" | "gpt-2" => vec![split(GPT2)?, byte_level.into()],
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" | "dbrx" => vec![split(LLAMA3)?, byte_level.into()],
        "qwen2" | "deepseek-r1-qwen" => vec![split(QWEN2)?, byte_level.into()],
        "gpt-4o" => vec![split(GPT4O)?, byte_level.into()],
        other => return Err(Error::unsupported(path, format!("pre-tokenizer `{other}` (tokenizer.ggml.pre)"))),
    };
    inner.with_pre_tokenizer(Some(Sequence::new(pres)));
    inner.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    Ok(inner)
}

/// A SentencePiece-style BPE as transformers' LlamaTokenizer builds it: `▁` for spaces with one
/// prepended at the start (with `space_prefix`; none, as in Gemma's tokenizer, without),
/// byte fallback for unknown characters.
fn sentencepiece_bpe(
    source: &str,
    vocab: tokenizers::models::bpe::Vocab,
    merges: Vec<(String, String)>,
    space_prefix: bool,
) -> Result<tokenizers::Tokenizer> {
    use tokenizers::decoders::{byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence as DecSeq, strip::Strip};
    use tokenizers::normalizers::replace::Replace;
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| tok_err(source, e))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let prepend = if space_prefix { PrependScheme::First } else { PrependScheme::Never };
    inner.with_pre_tokenizer(Some(Metaspace::new('▁', prepend, false)));
    let replace = Replace::new("▁", " ").map_err(|e| tok_err(source, e))?;
    let mut decoders = vec![replace.into(), ByteFallback::new().into(), Fuse::new().into()];
    if space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    inner.with_decoder(Some(DecSeq::new(decoders)));
    Ok(inner)
}

/// The most work [`merges_from_scores`] may do, as the sum of the squares of the tokens' lengths
/// in bytes: a 256,000-token SentencePiece vocabulary needs about 30 million.
pub const MAX_MERGE_WORK: u64 = 2_000_000_000;

/// Merges implied by a SentencePiece vocabulary and its scores (transformers'
/// `generate_merges`): every split of a token into two tokens, highest score first, then longer
/// left and right parts first; ties keep vocabulary order.
pub fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let index: std::collections::HashMap<&str, usize> =
        tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(usize, usize, f32, usize, usize)> = Vec::new();
    for (ti, tok) in tokens.iter().enumerate() {
        let score = scores.get(ti).copied().unwrap_or(0.0);
        let mut local = Vec::new();
        for (pos, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(pos);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                local.push((li, ri, score, l.chars().count(), r.chars().count()));
            }
        }
        local.sort_by_key(|m| (m.0, m.1));
        merges.extend(local);
    }
    // Python's sorted(..., reverse=True) is stable: equal keys keep their order.
    merges.sort_by(|a, b| b.2.total_cmp(&a.2).then(b.3.cmp(&a.3)).then(b.4.cmp(&a.4)));
    merges.into_iter().map(|(l, r, ..)| (tokens[l].clone(), tokens[r].clone())).collect()
}

//! A Hugging Face folder's tokenizer written as GGUF metadata, as llama.cpp's
//! `convert_hf_to_gguf.py` writes it: a SentencePiece `tokenizer.model` as its pieces, scores
//! and types (`_set_vocab_sentencepiece`), else a byte-level BPE `tokenizer.json` as its tokens
//! by id with their types, the merges and the pre-tokenizer's llama.cpp name
//! (`_set_vocab_gpt2`); with either, the special tokens' ids, whether BOS, EOS and a separator
//! are added, and the chat template (gguf-py's `SpecialVocab`).

use std::path::Path;

use serde_json::Value as Json;

use super::token_text;
use crate::error::{Error, Result};
use crate::model::gguf::Value;

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The special tokens the converter looks up, with the GGUF key each is written under (`cls`
/// has no key in gguf-py: the converter skips it).
const SPECIALS: [(&str, Option<&str>); 7] = [
    ("bos", Some("tokenizer.ggml.bos_token_id")),
    ("eos", Some("tokenizer.ggml.eos_token_id")),
    ("unk", Some("tokenizer.ggml.unknown_token_id")),
    ("sep", Some("tokenizer.ggml.seperator_token_id")),
    ("pad", Some("tokenizer.ggml.padding_token_id")),
    ("cls", None),
    ("mask", Some("tokenizer.ggml.mask_token_id")),
];

fn read_json(path: &Path, limit: u64, what: &str) -> Result<Json> {
    let bytes = crate::files::read(path, limit, what, "")?;
    serde_json::from_slice(&bytes).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))
}

/// llama.cpp's name for the pre-tokenizer of `tokenizer.json` (`tokenizer.ggml.pre`): one of
/// the five that edgetune's GGUF tokenizer builds, recognised by its structure and regex (a
/// split that keeps the matches, as `Isolated`, or as `Removed` inverted, which is the same for
/// these regexes: each matches every character).
pub fn pre_tokenizer_name(path: &Path, pre: &Json) -> Result<&'static str> {
    let kind = |j: &Json| j.get("type").and_then(Json::as_str).unwrap_or("").to_string();
    let byte_level = |j: &Json, regex: bool| {
        kind(j) == "ByteLevel" && j.get("use_regex").and_then(Json::as_bool).unwrap_or(true) == regex
    };
    let split_regex = |j: &Json| -> Option<String> {
        (kind(j) == "Split"
            && matches!(
                (j.get("behavior").and_then(Json::as_str), j.get("invert").and_then(Json::as_bool).unwrap_or(false)),
                (Some("Isolated"), false) | (Some("Removed"), true)
            ))
        .then(|| j.get("pattern")?.get("Regex")?.as_str().map(str::to_string))
        .flatten()
    };
    let digits = |j: &Json| kind(j) == "Digits" && j.get("individual_digits").and_then(Json::as_bool) == Some(true);
    let steps: Vec<&Json> = match kind(pre).as_str() {
        "Sequence" => pre.get("pretokenizers").and_then(Json::as_array).map(|a| a.iter().collect()).unwrap_or_default(),
        _ => vec![pre],
    };
    let name = match steps.as_slice() {
        [b] if byte_level(b, true) => Some("gpt-2"),
        [d, b] if digits(d) && byte_level(b, true) => Some("smollm"),
        // The same with ByteLevel's split spelled out (as edgetune writes it from a GGUF file).
        [d, s, b] if digits(d) && byte_level(b, false) && split_regex(s).as_deref() == Some(super::GPT2) => {
            Some("smollm")
        }
        [s, b] if byte_level(b, false) => match split_regex(s).as_deref() {
            Some(r) if r == super::LLAMA3 => Some("llama-bpe"),
            Some(r) if r == super::QWEN2 => Some("qwen2"),
            Some(r) if r == super::GPT2 => Some("gpt-2"),
            Some(r) if r == super::GPT4O => Some("gpt-4o"),
            _ => None,
        },
        _ => None,
    };
    name.ok_or_else(|| {
        Error::unsupported(
            path,
            format!(
                "pre_tokenizer for a GGUF file: {} (edgetune names GPT-2's byte-level split, SmolLM's, Llama 3's, \
                 Qwen2's and GPT-4o's; convert this model with llama.cpp's convert_hf_to_gguf.py)",
                serde_json::to_string(pre).unwrap_or_default()
            ),
        )
    })
}

/// Whether the converter marks an added token CONTROL although it is not special
/// (`does_token_look_special`).
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// Which of the converter's model classes writes the vocabulary, for what each adds to
/// `_set_vocab_sentencepiece` and `_set_vocab_gpt2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConverterClass {
    /// `LlamaModel` (Llama, Mistral): `add_prefix_space` of `tokenizer_config.json` as
    /// `tokenizer.ggml.add_space_prefix`, and no BOS added for a 49,152-token vocabulary (IBM
    /// Granite's small models; SmolLM's too).
    Llama,
    /// `Gemma2Model`, `Gemma3Model`: a SentencePiece vocabulary with no space prefix; a
    /// byte-level one (Gemma 3) with the embeddings cut to the tokenizer's tokens.
    Gemma,
    /// `Phi3MiniModel`: a byte-level vocabulary only where `tokenizer_config.json` names
    /// `GPT2Tokenizer` (Phi-4-mini), else `tokenizer.model` with the added tokens of
    /// `tokenizer_config.json` and `tokenizer.json` over it as they are (control where special,
    /// else user-defined, none past the vocabulary).
    Phi3,
    /// The others (`Qwen2Model`, `Qwen3Model`): nothing added.
    Plain,
}

/// The tokenizer of the Hugging Face folder `dir` as the GGUF metadata llama.cpp's converter
/// writes for it, `vocab_size` tokens long (`config.json`'s: ids the tokenizer lacks become
/// `[PADi]`, unused): from `tokenizer.model` where the folder has one, else from a byte-level
/// BPE `tokenizer.json`, with what the converter's class adds (see [`ConverterClass`]). A
/// `tokenizer.json` with byte fallback and no `tokenizer.model` is refused, as is a
/// pre-tokenizer that edgetune cannot name.
pub fn gguf_metadata(dir: &Path, vocab_size: usize, class: ConverterClass) -> Result<Vec<(String, Value)>> {
    let spm = dir.join("tokenizer.model");
    let tc = tokenizer_config(dir)?;
    let byte_level_vocab = match (class, &tc) {
        (ConverterClass::Phi3, Some(c)) => {
            let named = c.get("tokenizer_class").and_then(Json::as_str).ok_or_else(|| {
                Error::format(
                    dir.join("tokenizer_config.json"),
                    "no `tokenizer_class`, which llama.cpp's converter reads for a Phi-3 folder",
                )
            })?;
            named == "GPT2Tokenizer"
        }
        (ConverterClass::Phi3, None) => false,
        _ => !spm.is_file(),
    };
    if !byte_level_vocab && !spm.is_file() {
        return Err(Error::unsupported(
            &spm,
            "missing: llama.cpp's converter reads a Phi-3 folder's tokenizer from it unless tokenizer_config.json \
             names GPT2Tokenizer",
        ));
    }
    let mut out = if byte_level_vocab {
        byte_level(dir, &tc, vocab_size, class)?
    } else {
        sentencepiece_metadata(dir, &spm, &tc, vocab_size, class)?
    };
    match class {
        ConverterClass::Llama => {
            if let Some(b) = tc.as_ref().and_then(|c| c.get("add_prefix_space")).and_then(Json::as_bool) {
                out.push(("tokenizer.ggml.add_space_prefix".into(), Value::Bool(b)));
            }
            if vocab_size == 49152 {
                match out.iter_mut().find(|(k, _)| k == "tokenizer.ggml.add_bos_token") {
                    Some(slot) => slot.1 = Value::Bool(false),
                    None => out.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(false))),
                }
            }
        }
        ConverterClass::Gemma if spm.is_file() => {
            out.push(("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)));
        }
        ConverterClass::Gemma | ConverterClass::Phi3 | ConverterClass::Plain => {}
    }
    Ok(out)
}

/// The folder's `tokenizer_config.json` (`None` without one), which must be a JSON object.
fn tokenizer_config(dir: &Path) -> Result<Option<serde_json::Map<String, Json>>> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    match read_json(&path, crate::files::TOKENIZER_BYTES, "tokenizer_config.json")? {
        Json::Object(m) => Ok(Some(m)),
        _ => Err(Error::format(&path, "expected a JSON object")),
    }
}

/// `_set_vocab_gpt2`: the tokens of `tokenizer.json` (byte-level BPE) by id, their types, the
/// merges and the pre-tokenizer's name.
fn byte_level(
    dir: &Path,
    tc: &Option<serde_json::Map<String, Json>>,
    vocab_size: usize,
    class: ConverterClass,
) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let j = read_json(&path, crate::files::TOKENIZER_BYTES, "tokenizer.json")?;
    let model = j.get("model").unwrap_or(&Json::Null);
    let kind = model.get("type").and_then(Json::as_str).unwrap_or("");
    if kind != "BPE" || model.get("byte_fallback").and_then(Json::as_bool).unwrap_or(false) {
        return Err(Error::unsupported(
            &path,
            format!(
                "tokenizer for a GGUF file: {}{} (edgetune writes byte-level BPE and SentencePiece tokenizers; \
                 convert this model with llama.cpp's convert_hf_to_gguf.py)",
                if kind.is_empty() { "model.type-less" } else { kind },
                if kind == "BPE" {
                    " with byte fallback (SentencePiece-style) and no tokenizer.model beside it"
                } else {
                    ""
                }
            ),
        ));
    }
    let pre = pre_tokenizer_name(&path, j.get("pre_tokenizer").unwrap_or(&Json::Null))?;

    // Tokens by id: the model's vocabulary, then the added tokens over it.
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    let mut put = |id: Option<u64>, text: String, ty: i32| -> Result<()> {
        let id = id.ok_or_else(|| Error::format(&path, format!("token `{text}` has no integer id")))? as usize;
        let slot = tokens.get_mut(id).ok_or_else(|| {
            Error::format(
                &path,
                format!("token `{text}` has id {id}, past the model's {vocab_size} tokens (config.json vocab_size)"),
            )
        })?;
        *slot = Some((text, ty));
        Ok(())
    };
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| Error::format(&path, "model.vocab is not an object of tokens to ids"))?;
    for (text, id) in vocab {
        put(id.as_u64(), text.clone(), NORMAL)?;
    }
    let added: Vec<&Json> =
        j.get("added_tokens").and_then(Json::as_array).map(|a| a.iter().collect()).unwrap_or_default();
    // Gemma 3's converter cuts the embeddings to the vocabulary and added tokens it counts here,
    // while listing `vocab_size` tokens: fewer rows than tokens, a file llama.cpp refuses.
    if class == ConverterClass::Gemma && vocab.len() + added.len() < vocab_size {
        return Err(Error::unsupported(
            &path,
            format!(
                "GGUF file from a Gemma folder whose tokenizer.json has {} tokens and added tokens for the model's \
                 {vocab_size} (config.json vocab_size): llama.cpp's converter cuts the embeddings to the tokenizer's \
                 count, a file llama.cpp refuses",
                vocab.len() + added.len()
            ),
        ));
    }
    for t in &added {
        let text = t.get("content").and_then(Json::as_str).unwrap_or("").to_string();
        let special = t.get("special").and_then(Json::as_bool).unwrap_or(false);
        let (text, ty) = if special || looks_special(&text) {
            (text, CONTROL)
        } else {
            // Pre-normalized for llama.cpp, as the converter writes user-defined tokens.
            (text.replace('▁', " "), USER_DEFINED)
        };
        put(t.get("id").and_then(Json::as_u64), text, ty)?;
    }
    let (texts, types): (Vec<Value>, Vec<Value>) = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| match t {
            Some((text, ty)) => (Value::String(text), Value::I32(ty)),
            None => (Value::String(format!("[PAD{i}]")), Value::I32(UNUSED)),
        })
        .unzip();

    // Merges as "left right", a space inside a part written as U+0120 (gguf-py's SpecialVocab).
    let merges: Vec<Value> = match model.get("merges").and_then(Json::as_array) {
        None => Vec::new(),
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, m)| match m {
                Json::String(s) => Ok(Value::String(s.clone())),
                Json::Array(p) if p.len() == 2 && p.iter().all(Json::is_string) => Ok(Value::String(
                    p.iter().filter_map(Json::as_str).map(|s| s.replace(' ', "\u{120}")).collect::<Vec<_>>().join(" "),
                )),
                _ => Err(Error::format(&path, format!("model.merges[{i}] is neither \"a b\" nor [\"a\", \"b\"]"))),
            })
            .collect::<Result<_>>()?,
    };

    let mut out: Vec<(String, Value)> = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(texts)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
    ];
    if !merges.is_empty() {
        out.push(("tokenizer.ggml.merges".into(), Value::Array(merges)));
    }
    out.extend(special_metadata(dir, &j, &added, tc.clone(), None)?);
    Ok(out)
}

/// A SentencePiece model's pieces (`tokenizer.model`, a `ModelProto`): each piece's text,
/// score and type (field 1 of the model; fields 1, 2 and 3 of each piece), every other field
/// skipped by its wire type.
pub fn sentencepiece_pieces(path: &Path) -> Result<Vec<(String, f32, u64)>> {
    let bytes = crate::files::read(path, crate::files::TOKENIZER_BYTES, "tokenizer.model", "")?;
    parse_pieces(&bytes, path)
}

/// [`sentencepiece_pieces`] of the bytes of the file `path`.
fn parse_pieces(bytes: &[u8], path: &Path) -> Result<Vec<(String, f32, u64)>> {
    let bad = |at: usize, what: &str| Error::format(path, format!("not a SentencePiece model: {what} at byte {at}"));
    // (field, wire type, start of the value, end of the value or the varint's value)
    fn field(b: &[u8], at: &mut usize) -> Option<(u64, u64, usize, u64)> {
        let varint = |at: &mut usize| -> Option<u64> {
            let mut v = 0u64;
            for shift in (0..64).step_by(7) {
                let x = *b.get(*at)?;
                *at += 1;
                v |= u64::from(x & 0x7f) << shift;
                if x < 0x80 {
                    return Some(v);
                }
            }
            None
        };
        let key = varint(at)?;
        let start = *at;
        let value = match key & 7 {
            0 => varint(at)?,
            1 => {
                *at = at.checked_add(8).filter(|&e| e <= b.len())?;
                *at as u64
            }
            2 => {
                let n = usize::try_from(varint(at)?).ok()?;
                let begin = *at;
                *at = begin.checked_add(n).filter(|&e| e <= b.len())?;
                return Some((key >> 3, 2, begin, *at as u64));
            }
            5 => {
                *at = at.checked_add(4).filter(|&e| e <= b.len())?;
                *at as u64
            }
            _ => return None,
        };
        Some((key >> 3, key & 7, start, value))
    }
    let mut pieces = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let here = at;
        let (f, wire, start, end) = field(bytes, &mut at).ok_or_else(|| bad(here, "a field cut short"))?;
        if f != 1 || wire != 2 {
            continue;
        }
        let msg = &bytes[start..end as usize];
        let (mut text, mut score, mut ty) = (None, 0f32, 1u64);
        let mut p = 0;
        while p < msg.len() {
            let (g, w, s, v) = field(msg, &mut p).ok_or_else(|| bad(start + p, "a piece's field cut short"))?;
            match (g, w) {
                (1, 2) => {
                    text = Some(
                        std::str::from_utf8(&msg[s..v as usize])
                            .map_err(|_| bad(start + s, "a piece that is not UTF-8"))?
                            .to_string(),
                    )
                }
                (2, 5) => score = f32::from_le_bytes([msg[s], msg[s + 1], msg[s + 2], msg[s + 3]]),
                (3, 0) => ty = v,
                _ => {}
            }
        }
        pieces.push((text.ok_or_else(|| bad(start, "a piece with no text"))?, score, ty));
    }
    if pieces.is_empty() {
        return Err(bad(0, "no pieces"));
    }
    Ok(pieces)
}

/// A SentencePiece vocabulary as a GGUF file holds it (`tokenizer.ggml.model` `llama`), for
/// writing back as `tokenizer.model`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SentencePieceVocab {
    /// Each token's text, by id.
    pub tokens: Vec<String>,
    /// Each token's score.
    pub scores: Vec<f32>,
    /// Each token's llama.cpp type (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    /// 6 byte), which SentencePiece's piece types number alike.
    pub types: Vec<u64>,
    /// Whether a space is put before the text (SentencePiece's `add_dummy_prefix`).
    pub space_prefix: bool,
    /// The ids of the unknown token, BOS, EOS and padding, where the file names them.
    pub unk: Option<u32>,
    /// See `unk`.
    pub bos: Option<u32>,
    /// See `unk`.
    pub eos: Option<u32>,
    /// See `unk`.
    pub pad: Option<u32>,
}

impl SentencePieceVocab {
    /// The SentencePiece vocabulary of a GGUF file (`None` for another tokenizer model).
    pub fn from_gguf(g: &crate::model::gguf::GgufFile) -> Option<Self> {
        if g.get("tokenizer.ggml.model").and_then(Value::as_str) != Some("llama") {
            return None;
        }
        let array = |key: &str| match g.get(key) {
            Some(Value::Array(a)) => a.as_slice(),
            _ => &[],
        };
        let id = |key: &str| g.get(key).and_then(Value::as_u64).and_then(|v| u32::try_from(v).ok());
        Some(SentencePieceVocab {
            tokens: array("tokenizer.ggml.tokens").iter().map(|v| v.as_str().unwrap_or("").to_string()).collect(),
            scores: array("tokenizer.ggml.scores").iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect(),
            types: array("tokenizer.ggml.token_type").iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            space_prefix: !matches!(g.get("tokenizer.ggml.add_space_prefix"), Some(Value::Bool(false))),
            unk: id("tokenizer.ggml.unknown_token_id"),
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            pad: id("tokenizer.ggml.padding_token_id"),
        })
    }
}

/// Protocol-buffer fields, as SentencePiece's `sentencepiece_model.proto` numbers them.
struct Proto(Vec<u8>);

impl Proto {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    /// An integer field (int32, enum, bool: wire type 0; negative int32 as ten bytes).
    fn int(&mut self, field: u64, v: i64) {
        self.varint(field << 3);
        self.varint(v as u64);
    }
    /// A length-delimited field (a string, bytes or a message).
    fn bytes(&mut self, field: u64, b: &[u8]) {
        self.varint((field << 3) | 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn float(&mut self, field: u64, v: f32) {
        self.varint((field << 3) | 5);
        self.0.extend_from_slice(&v.to_le_bytes());
    }
}

/// The `tokenizer.model` (a SentencePiece `ModelProto`) of a GGUF file's SentencePiece
/// vocabulary, such that llama.cpp's converter reads back the same tokens, scores and types
/// (`_set_vocab_sentencepiece`), and `added_tokens.json`, which gives the user-defined tokens
/// that type back (the converter asks SentencePiece only whether a piece is unknown, control,
/// unused or a byte, and reads the rest as normal), where there are any. The converter's
/// trailing `[PADi]` placeholders (ids the folder's tokenizer lacked) are left out, as it
/// writes them again from config.json's vocabulary size. A BPE model: each piece with its text,
/// score and type; byte fallback where byte pieces are; the unknown, BOS, EOS and padding
/// pieces named; identity normalization with the file's space prefix.
///
/// The unknown piece SentencePiece needs is the token of the unknown type, else the token the
/// file names as unknown (Phi-3's converter writes it as a control token, as its added tokens
/// say, over the type it reads from the model). `None` where SentencePiece would not load the
/// model: no unknown piece or more than one, a piece empty or given twice, or a byte piece that
/// is not `<0xXX>`; and where the file's tokens, scores and types differ in number.
pub fn sentencepiece_files(v: &SentencePieceVocab) -> Option<(Vec<u8>, Option<String>)> {
    if v.types.len() != v.tokens.len() || v.scores.len() != v.tokens.len() {
        return None;
    }
    let placeholder = |i: usize| v.types.get(i) == Some(&(UNUSED as u64)) && v.tokens[i] == format!("[PAD{i}]");
    let n = (0..v.tokens.len()).rev().find(|&i| !placeholder(i)).map_or(0, |i| i + 1);
    let (tokens, types) = (&v.tokens[..n], &v.types[..n]);
    let mut seen = std::collections::HashSet::new();
    for (t, &ty) in tokens.iter().zip(types) {
        let byte_ok = ty != 6
            || (t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') && u8::from_str_radix(&t[3..5], 16).is_ok());
        if t.is_empty() || !seen.insert(t.as_str()) || !byte_ok {
            return None;
        }
    }
    if types.iter().filter(|&&t| t == 2).count() > 1 {
        return None;
    }
    let unk = types.iter().position(|&t| t == 2).or(v.unk.map(|i| i as usize).filter(|&i| i < n))?;
    let mut model = Proto(Vec::new());
    let mut user_defined = serde_json::Map::new();
    for (i, (t, &ty)) in tokens.iter().zip(types).enumerate() {
        let mut piece = Proto(Vec::new());
        piece.bytes(1, t.as_bytes());
        piece.float(2, v.scores[i]);
        piece.int(
            3,
            if i == unk {
                2
            } else if (1..=6).contains(&ty) {
                ty as i64
            } else {
                1
            },
        );
        model.bytes(1, &piece.0);
        if ty == USER_DEFINED as u64 {
            user_defined.insert(t.clone(), Json::from(i));
        }
    }
    let id = |x: Option<u32>| x.filter(|&i| (i as usize) < n).map_or(-1, i64::from);
    let mut trainer = Proto(Vec::new());
    trainer.int(3, 2); // model_type: BPE
    trainer.int(4, n as i64); // vocab_size
    trainer.int(35, i64::from(types.contains(&6))); // byte_fallback
    for (field, x) in [(40, Some(unk as u32)), (41, v.bos), (42, v.eos), (43, v.pad)] {
        trainer.int(field, id(x));
    }
    for (field, x) in [(45, Some(unk as u32)), (46, v.bos), (47, v.eos), (48, v.pad)] {
        if let Some(i) = x.filter(|&i| (i as usize) < n) {
            trainer.bytes(field, tokens[i as usize].as_bytes());
        }
    }
    model.bytes(2, &trainer.0);
    let mut normalizer = Proto(Vec::new());
    normalizer.bytes(1, b"identity");
    normalizer.int(3, i64::from(v.space_prefix)); // add_dummy_prefix
    normalizer.int(4, 0); // remove_extra_whitespaces
    normalizer.int(5, 1); // escape_whitespaces
    model.bytes(3, &normalizer.0);
    let added = (!user_defined.is_empty()).then(|| Json::Object(user_defined).to_string());
    Some((model.0, added))
}

/// `_set_vocab_sentencepiece`: the pieces of `tokenizer.model` by id with their scores and
/// types (SentencePiece's own user-defined pieces counted as normal, as the converter asks
/// SentencePiece only whether a piece is unknown, control, unused or a byte), then
/// `added_tokens.json` and `tokenizer_config.json`'s `added_tokens_decoder` over them, ids the
/// model lacks as `[PADi]`; the special tokens from `tokenizer.json` and the configs. Phi-3's
/// class (see [`ConverterClass::Phi3`]) sets the added tokens its own way.
fn sentencepiece_metadata(
    dir: &Path,
    model: &Path,
    tc: &Option<serde_json::Map<String, Json>>,
    vocab_size: usize,
    class: ConverterClass,
) -> Result<Vec<(String, Value)>> {
    let phi3 = class == ConverterClass::Phi3;
    let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000.0f32; vocab_size];
    let mut types = vec![UNUSED; vocab_size];
    let pieces = sentencepiece_pieces(model)?;
    // Phi-3's converter stops at no id, so a model with more pieces fails it.
    let past = |file: &Path, what: &str, id: usize| {
        Error::format(
            file,
            format!(
                "{what} has id {id}, past the model's {vocab_size} tokens (config.json vocab_size), which \
                 llama.cpp's converter refuses for a Phi-3 folder"
            ),
        )
    };
    if phi3 && pieces.len() > vocab_size {
        return Err(past(model, "a piece", pieces.len() - 1));
    }
    for (id, (text, score, ty)) in pieces.into_iter().enumerate().take(vocab_size) {
        tokens[id] = text;
        scores[id] = score;
        types[id] = match ty {
            2 => 2,
            3 => CONTROL,
            5 => UNUSED,
            6 => 6,
            _ => NORMAL,
        };
    }
    let added_json = dir.join("added_tokens.json");
    if added_json.is_file() {
        let j = read_json(&added_json, crate::files::TOKENIZER_BYTES, "added_tokens.json")?;
        for (text, id) in j.as_object().into_iter().flatten() {
            let id = id.as_u64().ok_or_else(|| Error::format(&added_json, format!("`{text}` has no integer id")))?;
            if let Some(i) = usize::try_from(id).ok().filter(|&i| i < vocab_size) {
                (tokens[i], scores[i], types[i]) = (text.clone(), -1000.0, USER_DEFINED);
            }
        }
    }
    // An added token over the pieces: Phi-3's as it is (control where special), the others'
    // also control where it looks special, else with `▁` written as a space.
    let mut put = |i: usize, t: &Json| {
        let text = t.get("content").and_then(Json::as_str).unwrap_or("").to_string();
        let special = t.get("special").and_then(Json::as_bool).unwrap_or(false);
        (tokens[i], types[i]) = match (special, phi3) {
            (true, _) => (text, CONTROL),
            (false, true) => (text, USER_DEFINED),
            (false, false) if looks_special(&text) => (text, CONTROL),
            (false, false) => (text.replace('▁', " "), USER_DEFINED),
        };
        scores[i] = -1000.0;
    };
    if let Some(j) = tc {
        let cfg_path = dir.join("tokenizer_config.json");
        for (id, t) in j.get("added_tokens_decoder").and_then(Json::as_object).into_iter().flatten() {
            let i: usize = id
                .parse()
                .map_err(|_| Error::format(&cfg_path, format!("added_tokens_decoder key `{id}` is not a token id")))?;
            match i < vocab_size {
                true => put(i, t),
                false if phi3 => return Err(past(&cfg_path, "added_tokens_decoder's token", i)),
                false => {}
            }
        }
    }
    let json_path = dir.join("tokenizer.json");
    let j = if json_path.is_file() {
        read_json(&json_path, crate::files::TOKENIZER_BYTES, "tokenizer.json")?
    } else {
        Json::Null
    };
    let added: Vec<&Json> =
        j.get("added_tokens").and_then(Json::as_array).map(|a| a.iter().collect()).unwrap_or_default();
    if phi3 {
        for t in &added {
            let id = t
                .get("id")
                .and_then(Json::as_u64)
                .ok_or_else(|| Error::format(&json_path, "an added token has no integer id"))?
                as usize;
            if id >= vocab_size {
                return Err(past(&json_path, "an added token", id));
            }
            put(id, t);
        }
    }
    let mut out: Vec<(String, Value)> = vec![
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.scores".into(), Value::Array(scores.into_iter().map(Value::F32).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect())),
    ];
    out.extend(special_metadata(dir, &j, &added, tc.clone(), Some(vocab_size))?);
    Ok(out)
}

/// The special tokens' ids, the add-BOS/EOS/SEP flags and the chat template, as gguf-py's
/// `SpecialVocab` reads them: `tokenizer_config.json`'s `*_token` texts looked up among the
/// added tokens, then `config.json`'s `*_token_id`; the flags from the post-processor
/// (`ByteLevel` adds nothing; `TemplateProcessing` adds the special tokens around a single
/// sequence and between a pair's), then `tokenizer_config.json`'s `add_*_token`; the chat
/// template from `tokenizer_config.json`, else `chat_template.jinja` or `chat_template.json`.
/// `tc` is the folder's tokenizer_config.json, which the post-processor's special tokens may
/// add to as gguf-py's does.
fn special_metadata(
    dir: &Path,
    tokenizer: &Json,
    added: &[&Json],
    mut tc: Option<serde_json::Map<String, Json>>,
    n_vocab: Option<usize>,
) -> Result<Vec<(String, Value)>> {
    let text_of = |tc: &Option<serde_json::Map<String, Json>>, typ: &str| {
        tc.as_ref().and_then(|c| token_text(c.get(&format!("{typ}_token"))))
    };
    let mut add: Vec<(&'static str, bool)> = Vec::new();
    let set_add = |add: &mut Vec<(&'static str, bool)>, typ: &'static str, v: bool, keep: bool| match add
        .iter_mut()
        .find(|(t, _)| *t == typ)
    {
        Some(slot) if !keep => slot.1 = v,
        Some(_) => {}
        None => add.push((typ, v)),
    };
    let mut extra: Vec<&'static str> = Vec::new();
    let processors: Vec<&Json> = match tokenizer.get("post_processor").filter(|p| !p.is_null()) {
        None => Vec::new(),
        Some(pp) => match pp.get("processors").and_then(Json::as_array) {
            Some(a) => a.iter().collect(),
            None => vec![pp],
        },
    };
    let special_id =
        |j: &Json| j.get("SpecialToken").and_then(|s| s.get("id")).and_then(Json::as_str).map(str::to_string);
    let sequence_id = |j: &Json| j.get("Sequence").and_then(|s| s.get("id")).and_then(Json::as_str).map(str::to_string);
    let list = |p: &Json, k: &str| p.get(k).and_then(Json::as_array).cloned();
    for p in processors {
        match p.get("type").and_then(Json::as_str) {
            Some("ByteLevel") => {
                set_add(&mut add, "bos", false, true);
                set_add(&mut add, "eos", false, true);
            }
            Some("TemplateProcessing") => {
                let (mut bos, mut eos) = (text_of(&tc, "bos"), text_of(&tc, "eos"));
                let single = list(p, "single").unwrap_or_default();
                let (mut first, mut last) = (None, None);
                if single.len() > 1 {
                    first = special_id(&single[0]);
                    if let Some(f) = first.clone() {
                        let cls = text_of(&tc, "cls");
                        match tc.as_mut() {
                            None => bos = Some(f.clone()),
                            Some(c) if Some(&f) != bos.as_ref() && Some(&f) != cls.as_ref() => {
                                if bos.is_none() {
                                    c.insert("bos_token".into(), Json::String(f.clone()));
                                    bos = Some(f.clone());
                                }
                                if cls.is_none() {
                                    c.insert("cls_token".into(), Json::String(f.clone()));
                                }
                            }
                            Some(_) => {}
                        }
                        let v = Some(&f) == bos.as_ref() || Some(&f) == text_of(&tc, "cls").as_ref();
                        set_add(&mut add, "bos", v, false);
                    }
                    last = special_id(&single[single.len() - 1]);
                    if let Some(l) = last.clone() {
                        match tc.as_mut() {
                            None => eos = Some(l.clone()),
                            Some(c) if Some(&l) != eos.as_ref() => {
                                // The old EOS becomes EOT (or EOM), the trailing token EOS.
                                let moved = if !extra.contains(&"eot") { "eot" } else { "eom" };
                                extra.push(moved);
                                c.insert(format!("{moved}_token"), eos.clone().map_or(Json::Null, Json::String));
                                c.insert("eos_token".into(), Json::String(l.clone()));
                                eos = Some(l.clone());
                            }
                            Some(_) => {}
                        }
                        set_add(&mut add, "eos", Some(&l) == eos.as_ref(), false);
                    }
                }
                // A pair "A [sep] [eos] B" adds a separator between the two sequences.
                let pair = list(p, "pair").unwrap_or_default();
                let start = usize::from(first.is_some() && pair.first().and_then(special_id) == first);
                let stop = pair.len() - usize::from(last.is_some() && pair.last().and_then(special_id) == last);
                let pair = if start <= stop { &pair[start..stop] } else { &[][..] };
                if pair.len() > 2
                    && sequence_id(&pair[0]).as_deref() == Some("A")
                    && sequence_id(&pair[pair.len() - 1]).as_deref() == Some("B")
                {
                    let middle = &pair[1..pair.len() - 1];
                    let sep = text_of(&tc, "sep");
                    let closes =
                        |j: &Json| special_id(j).is_some_and(|e| Some(&e) == sep.as_ref() || Some(&e) == eos.as_ref());
                    let mut add_sep = closes(&middle[0]) && last.is_none();
                    if middle.len() == 2 && closes(&middle[1]) {
                        add_sep = true;
                    }
                    set_add(&mut add, "sep", add_sep, false);
                    if add_sep
                        && sep.is_none()
                        && let Some(c) = tc.as_mut()
                    {
                        c.insert("sep_token".into(), eos.clone().map_or(Json::Null, Json::String));
                    }
                }
            }
            _ => {}
        }
    }
    let keys: Vec<(&'static str, Option<&'static str>)> = SPECIALS
        .iter()
        .copied()
        .chain(extra.iter().map(|&e| {
            (e, Some(if e == "eot" { "tokenizer.ggml.eot_token_id" } else { "tokenizer.ggml.eom_token_id" }))
        }))
        .collect();
    let mut ids: Vec<(&'static str, u32)> = Vec::new();
    let mut template = None;
    // Without tokenizer_config.json the converter reads no token texts, flags or template.
    if let Some(c) = &tc {
        for &(typ, _) in &keys {
            if let Some(v) = c.get(&format!("add_{typ}_token")).and_then(Json::as_bool)
                && !add.iter().any(|(t, _)| *t == typ)
            {
                add.push((typ, v));
            }
            let Some(text) = token_text(c.get(&format!("{typ}_token"))) else { continue };
            let id = added.iter().find(|a| a.get("content").and_then(Json::as_str) == Some(text.as_str()));
            if let Some(id) = id.and_then(|a| a.get("id")).and_then(Json::as_u64)
                && !ids.iter().any(|(t, _)| *t == typ)
            {
                ids.push((typ, id as u32));
            }
        }
        template = match c.get("chat_template") {
            Some(Json::String(s)) => Some(s.clone()),
            Some(_) => None,
            None => super::template_file(dir)?,
        };
    }
    let config = dir.join("config.json");
    if config.is_file() {
        let c = read_json(&config, crate::files::TOKENIZER_BYTES, "config.json")?;
        for &(typ, _) in &keys {
            if let Some(id) = c.get(format!("{typ}_token_id").as_str()).and_then(Json::as_u64)
                && !ids.iter().any(|(t, _)| *t == typ)
            {
                ids.push((typ, id as u32));
            }
        }
    }
    let mut out: Vec<(String, Value)> = Vec::new();
    // Ids past `n_vocab` (where the converter knows it) are left out, as gguf-py leaves them.
    ids.retain(|&(_, id)| n_vocab.is_none_or(|n| (id as usize) < n));
    for (typ, id) in ids {
        if let Some((_, Some(key))) = keys.iter().find(|(t, _)| *t == typ) {
            out.push(((*key).into(), Value::U32(id)));
        }
    }
    for (typ, v) in add {
        if matches!(typ, "bos" | "eos" | "sep") {
            out.push((format!("tokenizer.ggml.add_{typ}_token"), Value::Bool(v)));
        }
    }
    if let Some(t) = template {
        out.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixture's SentencePiece model written back from its pieces reads as the same pieces
    /// (the converter's trailing placeholders left out, a user-defined token listed for
    /// added_tokens.json); a vocabulary SentencePiece would not load gives no model.
    #[test]
    fn a_sentencepiece_vocabulary_is_written_as_a_model_where_sentencepiece_would_load_it() {
        let path = crate::files::test_fixtures().join("tiny_spm_tokenizer/tokenizer.model");
        let pieces = sentencepiece_pieces(&path).expect("the fixture reads");
        let mut v = SentencePieceVocab {
            tokens: pieces.iter().map(|p| p.0.clone()).chain(["[PAD320]".into(), "[PAD321]".into()]).collect(),
            scores: pieces.iter().map(|p| p.1).chain([-10000.0; 2]).collect(),
            types: pieces.iter().map(|p| p.2).chain([5; 2]).collect(),
            space_prefix: true,
            unk: Some(0),
            bos: Some(1),
            eos: Some(2),
            pad: None,
        };
        v.types[300] = 4;
        let (model, added) = sentencepiece_files(&v).expect("a model");
        let mut want = pieces.clone();
        want[300].2 = 4;
        assert_eq!(parse_pieces(&model, &path).expect("reads"), want);
        assert_eq!(added, Some(format!("{{\"{}\":300}}", v.tokens[300])));
        let refused = |edit: &dyn Fn(&mut SentencePieceVocab)| {
            let mut w = v.clone();
            edit(&mut w);
            sentencepiece_files(&w).is_none()
        };
        assert!(refused(&|w| w.tokens[10] = w.tokens[11].clone()), "a piece given twice");
        assert!(refused(&|w| w.tokens[10] = String::new()), "an empty piece");
        assert!(refused(&|w| w.tokens[3] = "<0xZZ>".into()), "a byte piece that is no byte");
        assert!(refused(&|w| w.types[1] = 2), "two unknown pieces");
        assert!(refused(&|w| (w.types[0], w.unk) = (1, None)), "no unknown piece");
        assert!(!refused(&|w| (w.types[0], w.unk) = (3, Some(0))), "the named unknown token");
        assert!(refused(&|w| w.types.truncate(100)), "fewer types than tokens");
        assert!(refused(&|w| w.scores.truncate(319)), "fewer scores than tokens");
    }

    /// The fixture's SentencePiece model (written by sentencepiece itself) reads as its pieces:
    /// `<unk>` unknown, `<s>` and `</s>` control, the 256 byte pieces, then the rest normal with
    /// scores that fall; every prefix of the file and every one-byte change of its first 600
    /// bytes gives pieces or an error naming the file, never a panic.
    #[test]
    fn a_sentencepiece_model_reads_as_its_pieces_and_a_damaged_one_never_panics() {
        let path = crate::files::test_fixtures().join("tiny_spm_tokenizer/tokenizer.model");
        let pieces = sentencepiece_pieces(&path).expect("the fixture reads");
        assert_eq!(pieces.len(), 320);
        assert_eq!((pieces[0].0.as_str(), pieces[0].2), ("<unk>", 2));
        assert_eq!((pieces[1].0.as_str(), pieces[1].2), ("<s>", 3));
        assert_eq!((pieces[2].0.as_str(), pieces[2].2), ("</s>", 3));
        assert!(pieces[3..259].iter().enumerate().all(|(i, p)| p.0 == format!("<0x{i:02X}>") && p.2 == 6));
        assert!(pieces[259..].iter().all(|p| p.2 == 1));
        assert!(pieces[259..].windows(2).all(|w| w[0].1 >= w[1].1) && pieces[259].1 > pieces[319].1);
        let bytes = std::fs::read(&path).expect("read");
        let check = |b: &[u8]| {
            if let Err(e) = parse_pieces(b, &path) {
                assert!(e.to_string().contains("tokenizer.model: not a SentencePiece model"), "{e}");
            }
        };
        for n in 0..bytes.len() {
            check(&bytes[..n]);
        }
        for i in 0..600.min(bytes.len()) {
            let mut b = bytes.clone();
            b[i] ^= 0xa5;
            check(&b);
        }
    }

    /// A Phi-3 folder whose tokenizer llama.cpp's converter would not write is refused, naming
    /// the file: no `tokenizer_class`, a SentencePiece class with no `tokenizer.model`, and an
    /// added token past the vocabulary (the converter fails on each).
    #[test]
    fn a_phi3_tokenizer_the_converter_fails_on_is_refused_by_file() {
        let fx = crate::files::test_fixtures();
        let dir = std::env::temp_dir().join(format!("edgetune-phi3-vocab-{}", std::process::id()));
        let copy = |from: &str| {
            for e in std::fs::read_dir(fx.join(from)).expect("fixture").flatten() {
                std::fs::copy(e.path(), dir.join(e.file_name())).expect("copy");
            }
        };
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        copy("tiny_phi3");
        let err = |dir: &Path| gguf_metadata(dir, 320, ConverterClass::Phi3).expect_err("refused").to_string();
        let e = err(&dir);
        assert!(e.contains("tokenizer_config.json") && e.contains("no `tokenizer_class`"), "{e}");
        std::fs::write(dir.join("tokenizer_config.json"), r#"{"tokenizer_class": "LlamaTokenizer"}"#).expect("write");
        let e = err(&dir);
        assert!(e.contains("tokenizer.model") && e.contains("missing"), "{e}");
        copy("tiny_spm_tokenizer");
        assert!(gguf_metadata(&dir, 320, ConverterClass::Phi3).is_ok());
        let mut t: Json =
            serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).expect("read")).expect("JSON");
        t["added_tokens"].as_array_mut().expect("added").push(serde_json::json!({"id": 320, "content": "<extra>"}));
        std::fs::write(dir.join("tokenizer.json"), t.to_string()).expect("write");
        let e = err(&dir);
        assert!(e.contains("tokenizer.json") && e.contains("id 320, past the model's 320 tokens"), "{e}");
        // The other classes skip it, as the converter's `_set_vocab_sentencepiece` does.
        assert!(gguf_metadata(&dir, 320, ConverterClass::Llama).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A Gemma 3 `tokenizer.json` with fewer tokens than the model is refused: the converter
    /// would cut the embeddings to them while listing every id, a file llama.cpp refuses.
    #[test]
    fn a_gemma_tokenizer_shorter_than_the_model_is_refused() {
        let dir = crate::files::test_fixtures().join("tiny_gemma3");
        assert!(gguf_metadata(&dir, 323, ConverterClass::Gemma).is_ok());
        let e = gguf_metadata(&dir, 324, ConverterClass::Gemma).expect_err("refused").to_string();
        assert!(e.contains("tokenizer.json") && e.contains("has 323 tokens") && e.contains("324"), "{e}");
        // Other classes pad the missing ids, as the converter does.
        assert!(gguf_metadata(&dir, 324, ConverterClass::Plain).is_ok());
    }
}

//! Training records from files: Alpaca, ShareGPT and OpenAI-style chat as JSON arrays or JSON
//! lines, preference pairs in TRL's formats, and plain text files or folders. Every bad record is
//! reported with its file and line.

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::files;
use crate::tokenizer::Message;

/// A dataset file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Decided from the file: `.txt`/`.md` files and folders are text; JSON records by their keys.
    #[default]
    Auto,
    /// `instruction`, `input`, `output`, optional `system`.
    Alpaca,
    /// `conversations`: a list of `{from, value}` (from: system, human/user, gpt/assistant).
    Sharegpt,
    /// `messages`: a list of `{role, content}`.
    Openai,
    /// Plain text for continued pre-training.
    Text,
    /// Preference pairs for DPO, as TRL takes them: `prompt` (optional), `chosen` and
    /// `rejected`, each a string or a list of `{role, content}` messages.
    Preference,
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Format::Auto),
            "alpaca" => Ok(Format::Alpaca),
            "sharegpt" => Ok(Format::Sharegpt),
            "openai" | "messages" => Ok(Format::Openai),
            "text" => Ok(Format::Text),
            "preference" => Ok(Format::Preference),
            other => Err(Error::invalid(
                "data format",
                format!("`{other}` (expected auto, alpaca, sharegpt, openai, text or preference)"),
            )),
        }
    }
}

/// One training record before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A conversation: system, user and assistant messages in order.
    Chat(Vec<Message>),
    /// Plain text, trained on every token.
    Text(String),
    /// A preference pair (DPO): a prompt and two completions, the chosen one preferred.
    Preference(Preference),
}

/// A preference pair in one of TRL's formats, with the prompt made explicit.
#[derive(Debug, Clone, PartialEq)]
pub enum Preference {
    /// Conversations: the prompt's messages, then each completion's (assistant) messages.
    Chat {
        /// The conversation before the completions.
        prompt: Vec<Message>,
        /// The preferred completion.
        chosen: Vec<Message>,
        /// The other completion.
        rejected: Vec<Message>,
    },
    /// Plain text: the completion follows the prompt's text directly.
    Text {
        /// The text before the completions.
        prompt: String,
        /// The preferred completion.
        chosen: String,
        /// The other completion.
        rejected: String,
    },
}

/// A record and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Sourced {
    /// The record.
    pub record: Record,
    /// The file it was read from (or the label of records handed over in memory).
    pub file: PathBuf,
    /// 1-based line of the record (its first line in a JSON array).
    pub line: usize,
}

/// A record that could not be read.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRecord {
    /// The file it was read from (or the label of records handed over in memory).
    pub file: PathBuf,
    /// 1-based line of the record.
    pub line: usize,
    /// What is wrong with it and what was expected.
    pub what: String,
}

impl std::fmt::Display for BadRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.what)
    }
}

/// An error for the first of `bad` (naming its file and line), for callers that take no bad
/// record at all; `Ok` when there is none.
pub fn refuse_bad(bad: &[BadRecord]) -> Result<()> {
    match bad.first() {
        Some(b) => Err(Error::format(&b.file, format!("line {}: {}", b.line, b.what))),
        None => Ok(()),
    }
}

/// Reads every record of a file or folder. Bad records are collected, not fatal; the caller
/// decides (see `DataConfig::skip_bad_records`). Each file may hold at most
/// [`files::DATA_FILE_BYTES`]; `read_bytes` counts the bytes of every file read so far, which
/// together may be at most [`files::DATA_TOTAL_BYTES`].
pub fn read(path: &Path, format: Format, read_bytes: &mut u64) -> Result<(Vec<Sourced>, Vec<BadRecord>)> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
            .collect();
        files.sort();
        let mut out = (Vec::new(), Vec::new());
        for f in files {
            let fmt = if format == Format::Auto && !is_json(&f) { Format::Text } else { format };
            if fmt == Format::Text && is_json(&f) {
                continue;
            }
            if fmt != Format::Text && !is_json(&f) {
                continue;
            }
            let (r, b) = read_file(&f, fmt, read_bytes)?;
            out.0.extend(r);
            out.1.extend(b);
        }
        if out.0.is_empty() && out.1.is_empty() {
            return Err(Error::format(path, "the folder holds no data files (.json, .jsonl or text)"));
        }
        return Ok(out);
    }
    read_file(path, format, read_bytes)
}

/// Records handed over one by one as JSON texts (from an app's own store rather than a file):
/// each is one object of any format `read` accepts, and record i is reported as line i + 1 of
/// `name`.
pub fn read_records(name: &Path, records: &[String], format: Format) -> (Vec<Sourced>, Vec<BadRecord>) {
    let mut out = (Vec::new(), Vec::new());
    for (i, text) in records.iter().enumerate() {
        let parsed = serde_json::from_str::<Json>(text)
            .map_err(|e| format!("invalid JSON: {e}"))
            .and_then(|v| record(&v, format));
        match parsed {
            Ok(r) => out.0.push(Sourced { record: r, file: name.into(), line: i + 1 }),
            Err(what) => out.1.push(BadRecord { file: name.into(), line: i + 1, what }),
        }
    }
    out
}

fn is_json(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("json" | "jsonl"))
}

fn read_file(path: &Path, format: Format, read_bytes: &mut u64) -> Result<(Vec<Sourced>, Vec<BadRecord>)> {
    let (limit, what) = data_limit(*read_bytes);
    let hint = "; split a large file into several in a folder, or train on a part of the data";
    let text = files::read_text(path, limit, what, hint)?;
    *read_bytes += text.len() as u64;
    let format = if format == Format::Auto && !is_json(path) { Format::Text } else { format };
    if format == Format::Text {
        if text.trim().is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        return Ok((vec![Sourced { record: Record::Text(text), file: path.into(), line: 1 }], Vec::new()));
    }
    let mut values: Vec<(usize, std::result::Result<Json, String>)> = Vec::new();
    let first = text.trim_start();
    if first.starts_with('[') {
        // A JSON array: parse it whole; records get the line where each element starts.
        let arr: Json = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("line {}: invalid JSON: {e}", e.line())))?;
        let Json::Array(items) = arr else {
            return Err(Error::format(path, "expected a JSON array of records"));
        };
        let starts = element_lines(&text);
        for (i, v) in items.into_iter().enumerate() {
            values.push((starts.get(i).copied().unwrap_or(1), Ok(v)));
        }
    } else {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            values.push((i + 1, serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))));
        }
    }
    let mut records = Vec::new();
    let mut bad = Vec::new();
    for (line, v) in values {
        let parsed = v.and_then(|v| record(&v, format));
        match parsed {
            Ok(r) => records.push(Sourced { record: r, file: path.into(), line }),
            Err(what) => bad.push(BadRecord { file: path.into(), line, what }),
        }
    }
    Ok((records, bad))
}

/// The most bytes the next data file may hold after `read_bytes` were read, and what the limit
/// is called in its error.
fn data_limit(read_bytes: u64) -> (u64, &'static str) {
    let left = files::DATA_TOTAL_BYTES.saturating_sub(read_bytes);
    if left < files::DATA_FILE_BYTES {
        (left, "what is left of the training data's 4 GiB in all")
    } else {
        (files::DATA_FILE_BYTES, "one training data file")
    }
}

/// The 1-based line on which each top-level element of a JSON array starts.
fn element_lines(text: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let (mut depth, mut line, mut in_str, mut esc) = (0i32, 1usize, false, false);
    let mut expect = false;
    for ch in text.chars() {
        if ch == '\n' {
            line += 1;
        }
        if in_str {
            match (esc, ch) {
                (true, _) => esc = false,
                (false, '\\') => esc = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        if expect && !ch.is_whitespace() && ch != ']' {
            out.push(line);
            expect = false;
        }
        match ch {
            '"' => in_str = true,
            '[' | '{' => {
                depth += 1;
                if depth == 1 {
                    expect = true;
                }
            }
            ']' | '}' => depth -= 1,
            ',' if depth == 1 => expect = true,
            _ => {}
        }
    }
    out
}

fn string_field(o: &serde_json::Map<String, Json>, key: &str) -> std::result::Result<Option<String>, String> {
    match o.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("`{key}` should be a string, found {}", kind(other))),
    }
}

fn kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

/// One JSON value as a record of `format` (Auto picks by keys).
fn record(v: &Json, format: Format) -> std::result::Result<Record, String> {
    let o = v.as_object().ok_or_else(|| format!("expected a JSON object, found {}", kind(v)))?;
    let format = match format {
        Format::Auto if o.contains_key("messages") => Format::Openai,
        Format::Auto if o.contains_key("conversations") => Format::Sharegpt,
        Format::Auto if o.contains_key("instruction") => Format::Alpaca,
        Format::Auto if o.contains_key("text") => Format::Text,
        Format::Auto if o.contains_key("chosen") || o.contains_key("rejected") => Format::Preference,
        Format::Auto => {
            let keys: Vec<&String> = o.keys().collect();
            return Err(format!(
                "unknown format: keys {keys:?}; expected `messages` (OpenAI), `conversations` (ShareGPT), \
                 `instruction`/`output` (Alpaca), `text`, or `chosen`/`rejected` (preference)"
            ));
        }
        f => f,
    };
    match format {
        Format::Alpaca => {
            let instruction = string_field(o, "instruction")?.ok_or("missing `instruction`")?;
            let output = string_field(o, "output")?.ok_or("missing `output`")?;
            let input = string_field(o, "input")?.unwrap_or_default();
            let mut msgs = Vec::new();
            if let Some(s) = string_field(o, "system")?.filter(|s| !s.is_empty()) {
                msgs.push(Message::new("system", s));
            }
            let user = if input.trim().is_empty() { instruction } else { format!("{instruction}\n\n{input}") };
            msgs.push(Message::new("user", user));
            msgs.push(Message::new("assistant", output));
            Ok(Record::Chat(msgs))
        }
        Format::Sharegpt => {
            let turns = o.get("conversations").and_then(Json::as_array).ok_or("`conversations` should be a list")?;
            let mut msgs = Vec::new();
            for (i, t) in turns.iter().enumerate() {
                let t = t.as_object().ok_or_else(|| format!("conversations[{i}] should be an object"))?;
                let from = string_field(t, "from")?.ok_or_else(|| format!("conversations[{i}]: missing `from`"))?;
                let value = string_field(t, "value")?.ok_or_else(|| format!("conversations[{i}]: missing `value`"))?;
                let role = match from.as_str() {
                    "system" => "system",
                    "human" | "user" => "user",
                    "gpt" | "assistant" | "bot" => "assistant",
                    other => {
                        return Err(format!(
                            "conversations[{i}]: unknown speaker `{other}` (expected system, human or gpt)"
                        ));
                    }
                };
                msgs.push(Message::new(role, value));
            }
            Ok(Record::Chat(msgs))
        }
        Format::Openai => {
            let turns = o.get("messages").and_then(Json::as_array).ok_or("`messages` should be a list")?;
            Ok(Record::Chat(messages(turns, "messages")?))
        }
        Format::Text => Ok(Record::Text(string_field(o, "text")?.ok_or("missing `text`")?)),
        Format::Preference => preference(o).map(Record::Preference),
        Format::Auto => Err("could not tell the record's format".into()),
    }
}

/// `{role, content}` messages of the list `field`.
fn messages(turns: &[Json], field: &str) -> std::result::Result<Vec<Message>, String> {
    let mut msgs = Vec::new();
    for (i, t) in turns.iter().enumerate() {
        let t = t.as_object().ok_or_else(|| format!("{field}[{i}] should be an object"))?;
        let role = string_field(t, "role")?.ok_or_else(|| format!("{field}[{i}]: missing `role`"))?;
        if !matches!(role.as_str(), "system" | "user" | "assistant") {
            return Err(format!("{field}[{i}]: unknown role `{role}` (expected system, user or assistant)"));
        }
        let content = string_field(t, "content")?.ok_or_else(|| format!("{field}[{i}]: missing `content`"))?;
        msgs.push(Message::new(role, content));
    }
    Ok(msgs)
}

/// A preference field: text or messages.
enum Side {
    Text(String),
    Chat(Vec<Message>),
}

fn side(o: &serde_json::Map<String, Json>, key: &str) -> std::result::Result<Option<Side>, String> {
    match o.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(Side::Text(s.clone()))),
        Some(Json::Array(turns)) => Ok(Some(Side::Chat(messages(turns, key)?))),
        Some(other) => Err(format!("`{key}` should be a string or a list of messages, found {}", kind(other))),
    }
}

/// A TRL preference record. Without `prompt` (TRL's implicit prompt), the prompt is what
/// `chosen` and `rejected` share, as TRL's `extract_prompt` takes it: the messages before the
/// first that differs, or the characters before the first that differs (a space just before it
/// goes with the completions).
fn preference(o: &serde_json::Map<String, Json>) -> std::result::Result<Preference, String> {
    let chosen = side(o, "chosen")?.ok_or("missing `chosen`")?;
    let rejected = side(o, "rejected")?.ok_or("missing `rejected`")?;
    let prompt = side(o, "prompt")?;
    let p = match (prompt, chosen, rejected) {
        (Some(Side::Chat(prompt)), Side::Chat(chosen), Side::Chat(rejected)) => {
            Preference::Chat { prompt, chosen, rejected }
        }
        (Some(Side::Text(prompt)), Side::Text(chosen), Side::Text(rejected)) => {
            Preference::Text { prompt, chosen, rejected }
        }
        (None, Side::Chat(c), Side::Chat(r)) => {
            let n = c.len().min(r.len());
            if n == 0 {
                return Err("`chosen` and `rejected` must each hold at least one message".into());
            }
            // TRL's loop: the first index that differs, or the last one compared.
            let at = (0..n).find(|&i| c[i] != r[i]).unwrap_or(n - 1);
            Preference::Chat { prompt: c[..at].to_vec(), chosen: c[at..].to_vec(), rejected: r[at..].to_vec() }
        }
        (None, Side::Text(c), Side::Text(r)) => {
            let (cc, rc): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
            let n = cc.len().min(rc.len());
            let mut at = (0..n).find(|&i| cc[i] != rc[i]).unwrap_or(n.saturating_sub(1));
            if at == 0 {
                return Err("`chosen` and `rejected` share no prompt; give the prompt as `prompt`".into());
            }
            if cc[at - 1] == ' ' {
                at -= 1;
            }
            let split = |v: &[char]| (v[..at].iter().collect::<String>(), v[at..].iter().collect::<String>());
            let ((prompt, chosen), (_, rejected)) = (split(&cc), split(&rc));
            Preference::Text { prompt, chosen, rejected }
        }
        _ => {
            return Err("`prompt`, `chosen` and `rejected` must all be text or all be lists of messages".into());
        }
    };
    let same = match &p {
        Preference::Chat { chosen, rejected, .. } => chosen == rejected,
        Preference::Text { chosen, rejected, .. } => chosen == rejected,
    };
    if same {
        return Err("`chosen` and `rejected` are the same, so there is no preference to learn".into());
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_files_share_one_total_limit() {
        assert_eq!(data_limit(0), (files::DATA_FILE_BYTES, "one training data file"));
        let last_whole = files::DATA_TOTAL_BYTES - files::DATA_FILE_BYTES;
        assert_eq!(data_limit(last_whole).0, files::DATA_FILE_BYTES);
        assert_eq!(data_limit(last_whole + 5).0, files::DATA_FILE_BYTES - 5);
        assert!(data_limit(last_whole + 5).1.contains("4 GiB in all"));
        assert_eq!(data_limit(files::DATA_TOTAL_BYTES + 1).0, 0);
        assert_eq!(files::DATA_TOTAL_BYTES, 4 << 30, "the error's words name 4 GiB");
    }
}

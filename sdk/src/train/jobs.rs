//! The job files of `edgetune batch` (many adapters, one per user, from one loaded base model).
//!
//! JOBS is a JSONL file (one job per line; blank lines and lines starting with `#` are skipped)
//! or a folder of `.json` files (one job each, run in name order). A job is
//!
//! ```json
//! {"user": "alice", "data": "alice.jsonl", "config": {"epochs": 2, "lora": {"r": 8}}}
//! ```
//!
//! `data` is relative to the folder holding the job; `config` overrides the shared settings
//! (the TOML fields of `edgetune train`). The user id names the job's output folder, so it must
//! make a portable folder name and be unique without regard to case.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::train::TrainConfig;

/// One line or file of JOBS, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobSpec {
    user: String,
    data: PathBuf,
    #[serde(default)]
    config: Option<Value>,
}

/// A job ready to run: its settings are resolved and checked.
#[derive(Debug)]
pub struct Job {
    /// The user's id: their folder's name under the output folder.
    pub user: String,
    /// Their training data.
    pub data: PathBuf,
    /// The batch's settings with the job's own laid over them.
    pub config: TrainConfig,
}

/// One job as read, or why it cannot run, and where it came from, for messages
/// ("jobs.jsonl: line 3", "jobs/bob.json").
#[derive(Debug)]
pub struct Entry {
    /// Where the job was read ("jobs.jsonl: line 3", "jobs/bob.json").
    pub origin: String,
    /// The job, or why it cannot run.
    pub job: std::result::Result<Job, String>,
}

/// Reads JOBS: a JSONL file, or a folder of `.json` files (one job each, in name order). A job
/// that cannot run (bad JSON, settings or user id) is an entry with an error, so the batch can
/// record it and go on; a file that cannot be read, or holds no jobs, is an error.
pub fn read(path: &Path, base: &TrainConfig) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    let meta = std::fs::metadata(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    let io = |p: &Path| {
        let path = p.to_path_buf();
        move |e| Error::Io { path, source: e }
    };
    if meta.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io(path))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        for file in files {
            let text = crate::files::read_config(&file)?;
            entries.push(Entry { origin: file.display().to_string(), job: parse_job(&text, path, base) });
        }
    } else {
        let text = crate::files::read_config(path)?;
        entries = parse_lines(&text, path, base);
    }
    if entries.is_empty() {
        return Err(Error::Format {
            path: path.to_path_buf(),
            what: "holds no jobs (expected JSON lines, or .json files in a folder)".into(),
        });
    }
    mark_duplicates(&mut entries);
    Ok(entries)
}

/// The jobs of a JSONL file's text (`path` names it in messages, and relative data paths are
/// taken from its folder): one entry per line that is not blank or a `#` comment.
pub fn parse_lines(text: &str, path: &Path, base: &TrainConfig) -> Vec<Entry> {
    let folder = path.parent().unwrap_or(Path::new("."));
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        entries
            .push(Entry { origin: format!("{}: line {}", path.display(), i + 1), job: parse_job(line, folder, base) });
    }
    entries
}

/// User ids name folders: each must be unique, also where file names ignore case. A repeated
/// one becomes that entry's error.
pub fn mark_duplicates(entries: &mut [Entry]) {
    let mut seen = HashSet::new();
    for e in entries {
        if let Ok(job) = &e.job
            && !seen.insert(job.user.to_ascii_lowercase())
        {
            e.job = Err(format!(
                "user `{}` appears more than once (user ids that differ only in case are the same folder on \
                 Windows and macOS)",
                job.user
            ));
        }
    }
}

/// The longest user id (it names a folder, and paths have limits).
const MAX_USER_LEN: usize = 128;

/// Names Windows reserves for devices, with or without an extension.
const RESERVED: [&str; 22] = [
    "con", "prn", "aux", "nul", "com1", "com2", "com3", "com4", "com5", "com6", "com7", "com8", "com9", "lpt1", "lpt2",
    "lpt3", "lpt4", "lpt5", "lpt6", "lpt7", "lpt8", "lpt9",
];

/// A user id names the job's folder in OUTPUT on every platform: letters, digits and - _ . @,
/// not starting or ending with a dot, not a Windows device name, not the batch's own
/// summary.json, and at most `MAX_USER_LEN` (128) characters.
pub fn check_user(user: &str) -> std::result::Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "-_.@".contains(c);
    if user.is_empty() || user.starts_with('.') || !user.chars().all(ok_char) {
        return Err(format!("user `{user}`: expected letters, digits and - _ . @ (it names the job's folder)"));
    }
    let lower = user.to_ascii_lowercase();
    let stem = lower.split('.').next().unwrap_or("");
    let why = if user.len() > MAX_USER_LEN {
        Some(format!("longer than {MAX_USER_LEN} characters"))
    } else if user.ends_with('.') {
        Some("ends with a dot, which Windows drops from folder names".to_string())
    } else if RESERVED.contains(&stem) {
        Some(format!("`{stem}` is a device name on Windows"))
    } else if lower == "summary.json" {
        Some("the batch writes OUTPUT/summary.json".to_string())
    } else {
        None
    };
    match why {
        Some(why) => Err(format!("user `{user}`: not usable as a folder name: {why}")),
        None => Ok(()),
    }
}

/// One job's JSON text, its data path taken from `folder` when relative, its settings `base`
/// overlaid with its `config` and checked.
pub fn parse_job(text: &str, folder: &Path, base: &TrainConfig) -> std::result::Result<Job, String> {
    let spec: JobSpec = serde_json::from_str(text)
        .map_err(|e| format!("{e} (expected {{\"user\": ..., \"data\": ..., \"config\": {{...}}}})"))?;
    check_user(&spec.user)?;
    let mut settings = serde_json::to_value(base).map_err(|e| e.to_string())?;
    if let Some(overrides) = spec.config {
        if !overrides.is_object() {
            return Err("config: expected a JSON object of settings".into());
        }
        merge(&mut settings, overrides);
    }
    let config: TrainConfig = serde_json::from_value(settings).map_err(|e| format!("config: {e}"))?;
    config.validate().map_err(|e| format!("config: {e}"))?;
    let data = if spec.data.is_absolute() { spec.data } else { folder.join(spec.data) };
    Ok(Job { user: spec.user, data, config })
}

/// Overlays `top` on `base`, object by object.
fn merge(base: &mut Value, top: Value) {
    match (base, top) {
        (Value::Object(b), Value::Object(t)) => {
            for (k, v) in t {
                match b.get_mut(&k) {
                    Some(slot) if slot.is_object() && v.is_object() => merge(slot, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, t) => *b = t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_must_make_portable_folder_names() {
        for ok in ["alice", "bob.smith", "x@y.z", "com10", "console", "a-b_c"] {
            assert_eq!(check_user(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "expected letters"),
            ("../eve", "expected letters"),
            (".hidden", "expected letters"),
            ("name.", "ends with a dot"),
            ("CON", "device name"),
            ("nul.txt", "device name"),
            ("Lpt3", "device name"),
            ("Summary.JSON", "summary.json"),
            (&"a".repeat(129), "longer than 128"),
        ] {
            let err = check_user(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}

//! Atomic file writes: a file is written to a temporary name in the same folder and flushed to
//! disk, then renamed over the target, and the folder is flushed so the rename itself survives a
//! power cut. A crash or a full disk never leaves a half-written adapter or checkpoint behind:
//! the previous version stays intact. Temporary files that a killed process left behind are
//! removed by the next write of the same file.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The prefix of the temporary files of `name` (`.NAME.tmp` then the writer's process id).
fn tmp_prefix(name: &str) -> String {
    format!(".{name}.tmp")
}

fn parts(path: &Path) -> Result<(&Path, String)> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name =
        path.file_name().ok_or_else(|| Error::invalid("output path", format!("{} names no file", path.display())))?;
    Ok((dir, name.to_string_lossy().into_owned()))
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes).map_err(|e| Error::io(path, e)))
}

/// Writes `bytes` to `path` atomically and keeps what `path` held before as
/// [`previous`]`(path)`, so that a file found damaged later still has a good predecessor. At
/// every moment one of the two is a whole file.
pub fn write_atomic_keeping_previous(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = write_temporary(path, bytes)?;
    let fail = |e: std::io::Error, at: &Path| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(at, e)
    };
    if path.exists() {
        std::fs::rename(path, previous(path)).map_err(|e| fail(e, path))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| fail(e, path))?;
    sync_dir(path)
}

/// Where [`write_atomic_keeping_previous`] keeps the version before the last: `NAME.prev`.
pub fn previous(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".prev");
    PathBuf::from(p)
}

/// Writes and flushes `bytes` to a temporary file next to `path`, after removing temporary
/// files of the same name that dead writers left; returns its path.
pub fn write_temporary(path: &Path, bytes: &[u8]) -> Result<PathBuf> {
    write_temporary_with(path, |f| f.write_all(bytes).map_err(|e| Error::io(path, e)))
}

/// Writes `path` atomically with what `write` writes to it (buffered), for a file too large to
/// assemble in memory first. An error of `write` leaves no file behind, as a failed write does.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let tmp = write_temporary_with(path, write)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })?;
    sync_dir(path)
}

/// [`write_temporary`] with what `write` writes, through a buffer.
fn write_temporary_with(path: &Path, write: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<PathBuf> {
    let (dir, name) = parts(path)?;
    remove_stale_temporaries(dir, &name);
    let tmp = dir.join(format!("{}{}", tmp_prefix(&name), std::process::id()));
    let written = (|| {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| Error::io(path, e))?);
        write(&mut f)?;
        let f = f.into_inner().map_err(|e| Error::io(path, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(path, e))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map(|()| tmp)
}

/// Flushes the folder holding `path`, so a rename into it is on disk (where the platform can;
/// elsewhere a no-op).
pub fn sync_dir(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let (dir, _) = parts(path)?;
        let d = std::fs::File::open(dir).map_err(|e| Error::io(dir, e))?;
        d.sync_all().map_err(|e| Error::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// A temporary file older than this is stale even where it cannot be told whether its writer
/// still runs.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes temporary files of `name` in `dir` left by writers that are gone: on Linux, those
/// whose process id is not running; everywhere, those untouched for an hour.
fn remove_stale_temporaries(dir: &Path, name: &str) {
    let prefix = tmp_prefix(name);
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(pid) = file.to_str().and_then(|f| f.strip_prefix(&prefix)).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let old = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()) >= Some(STALE_AFTER);
        let dead = cfg!(target_os = "linux")
            && Path::new("/proc/self").exists()
            && !Path::new("/proc").join(pid.to_string()).exists();
        if old || dead {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("edgetune-atomic-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn the_previous_version_is_kept_and_each_step_leaves_a_whole_file() {
        let d = dir("keep");
        let p = d.join("ck.bin");
        write_atomic_keeping_previous(&p, b"one").expect("first");
        assert!(!previous(&p).exists(), "nothing before the first");
        write_atomic_keeping_previous(&p, b"two").expect("second");
        write_atomic_keeping_previous(&p, b"three").expect("third");
        assert_eq!(std::fs::read(&p).expect("read"), b"three");
        assert_eq!(std::fs::read(previous(&p)).expect("read"), b"two");
        let names: Vec<String> = std::fs::read_dir(&d)
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "no temporary file is left: {names:?}");
    }

    /// A temporary file from a process that no longer runs (a killed writer) is removed by the
    /// next write of that file; one of this process, or of another file, is not.
    #[cfg(target_os = "linux")]
    #[test]
    fn temporaries_of_dead_writers_are_removed() {
        let d = dir("stale");
        // Pids are below 2^22 on Linux, so this one runs nowhere.
        let dead = d.join(".out.json.tmp4294967");
        let other = d.join(".other.json.tmp4294967");
        for f in [&dead, &other] {
            std::fs::write(f, b"half").expect("write");
        }
        let alive_pid = std::os::unix::process::parent_id();
        let alive = d.join(format!(".out.json.tmp{alive_pid}"));
        std::fs::write(&alive, b"in progress").expect("write");
        write_atomic(&d.join("out.json"), b"{}").expect("write");
        assert!(!dead.exists(), "a dead writer's temporary is removed");
        assert!(other.exists() && alive.exists(), "another file's, and a running writer's, are kept");
        assert_eq!(std::fs::read(d.join("out.json")).expect("read"), b"{}");
    }
}

//! Job claims for `edgetune batch` workers that share an output folder (processes on one machine
//! or many, on a shared file system): a job is run by whoever creates its lock file, and the
//! holder keeps the file fresh (a heartbeat). A lock whose heartbeat is older than the stale
//! limit belongs to a worker that died, and another worker takes it over. The holder checks at
//! each heartbeat that the lock is still its own; a worker that finds it lost (it was stopped for
//! longer than the limit and another took over) stops its job and records nothing, so no job is
//! finished twice.
//!
//! Creation is atomic (`create_new`, O_EXCL, which NFS v3 and later honour); a takeover is
//! serialized by a second file created the same way, and made only if the lock still holds the
//! stale content that was read.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use edgetune::{Error, Result};

/// What a lock file says: who holds it, and since when.
fn content(worker: &str) -> String {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    format!("{{\"worker\": {:?}, \"claimed_unix_s\": {}}}\n", worker, now.as_secs())
}

/// A name for this process, unique across machines: host, process id and start time.
pub fn worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_else(|| "host".into());
    let t = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    format!("{host}:{}:{}", std::process::id(), t.as_nanos())
}

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.to_path_buf(), source }
}

/// Whether the lock file at `path` names `worker`.
fn holds(path: &Path, worker: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.contains(&format!("{worker:?}")))
}

/// Seconds since the file was last written (0 if the clock went back).
fn age(path: &Path) -> std::io::Result<Duration> {
    let modified = std::fs::metadata(path)?.modified()?;
    Ok(SystemTime::now().duration_since(modified).unwrap_or_default())
}

/// Creates `path` only if it does not exist, with `text` in it.
fn create_new(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// The outcome of [`try_claim`].
pub enum Claim {
    /// The job is ours until the lock is released.
    Mine(Lock),
    /// Another live worker holds it.
    Held,
}

/// A held lock: its heartbeat runs on a thread until it is dropped, which removes the file.
pub struct Lock {
    path: PathBuf,
    worker: String,
    lost: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    beat: Option<std::thread::JoinHandle<()>>,
}

impl Lock {
    /// Whether another worker has taken the lock over (this worker must then drop the job).
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst) || !self.still_mine()
    }

    fn still_mine(&self) -> bool {
        holds(&self.path, &self.worker)
    }

    /// A flag the heartbeat sets when the lock is lost.
    pub fn lost_flag(&self) -> Arc<AtomicBool> {
        self.lost.clone()
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.beat.take() {
            let _ = h.join();
        }
        if self.still_mine() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Timing of claims.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How often a holder refreshes its lock.
    pub heartbeat: Duration,
    /// A lock not refreshed for this long is taken over.
    pub stale: Duration,
}

/// Tries to claim the job whose lock file is `path` for `worker`.
pub fn try_claim(path: &Path, worker: &str, timing: Timing) -> Result<Claim> {
    let text = content(worker);
    match create_new(path, &text) {
        Ok(()) => return Ok(Claim::Mine(hold(path, worker, timing))),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(path, e)),
    }
    let held = std::fs::read_to_string(path).unwrap_or_default();
    let fresh = match age(path) {
        Ok(a) => a < timing.stale,
        // Released between our two looks: claim it on the next pass.
        Err(_) => true,
    };
    if fresh {
        return Ok(Claim::Held);
    }
    // Stale: take it over, one worker at a time.
    let mut takeover = path.as_os_str().to_owned();
    takeover.push(".takeover");
    let takeover = PathBuf::from(takeover);
    match create_new(&takeover, &text) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // A worker that died mid-takeover leaves this behind; clear it once it is stale.
            if age(&takeover).is_ok_and(|a| a >= timing.stale) {
                let _ = std::fs::remove_file(&takeover);
            }
            return Ok(Claim::Held);
        }
        Err(e) => return Err(io(&takeover, e)),
    }
    let still_stale =
        std::fs::read_to_string(path).is_ok_and(|t| t == held) && age(path).is_ok_and(|a| a >= timing.stale);
    let claim = if still_stale {
        let _ = std::fs::remove_file(path);
        match create_new(path, &text) {
            Ok(()) => Claim::Mine(hold(path, worker, timing)),
            Err(_) => Claim::Held,
        }
    } else {
        Claim::Held
    };
    let _ = std::fs::remove_file(&takeover);
    Ok(claim)
}

/// Starts the heartbeat of a lock just created.
fn hold(path: &Path, worker: &str, timing: Timing) -> Lock {
    let (lost, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let (p, w, l, s) = (path.to_path_buf(), worker.to_string(), lost.clone(), stop.clone());
    let beat = std::thread::spawn(move || {
        let tick = Duration::from_millis(100).min(timing.heartbeat);
        let mut since = Duration::ZERO;
        while !s.load(Ordering::SeqCst) {
            std::thread::sleep(tick);
            since += tick;
            if since < timing.heartbeat {
                continue;
            }
            since = Duration::ZERO;
            if !holds(&p, &w) {
                l.store(true, Ordering::SeqCst);
                return;
            }
            // Refresh: a new file renamed over the lock, so that a reader (this worker's own
            // `lost()` among them) never sees it half-written; the new file's time is now.
            let _ = edgetune::atomic::write_atomic(&p, content(&w).as_bytes());
        }
    });
    Lock { path: path.to_path_buf(), worker: worker.to_string(), lost, stop, beat: Some(beat) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("edgetune-claim-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    const FAST: Timing = Timing { heartbeat: Duration::from_millis(100), stale: Duration::from_millis(600) };

    #[test]
    fn one_worker_holds_a_job_and_a_live_holder_keeps_it() {
        let d = scratch("live");
        let path = d.join("job.lock");
        let Claim::Mine(lock) = try_claim(&path, "a", FAST).expect("claim") else { panic!("a free lock is claimed") };
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(120));
            assert!(matches!(try_claim(&path, "b", FAST).expect("claim"), Claim::Held), "the heartbeat keeps it");
        }
        assert!(!lock.lost());
        drop(lock);
        assert!(!path.exists(), "released");
        assert!(matches!(try_claim(&path, "b", FAST).expect("claim"), Claim::Mine(_)));
    }

    #[test]
    fn a_dead_holders_lock_is_taken_over_once_and_the_old_holder_learns_it_lost() {
        let d = scratch("stale");
        let path = d.join("job.lock");
        // A holder that stopped beating (killed): its file as it left it.
        std::fs::write(&path, content("dead")).expect("lock");
        assert!(matches!(try_claim(&path, "b", FAST).expect("claim"), Claim::Held), "fresh at first");
        std::thread::sleep(Duration::from_millis(700));
        // Several workers race for the stale lock: exactly one wins.
        let winners: Vec<Lock> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..6)
                .map(|i| {
                    s.spawn({
                        let path = path.clone();
                        move || try_claim(&path, &format!("w{i}"), FAST).expect("claim")
                    })
                })
                .collect();
            hs.into_iter()
                .filter_map(|h| match h.join().expect("thread") {
                    Claim::Mine(l) => Some(l),
                    Claim::Held => None,
                })
                .collect()
        });
        assert_eq!(winners.len(), 1, "one worker takes a stale lock over");
        // A holder whose lock was taken over sees it lost.
        let d2 = scratch("lost");
        let p2 = d2.join("job.lock");
        let Claim::Mine(old) = try_claim(&p2, "old", FAST).expect("claim") else { panic!("claimed") };
        std::fs::write(&p2, content("new")).expect("taken over");
        std::thread::sleep(Duration::from_millis(300));
        assert!(old.lost(), "the old holder learns it lost the job");
        drop(old);
        assert!(
            std::fs::read_to_string(&p2).expect("lock").contains("\"new\""),
            "dropping a lost lock leaves the new holder's"
        );
    }
}

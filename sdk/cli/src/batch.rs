//! `edgetune batch JOBS`: many adapters, one per user, from one loaded base model.
//!
//! JOBS is a JSONL file (one job per line; blank lines and lines starting with `#` are skipped)
//! or a folder of `.json` files (one job each, run in name order). A job is
//!
//! ```json
//! {"user": "alice", "data": "alice.jsonl", "config": {"epochs": 2, "lora": {"r": 8}}}
//! ```
//!
//! `data` is relative to the folder holding the job; `config` overrides the settings of
//! `--config` (the TOML fields of `edgetune train`). Each job writes
//!
//! ```text
//! OUTPUT/USER/adapter/                 the PEFT adapter
//! OUTPUT/USER/checkpoint.safetensors   for resuming
//! OUTPUT/USER/train_config.toml        the settings the job used
//! OUTPUT/USER/result.json              status, steps, validation loss, time (when it ended)
//! ```
//!
//! and the batch writes `OUTPUT/summary.json`. A re-run skips jobs whose result says done,
//! resumes the others from their checkpoints and retries failed ones. A failed job is recorded
//! and the batch goes on; Ctrl-C stops the running job at its next step, writes its checkpoint
//! and ends the batch.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgetune::atomic::write_atomic;
use edgetune::data;
use edgetune::gpu::{GpuContext, GpuOptions};
use edgetune::lora::peft;
use edgetune::model::llama::{LoadOptions, Model, Quant};
use edgetune::tokenizer::Tokenizer;
use edgetune::train::jobs::{self, Job};
use edgetune::train::{CancelToken, Event, StopReason, TrainConfig, Trainer};
use edgetune::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::claim;
use crate::interrupt::cancel_on_interrupt;
use crate::train::{CHECKPOINT_FILE, base_name, human_time, settings_toml};

#[derive(clap::Args)]
pub struct BatchArgs {
    /// A JSONL file of jobs, or a folder of .json job files.
    jobs: PathBuf,
    /// The base model every job trains on: a Hugging Face folder or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Output folder: one subfolder per user, and summary.json.
    #[arg(long)]
    output: PathBuf,
    /// A TOML file of settings shared by every job (a job's `config` overrides them).
    #[arg(long)]
    config: Option<PathBuf>,
    /// JSON lines on stdout even on a terminal (they are the default when stdout is not one).
    #[arg(long)]
    json: bool,
    /// KV-cache and sample length limit of the loaded model.
    #[arg(long, default_value_t = 2048)]
    max_context: usize,
    /// How the base's linear weights are held on the GPU, as `train --quant` takes it.
    #[arg(long, default_value = "gguf")]
    quant: Quant,
    /// Take only every N-th job, starting at job K (0-based): K/N. For job arrays (Slurm's
    /// SLURM_ARRAY_TASK_ID, Kubernetes' JOB_COMPLETION_INDEX); workers without it share all jobs.
    #[arg(long, value_name = "K/N")]
    shard: Option<Shard>,
    /// Workers sharing an output folder claim each job with a lock file that the holder refreshes
    /// this often (seconds).
    #[arg(long, default_value_t = 10.0)]
    heartbeat_s: f64,
    /// A lock not refreshed for this long (seconds) belongs to a worker that died: another
    /// worker takes the job over and resumes it from its checkpoint.
    #[arg(long, default_value_t = 120.0)]
    stale_after_s: f64,
}

/// Every N-th job from job K: `--shard K/N`.
#[derive(Debug, Clone, Copy)]
pub struct Shard {
    k: usize,
    n: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("`{s}`: expected K/N with 0 <= K < N, such as 0/4");
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (k, n): (usize, usize) = (k.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if k < n { Ok(Shard { k, n }) } else { Err(bad()) }
    }
}

/// What a job ended with: a row of the summary (and its result.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobResult {
    pub job: String,
    /// done, failed, interrupted or skipped (done in an earlier run).
    pub status: String,
    pub steps: u64,
    /// The validation loss of the adapter saved (the best one with `keep_best`, else the last
    /// evaluated); absent without a validation set.
    pub val_loss: Option<f32>,
    pub seconds: f64,
    pub adapter: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// The worker that ran it (host:process:start), when it ran.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub worker: Option<String>,
    /// When it ended (Unix seconds): a failure from before a worker started is retried, one
    /// from the same run is not.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ended_unix_s: Option<f64>,
}

impl JobResult {
    /// A job that has not run to an end: `status`, and nothing else yet.
    fn bare(job: String, status: &str) -> JobResult {
        JobResult {
            job,
            status: status.into(),
            steps: 0,
            val_loss: None,
            seconds: 0.0,
            adapter: None,
            error: None,
            worker: None,
            ended_unix_s: None,
        }
    }
}

/// The lines scripts read: one JSON object per line on stdout, `type` saying which.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Line<'a> {
    BatchStarted {
        jobs: usize,
        model: &'a Path,
        output: &'a Path,
    },
    JobStarted {
        job: &'a str,
        index: usize,
        jobs: usize,
        resume: bool,
    },
    Train {
        job: &'a str,
        #[serde(flatten)]
        event: &'a Event,
    },
    JobFinished(&'a JobResult),
    BatchFinished {
        done: usize,
        failed: usize,
        interrupted: usize,
        skipped: usize,
        summary: &'a Path,
    },
}

fn emit(line: &Line) {
    if let Ok(text) = serde_json::to_string(line) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    }
}

/// Progress on a terminal: the current job's bar over the batch's bar, redrawn in place.
struct Bars {
    jobs: usize,
    drawn: bool,
}

impl Bars {
    fn bar(done: f64, width: usize) -> String {
        let filled = ((done.clamp(0.0, 1.0) * width as f64) as usize).min(width);
        format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
    }

    fn clear(&mut self) {
        if self.drawn {
            eprint!("\x1b[1A\r\x1b[2K\x1b[1B\r\x1b[2K\x1b[1A\r");
            self.drawn = false;
        }
    }

    fn draw(&mut self, index: usize, user: &str, job_line: &str, job_done: f64) {
        self.clear();
        let overall = (index as f64 + job_done) / self.jobs as f64;
        eprint!(
            "{} {user}: {job_line}\n{} job {}/{}",
            Self::bar(job_done, 24),
            Self::bar(overall, 24),
            index + 1,
            self.jobs
        );
        self.drawn = true;
    }

    /// Prints a line above the bars.
    fn say(&mut self, text: &str) {
        self.clear();
        eprintln!("{text}");
    }
}

pub fn run(a: BatchArgs, gpu: &GpuOptions) -> Result<bool> {
    let base = match &a.config {
        Some(path) => {
            let text = edgetune::files::read_config(path)?;
            let c = toml::from_str::<TrainConfig>(&text)
                .map_err(|e| Error::Format { path: path.clone(), what: format!("invalid settings: {e}") })?;
            c.validate()?;
            c
        }
        None => TrainConfig::default(),
    };
    let entries = jobs::read(&a.jobs, &base)?;
    let cancel = CancelToken::default();
    cancel_on_interrupt(cancel.clone());
    let json = a.json || !std::io::stdout().is_terminal();
    let mut bars = (!json).then_some(Bars { jobs: entries.len(), drawn: false });

    let ctx = Arc::new(GpuContext::new(gpu)?);
    let tok = Tokenizer::open(&a.model)?;
    let load = LoadOptions { quant: a.quant, max_context: a.max_context, ..Default::default() };
    let model = Arc::new(Model::open(ctx, &a.model, &load)?);
    std::fs::create_dir_all(&a.output).map_err(|e| Error::Io { path: a.output.clone(), source: e })?;

    if json {
        emit(&Line::BatchStarted { jobs: entries.len(), model: &a.model, output: &a.output });
    }
    let me = claim::worker_id();
    let started_unix = unix_now();
    let timing = claim::Timing {
        heartbeat: Duration::from_secs_f64(a.heartbeat_s.max(0.05)),
        stale: Duration::from_secs_f64(a.stale_after_s.max(a.heartbeat_s * 2.0)),
    };
    let shard = a.shard.unwrap_or(Shard { k: 0, n: 1 });
    let mine: Vec<usize> = (0..entries.len()).filter(|i| i % shard.n == shard.k).collect();
    // This worker's results, by job index; jobs held by other workers are tried again after a
    // heartbeat, until they end or their holder's lock goes stale.
    let mut handled: std::collections::BTreeMap<usize, JobResult> = Default::default();
    // Jobs of this worker's share that other workers ended in this run.
    let mut elsewhere: std::collections::BTreeMap<usize, JobResult> = Default::default();
    loop {
        let mut waiting = false;
        for &index in &mine {
            if cancel.is_cancelled() {
                break;
            }
            if handled.contains_key(&index) || elsewhere.contains_key(&index) {
                continue;
            }
            let entry = &entries[index];
            let started = Instant::now();
            let job = match &entry.job {
                Ok(job) => job,
                Err(message) => {
                    let r = failed(&entry.origin, format!("{}: {message}", entry.origin), started);
                    report(&mut bars, json, index, entries.len(), &r);
                    handled.insert(index, r);
                    continue;
                }
            };
            let dir = a.output.join(&job.user);
            if let Some(r) = settled(&dir, started_unix) {
                settle(r, index, &mut handled, &mut elsewhere, &mut bars, json, entries.len());
                continue;
            }
            std::fs::create_dir_all(&dir).map_err(|e| Error::Io { path: dir.clone(), source: e })?;
            let lock = match claim::try_claim(&dir.join(LOCK_FILE), &me, timing)? {
                claim::Claim::Mine(lock) => lock,
                claim::Claim::Held => {
                    waiting = true;
                    continue;
                }
            };
            // Another worker may have ended it between the look above and the claim.
            if let Some(r) = settled(&dir, started_unix) {
                settle(r, index, &mut handled, &mut elsewhere, &mut bars, json, entries.len());
                continue;
            }
            let ckpt = dir.join(CHECKPOINT_FILE);
            // A kill between the two renames of a checkpoint write leaves only the one before it.
            let resume = ckpt.exists() || edgetune::atomic::previous(&ckpt).exists();
            let mut progress = |e: &Event| {
                if json {
                    emit(&Line::Train { job: &job.user, event: e });
                } else if let Some(b) = bars.as_mut() {
                    draw_event(b, index, &job.user, e);
                }
            };
            if json {
                emit(&Line::JobStarted { job: &job.user, index: index + 1, jobs: entries.len(), resume });
            }
            // The job stops at its next step on Ctrl-C, or when another worker took its lock.
            let job_cancel = CancelToken::default();
            let ran = {
                let (stop, lost, watched) = (cancel.clone(), lock.lost_flag(), job_cancel.clone());
                let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let finished = done.clone();
                let watcher = std::thread::spawn(move || {
                    while !finished.load(std::sync::atomic::Ordering::SeqCst) {
                        if stop.is_cancelled() || lost.load(std::sync::atomic::Ordering::SeqCst) {
                            watched.cancel();
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                });
                let ran = run_job(job, &dir, resume, &model, &tok, &job_cancel, &a.model, &mut progress);
                done.store(true, std::sync::atomic::Ordering::SeqCst);
                let _ = watcher.join();
                ran
            };
            let result = ran.unwrap_or_else(|e| failed(&job.user, e.to_string(), started));
            let result = JobResult {
                seconds: started.elapsed().as_secs_f64(),
                worker: Some(me.clone()),
                ended_unix_s: Some(unix_now()),
                ..result
            };
            if lock.lost() {
                // Another worker took the job over (this one was stopped for longer than the
                // stale limit): it is that worker's to finish and record.
                let r = JobResult { status: "lost".into(), ..result };
                report(&mut bars, json, index, entries.len(), &r);
                handled.insert(index, r);
                continue;
            }
            if result.status != "interrupted" {
                write_result(&dir, &result)?;
            }
            drop(lock);
            report(&mut bars, json, index, entries.len(), &result);
            handled.insert(index, result);
        }
        if !waiting || cancel.is_cancelled() {
            break;
        }
        std::thread::sleep(timing.heartbeat);
    }
    // This worker's results, then every other job as the output folder has it.
    let results: Vec<JobResult> = handled.values().cloned().collect();
    let summary_rows: Vec<JobResult> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| match handled.get(&i).or_else(|| elsewhere.get(&i)) {
            Some(r) => r.clone(),
            None => on_disk(&a.output, e),
        })
        .collect();
    if let Some(b) = bars.as_mut() {
        b.clear();
    }

    let count = |s: &str| results.iter().filter(|r| r.status == s).count();
    let summary_path = a.output.join("summary.json");
    let text = serde_json::to_string_pretty(&summary_rows)
        .map_err(|e| Error::Invalid { field: "summary".into(), what: e.to_string() })?;
    write_atomic(&summary_path, text.as_bytes())?;
    let (done, failures, interrupted, skipped) =
        (count("done"), count("failed"), count("interrupted"), count("skipped"));
    if json {
        emit(&Line::BatchFinished { done, failed: failures, interrupted, skipped, summary: &summary_path });
    }
    print_table(&results, mine.len() - elsewhere.len());
    if !elsewhere.is_empty() {
        eprintln!("{} more jobs of this worker's share were ended by other workers (summary.json)", elsewhere.len());
    }
    if interrupted > 0 || results.len() + elsewhere.len() < mine.len() {
        eprintln!("interrupted: run the same command again to resume");
    }
    let failed_elsewhere = elsewhere.values().filter(|r| r.status == "failed").count();
    let lost = count("lost");
    Ok(failures + failed_elsewhere == 0
        && interrupted == 0
        && lost == 0
        && results.len() + elsewhere.len() == mine.len())
}

/// The lock file a worker holds while it runs a job (see [`claim`]).
pub const LOCK_FILE: &str = ".lock";

/// Seconds since the Unix epoch, to the microsecond: a job that ended in the second this run
/// started is still told apart from one of this run.
fn unix_now() -> f64 {
    let t = std::time::SystemTime::now().duration_since(std::time::SystemTime::UNIX_EPOCH).unwrap_or_default();
    (t.as_micros() as f64) / 1e6
}

/// Records a job that needs no run: one done in an earlier run is this worker's (reported as
/// skipped); one another worker ended in this run is that worker's (listed, not reported).
fn settle(
    r: JobResult,
    index: usize,
    handled: &mut std::collections::BTreeMap<usize, JobResult>,
    elsewhere: &mut std::collections::BTreeMap<usize, JobResult>,
    bars: &mut Option<Bars>,
    json: bool,
    jobs: usize,
) {
    if r.status == "skipped" {
        report(bars, json, index, jobs, &r);
        handled.insert(index, r);
    } else {
        elsewhere.insert(index, r);
    }
}

/// A job that needs no run: done (in an earlier run: skipped; in this one, by another worker:
/// done), or failed in this run by another worker. A failure from before this worker started is
/// tried again.
fn settled(dir: &Path, started_unix: f64) -> Option<JobResult> {
    let r = previous_result(dir)?;
    let this_run = r.ended_unix_s.is_some_and(|t| t >= started_unix);
    match r.status.as_str() {
        "done" if this_run => Some(r),
        "done" => Some(JobResult { status: "skipped".into(), seconds: 0.0, ..r }),
        "failed" if this_run => Some(r),
        _ => None,
    }
}

/// A job this worker did not take, as the output folder has it: its result, else running (a
/// lock is there) or pending.
fn on_disk(output: &Path, entry: &jobs::Entry) -> JobResult {
    let name = entry.job.as_ref().map(|j| j.user.clone()).unwrap_or_else(|_| entry.origin.clone());
    let dir = output.join(&name);
    let status = if dir.join(LOCK_FILE).exists() { "running" } else { "pending" };
    previous_result(&dir).unwrap_or_else(|| JobResult::bare(name, status))
}

/// A job's end: a JSON line, or a line above the bars.
fn report(bars: &mut Option<Bars>, json: bool, index: usize, jobs: usize, result: &JobResult) {
    if json {
        emit(&Line::JobFinished(result));
    } else if let Some(b) = bars.as_mut() {
        let detail = match (&result.error, &result.adapter) {
            (Some(e), _) => format!(": {e}"),
            (None, Some(p)) => format!(" ({} steps, adapter {})", result.steps, p.display()),
            (None, None) => String::new(),
        };
        b.say(&format!("job {}/{jobs} {}: {}{detail}", index + 1, result.job, result.status));
    }
}

fn failed(job: &str, error: String, started: Instant) -> JobResult {
    JobResult {
        seconds: started.elapsed().as_secs_f64(),
        error: Some(error),
        ..JobResult::bare(job.to_string(), "failed")
    }
}

fn previous_result(dir: &Path) -> Option<JobResult> {
    let text = std::fs::read_to_string(dir.join("result.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_result(dir: &Path, result: &JobResult) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.to_path_buf(), source: e })?;
    let text = serde_json::to_string_pretty(result)
        .map_err(|e| Error::Invalid { field: "result".into(), what: e.to_string() })?;
    write_atomic(&dir.join("result.json"), text.as_bytes())
}

#[allow(clippy::too_many_arguments)]
fn run_job(
    job: &Job,
    dir: &Path,
    resume: bool,
    model: &Arc<Model>,
    tok: &Tokenizer,
    cancel: &CancelToken,
    model_path: &Path,
    progress: &mut dyn FnMut(&Event),
) -> Result<JobResult> {
    let dataset = data::load(&job.data, tok, &job.config.data)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.to_path_buf(), source: e })?;
    // A stale result (failed before) is no longer true once the job runs again.
    let _ = std::fs::remove_file(dir.join("result.json"));
    let mut trainer = Trainer::new(model.clone(), &dataset, job.config.clone())?;
    write_atomic(&dir.join("train_config.toml"), settings_toml(trainer.config(), trainer.chosen())?.as_bytes())?;
    trainer.set_cancel_token(cancel.clone());
    let ckpt = dir.join(CHECKPOINT_FILE);
    // Checkpoints that cannot be read at all (both the last and the one before it) would fail
    // the job on every run of the batch: they are moved aside and the job starts over.
    let mut unreadable = None;
    let resume = resume
        && match edgetune::train::checkpoint::Checkpoint::load_or_previous(&ckpt) {
            Ok(_) => true,
            Err(e) => {
                for bad in [ckpt.clone(), edgetune::atomic::previous(&ckpt)].into_iter().filter(|p| p.exists()) {
                    let mut aside = bad.clone().into_os_string();
                    aside.push(".unreadable");
                    std::fs::rename(&bad, &aside).map_err(|io| Error::Io { path: bad.clone(), source: io })?;
                }
                unreadable = Some(format!("{e}; set aside as *.unreadable, and the job started over"));
                false
            }
        };
    if let Some(message) = unreadable {
        progress(&Event::Warning { step: 0, message });
    }
    if resume {
        trainer.resume(&ckpt).map_err(|e| Error::Invalid {
            field: "checkpoint".into(),
            what: format!(
                "{e} (the job's settings or data changed since the checkpoint was written: delete {} to start over)",
                dir.display()
            ),
        })?;
    }
    trainer.set_checkpoint_path(&ckpt);
    let mut last_eval = None;
    let out = trainer.run(|e| {
        if let Event::Eval { val_loss, .. } = e {
            last_eval = Some(*val_loss);
        }
        progress(e);
    })?;
    if out.reason == StopReason::Cancelled {
        return Ok(JobResult { steps: out.steps, ..JobResult::bare(job.user.clone(), "interrupted") });
    }
    let adapter_dir = dir.join("adapter");
    peft::save(&adapter_dir, &out.adapter, &base_name(model_path))?;
    let val_loss = if trainer.config().keep_best == Some(true) { out.best_val_loss.or(last_eval) } else { last_eval };
    Ok(JobResult {
        job: job.user.clone(),
        status: "done".into(),
        steps: out.steps,
        val_loss,
        seconds: 0.0,
        adapter: Some(adapter_dir),
        error: None,
        worker: None,
        ended_unix_s: None,
    })
}

fn draw_event(b: &mut Bars, index: usize, user: &str, e: &Event) {
    match e {
        Event::Step { step, total_steps, loss, tokens_per_s, eta_s, .. } => {
            let line =
                format!("step {step}/{total_steps} loss {loss:.4} {tokens_per_s:.0} tok/s ETA {}", human_time(*eta_s));
            b.draw(index, user, &line, *step as f64 / (*total_steps).max(1) as f64);
        }
        Event::Warning { step, message } => b.say(&format!("{user}: warning at step {step}: {message}")),
        Event::Started { start_step, total_steps, .. } => {
            b.draw(index, user, "starting", *start_step as f64 / (*total_steps).max(1) as f64)
        }
        _ => {}
    }
}

fn print_table(results: &[JobResult], total: usize) {
    let rows: Vec<[String; 6]> = results
        .iter()
        .map(|r| {
            [
                r.job.clone(),
                r.steps.to_string(),
                r.val_loss.map(|l| format!("{l:.4}")).unwrap_or_else(|| "-".into()),
                human_time(r.seconds),
                r.adapter.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "-".into()),
                match &r.error {
                    Some(e) => format!("{}: {e}", r.status),
                    None => r.status.clone(),
                },
            ]
        })
        .collect();
    let head = ["job", "steps", "val loss", "time", "adapter", "status"];
    let mut width = head.map(str::len);
    for row in &rows {
        for (w, cell) in width.iter_mut().zip(row).take(5) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut err = std::io::stderr().lock();
    let line = |cells: [&str; 6]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i == 5 {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        s
    };
    let _ = writeln!(err);
    let _ = writeln!(err, "{}", line(head));
    for row in &rows {
        let _ = writeln!(err, "{}", line([&row[0], &row[1], &row[2], &row[3], &row[4], &row[5]]));
    }
    let count = |s: &str| results.iter().filter(|r| r.status == s).count();
    let _ = writeln!(
        err,
        "{} jobs: {} done, {} skipped (done before), {} failed, {} interrupted, {} not started",
        total,
        count("done"),
        count("skipped"),
        count("failed"),
        count("interrupted"),
        total - results.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended_at(dir: &Path, status: &str, t: f64) {
        let r = JobResult { ended_unix_s: Some(t), ..JobResult::bare("alice".into(), status) };
        write_result(dir, &r).expect("result");
    }

    /// A job that ended before this run started, in the same second, is an earlier run's: done is
    /// skipped, failed is tried again. One that ended after the start is this run's.
    #[test]
    fn this_run_is_told_apart_within_a_second() {
        let dir = std::env::temp_dir().join(format!("edgetune-settled-{}", std::process::id()));
        let start = 1_796_140_660.4;
        ended_at(&dir, "done", start - 0.3);
        assert_eq!(settled(&dir, start).map(|r| r.status), Some("skipped".to_string()));
        ended_at(&dir, "failed", start - 0.3);
        assert!(settled(&dir, start).is_none(), "an earlier failure is tried again");
        ended_at(&dir, "done", start + 0.2);
        assert_eq!(settled(&dir, start).map(|r| r.status), Some("done".to_string()));
        ended_at(&dir, "failed", start + 0.2);
        assert_eq!(settled(&dir, start).map(|r| r.status), Some("failed".to_string()));
        // A result written before the timestamps had fractions still reads.
        std::fs::write(
            dir.join("result.json"),
            r#"{"job":"alice","status":"done","steps":3,"seconds":1.0,"adapter":null,"ended_unix_s":1796140660}"#,
        )
        .expect("write");
        assert_eq!(settled(&dir, start).map(|r| r.status), Some("skipped".to_string()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

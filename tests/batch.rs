//! `edgetune batch` on the tiny Llama: three jobs, one with a broken dataset and one interrupted
//! (Ctrl-C) and resumed by a re-run, plus jobs that are wrong in themselves.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn tiny() -> String {
    common::fixtures().join("tiny_llama").display().to_string()
}

fn persona() -> PathBuf {
    common::fixtures().join("../../../sdk/data/persona/train.jsonl")
}

fn work_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("edgetune-batch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("work dir");
    dir
}

/// Settings every job shares: tiny steps, an evaluation every 2 steps.
const BASE: &str = "learning_rate = 0.01\nbatch_tokens = 128\neval_every = 2\nseed = 3\n\
                    [lora]\nr = 4\nalpha = 8\n[data]\nmax_len = 128\nval_fraction = 0.2\n";
const CAROL_STEPS: u64 = 40;

fn batch(jobs: &Path, out: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgetune-under-test"));
    cmd.arg("batch")
        .arg(jobs)
        .args(["--model", &tiny(), "--max-context", "256", "--json", "--config"])
        .arg(dir.join("base.toml"))
        .arg("--output")
        .arg(out);
    cmd
}

fn lines(stdout: &str) -> Vec<Value> {
    stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}"))).collect()
}

fn finished<'a>(events: &'a [Value], job: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["type"] == "job_finished" && e["job"] == job)
        .unwrap_or_else(|| panic!("no job_finished for {job}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn adapter_bytes(dir: &Path) -> Vec<u8> {
    let file = dir.join("adapter/adapter_model.safetensors");
    std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

#[test]
fn three_jobs_one_broken_one_interrupted_and_resumed() {
    let dir = work_dir("three");
    std::fs::write(dir.join("base.toml"), BASE).expect("write");
    std::fs::copy(persona(), dir.join("alice.jsonl")).expect("copy");
    std::fs::copy(persona(), dir.join("carol.jsonl")).expect("copy");
    let first = std::fs::read_to_string(persona()).expect("read").lines().next().expect("a line").to_string();
    std::fs::write(dir.join("bob.jsonl"), format!("{first}\n{{\"messages\": [{{\"role\": \"user\"\n")).expect("write");
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(
        &jobs,
        format!(
            "# user, data (relative to this file), settings over base.toml\n\
             {{\"user\": \"alice\", \"data\": \"alice.jsonl\", \"config\": {{\"max_steps\": 3}}}}\n\
             {{\"user\": \"bob\", \"data\": \"bob.jsonl\"}}\n\
             {{\"user\": \"carol\", \"data\": \"carol.jsonl\", \"config\": {{\"max_steps\": {CAROL_STEPS}, \"checkpoint_every\": 1}}}}\n"
        ),
    )
    .expect("write");
    let out = dir.join("out");

    // First run: Ctrl-C (SIGINT) once carol has taken two steps.
    let mut child = batch(&jobs, &out, &dir).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("runs");
    let pid = child.id().to_string();
    let mut first_run = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let line = line.expect("a line");
        let event: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
        if event["job"] == "carol" && event["event"] == "step" && event["step"] == 2 {
            let kill = Command::new("kill").args(["-INT", &pid]).status().expect("kill runs");
            assert!(kill.success());
        }
        first_run.push(event);
    }
    let status = child.wait().expect("exits");
    assert!(!status.success(), "a failed and an interrupted job make the exit status non-zero");
    assert_eq!(finished(&first_run, "alice")["status"], "done");
    let bob = finished(&first_run, "bob");
    assert_eq!(bob["status"], "failed");
    let error = bob["error"].as_str().expect("bob's error");
    assert!(error.contains("bob.jsonl: line 2"), "the error names the file and line: {error}");
    let carol = finished(&first_run, "carol");
    assert_eq!(carol["status"], "interrupted", "{carol}");
    let stopped_at = carol["steps"].as_u64().expect("steps");
    assert!((2..CAROL_STEPS).contains(&stopped_at), "carol stopped at step {stopped_at}");
    assert!(!out.join("carol/result.json").exists(), "an interrupted job has no result yet");
    assert!(out.join("carol/checkpoint.safetensors").exists());
    assert!(out.join("alice/adapter/adapter_config.json").exists());

    // Second run: alice is skipped, bob fails again, carol resumes where it stopped.
    let rerun = batch(&jobs, &out, &dir).output().expect("runs");
    let stderr = text(&rerun.stderr);
    assert!(!rerun.status.success(), "bob still fails: {stderr}");
    let second = lines(&text(&rerun.stdout));
    assert_eq!(finished(&second, "alice")["status"], "skipped");
    assert_eq!(finished(&second, "alice")["steps"], 3);
    assert_eq!(finished(&second, "bob")["status"], "failed");
    let started = second.iter().find(|e| e["type"] == "job_started" && e["job"] == "carol").expect("carol starts");
    assert_eq!(started["resume"], true);
    let train_start =
        second.iter().find(|e| e["job"] == "carol" && e["event"] == "started").expect("carol's started event");
    assert_eq!(train_start["start_step"], stopped_at, "carol resumes from the step it stopped at");
    let carol = finished(&second, "carol");
    assert_eq!(carol["status"], "done", "{carol}");
    assert_eq!(carol["steps"], CAROL_STEPS);
    assert!(carol["val_loss"].as_f64().is_some_and(f64::is_finite));
    assert!(second.iter().all(|e| e["job"] != "alice" || e["type"] != "train"), "alice must not train again");
    let end = second.last().expect("lines");
    assert_eq!(
        (end["type"].as_str(), end["done"].as_u64(), end["failed"].as_u64()),
        (Some("batch_finished"), Some(1), Some(1))
    );
    assert_eq!(end["skipped"], 1);

    // The summary: a table on stderr and summary.json.
    for word in ["job", "steps", "val loss", "time", "adapter", "status", "alice", "skipped", "bob", "failed", "carol"]
    {
        assert!(stderr.contains(word), "the table lacks {word}:\n{stderr}");
    }
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).expect("summary.json")).expect("JSON");
    let statuses: Vec<&str> = summary.as_array().expect("rows").iter().filter_map(|r| r["status"].as_str()).collect();
    assert_eq!(statuses, ["skipped", "failed", "done"]);

    // Interrupted and resumed, carol's adapter is byte for byte the one an uninterrupted run
    // gives (here from a folder of job files, with an absolute data path).
    let folder = dir.join("one");
    std::fs::create_dir_all(&folder).expect("mkdir");
    let job = serde_json::json!({
        "user": "carol", "data": dir.join("carol.jsonl"), "config": {"max_steps": CAROL_STEPS, "checkpoint_every": 1}
    });
    std::fs::write(folder.join("carol.json"), job.to_string()).expect("write");
    let reference = batch(&folder, &dir.join("ref"), &dir).output().expect("runs");
    assert!(reference.status.success(), "{}", text(&reference.stderr));
    assert_eq!(adapter_bytes(&out.join("carol")), adapter_bytes(&dir.join("ref/carol")));
    assert_ne!(adapter_bytes(&out.join("carol")), adapter_bytes(&out.join("alice")));
}

/// Jobs that are wrong in themselves are recorded with their line, and the others still run.
#[test]
fn bad_jobs_are_recorded_with_their_line_and_the_rest_run() {
    let dir = work_dir("bad");
    std::fs::write(dir.join("base.toml"), BASE).expect("write");
    let data = persona().display().to_string();
    let jobs = dir.join("jobs.jsonl");
    let lines_in = [
        format!("{{\"user\": \"dave\", \"data\": {data:?}, \"config\": {{\"learning_rat\": 1}}}}"),
        format!("{{\"user\": \"../eve\", \"data\": {data:?}}}"),
        "{\"user\": \"frank\"}".to_string(),
        format!("{{\"user\": \"gina\", \"data\": {data:?}, \"config\": {{\"max_steps\": 1}}}}"),
        format!("{{\"user\": \"Gina\", \"data\": {data:?}}}"),
        "not json".to_string(),
        format!("{{\"user\": \"aux\", \"data\": {data:?}}}"),
    ];
    std::fs::write(&jobs, lines_in.join("\n")).expect("write");
    let out: Output = batch(&jobs, &dir.join("out"), &dir).output().expect("runs");
    assert!(!out.status.success());
    let events = lines(&text(&out.stdout));
    let errors: Vec<(String, String)> = events
        .iter()
        .filter(|e| e["type"] == "job_finished" && e["status"] == "failed")
        .map(|e| (e["job"].as_str().unwrap_or("").to_string(), e["error"].as_str().unwrap_or("").to_string()))
        .collect();
    let expect = [
        ("line 1", "learning_rat"),
        ("line 2", "../eve"),
        ("line 3", "missing field `data`"),
        ("line 5", "appears more than once"),
        ("line 6", "expected"),
        ("line 7", "device name"),
    ];
    assert_eq!(errors.len(), expect.len(), "{errors:?}");
    for ((job, error), (line, what)) in errors.iter().zip(expect) {
        assert!(error.contains(line) && error.contains(what), "{job}: {error} (expected {line} and {what})");
    }
    let gina = finished(&events, "gina");
    assert_eq!((gina["status"].as_str(), gina["steps"].as_u64()), (Some("done"), Some(1)));

    // A jobs file that does not exist, or holds no jobs, is an error before anything loads.
    let none = batch(&dir.join("missing.jsonl"), &dir.join("out2"), &dir).output().expect("runs");
    assert!(!none.status.success() && text(&none.stderr).contains("missing.jsonl"), "{}", text(&none.stderr));
    std::fs::write(dir.join("empty.jsonl"), "# nothing\n\n").expect("write");
    let empty = batch(&dir.join("empty.jsonl"), &dir.join("out3"), &dir).output().expect("runs");
    assert!(text(&empty.stderr).contains("holds no jobs"), "{}", text(&empty.stderr));
}

/// DPO jobs (`"method": "dpo"`) train preference pairs beside supervised jobs in one batch, with
/// the rewards in their step events; a job whose method does not fit its data fails, naming why.
#[test]
fn dpo_jobs_train_preference_pairs_beside_supervised_ones() {
    let dir = work_dir("dpo");
    std::fs::write(dir.join("base.toml"), BASE).expect("write");
    let (persona, pairs) = (persona().display().to_string(), feedback().display().to_string());
    let jobs = dir.join("jobs.jsonl");
    let lines_in = [
        format!("{{\"user\": \"alice\", \"data\": {persona:?}, \"config\": {{\"max_steps\": 2}}}}"),
        format!(
            "{{\"user\": \"dora\", \"data\": {pairs:?}, \"config\": {{\"method\": \"dpo\", \"max_steps\": 4, \"batch_tokens\": 512}}}}"
        ),
        format!("{{\"user\": \"ed\", \"data\": {persona:?}, \"config\": {{\"method\": \"dpo\", \"max_steps\": 1}}}}"),
        format!("{{\"user\": \"fay\", \"data\": {pairs:?}, \"config\": {{\"max_steps\": 1}}}}"),
    ];
    // A pair packs both its sequences into one unit (up to 2 x max_len tokens), so dora's steps
    // are larger than the supervised jobs'.
    std::fs::write(&jobs, lines_in.join("\n")).expect("write");
    let out = dir.join("out");
    let run: Output = batch(&jobs, &out, &dir).output().expect("runs");
    let events = lines(&text(&run.stdout));
    assert_eq!(finished(&events, "alice")["status"], "done");
    let dora = finished(&events, "dora");
    assert_eq!((dora["status"].as_str(), dora["steps"].as_u64()), (Some("done"), Some(4)), "{dora}");
    assert!(out.join("dora/adapter/adapter_model.safetensors").exists());
    let steps: Vec<&Value> = events.iter().filter(|e| e["job"] == "dora" && e["event"] == "step").collect();
    assert_eq!(steps.len(), 4);
    for s in &steps {
        let r = &s["rewards"];
        let (c, j, m) = (r["chosen"].as_f64(), r["rejected"].as_f64(), r["margins"].as_f64());
        assert!(c.is_some() && j.is_some() && m.is_some(), "a DPO step reports its rewards: {s}");
    }
    // The supervised job's steps carry none.
    assert!(events.iter().filter(|e| e["job"] == "alice" && e["event"] == "step").all(|e| e["rewards"].is_null()));
    let ed = finished(&events, "ed")["error"].as_str().unwrap_or("").to_string();
    assert!(ed.contains("DPO trains on preference pairs") && ed.contains("train.jsonl"), "{ed}");
    let fay = finished(&events, "fay")["error"].as_str().unwrap_or("").to_string();
    assert!(fay.contains("preference pairs") && fay.contains("method = \"dpo\""), "{fay}");
    assert!(!run.status.success(), "two jobs failed");
}

fn feedback() -> PathBuf {
    common::fixtures().join("../../../sdk/data/feedback/train.jsonl")
}

/// Three workers share nine jobs through lock files; one is killed (SIGKILL) in the middle of a
/// job. Every job ends done exactly once, and the killed job is taken over once its lock goes
/// stale and resumed from its checkpoint, to the adapter an uninterrupted run gives.
#[test]
fn three_workers_share_nine_jobs_and_one_killed_workers_job_is_taken_over() {
    let dir = work_dir("workers");
    std::fs::write(dir.join("base.toml"), BASE).expect("write");
    std::fs::copy(persona(), dir.join("data.jsonl")).expect("copy");
    let users: Vec<String> = (0..9).map(|i| format!("u{i}")).collect();
    let job = |u: &str| {
        format!(
            "{{\"user\": \"{u}\", \"data\": \"data.jsonl\", \"config\": {{\"max_steps\": 8, \"checkpoint_every\": 1}}}}\n"
        )
    };
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(&jobs, users.iter().map(|u| job(u)).collect::<String>()).expect("write");
    let out = dir.join("out");
    let worker = || {
        let mut cmd = batch(&jobs, &out, &dir);
        cmd.args(["--heartbeat-s", "0.2", "--stale-after-s", "3"]).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.spawn().expect("a worker runs")
    };
    let mut victim = worker();
    let others: Vec<_> = (0..2).map(|_| worker()).collect();
    // The first worker is killed once a job of its own has checkpointed its third step.
    let mut killed_job = None;
    let mut victim_lines = Vec::new();
    for line in BufReader::new(victim.stdout.take().expect("stdout")).lines() {
        let line = line.expect("a line");
        let event: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
        if event["event"] == "checkpoint" && event["step"] == 3 {
            killed_job = event["job"].as_str().map(String::from);
            victim.kill().expect("SIGKILL");
            break;
        }
        victim_lines.push(event);
    }
    let _ = victim.wait();
    let killed = killed_job.expect("the first worker reached a third step");
    let mut events = Vec::new();
    for child in others {
        let run = child.wait_with_output().expect("a worker ends");
        assert!(run.status.success(), "a surviving worker: {}", text(&run.stderr));
        events.extend(lines(&text(&run.stdout)));
    }
    // Every job done exactly once, by one of the workers.
    let done_by_victim: Vec<&str> = victim_lines
        .iter()
        .filter(|e| e["type"] == "job_finished" && e["status"] == "done")
        .filter_map(|e| e["job"].as_str())
        .collect();
    for u in &users {
        let by_others =
            events.iter().filter(|e| e["type"] == "job_finished" && e["job"] == *u && e["status"] == "done").count();
        let by_victim = done_by_victim.iter().filter(|j| **j == u.as_str()).count();
        assert_eq!(
            by_others + by_victim,
            1,
            "{u}: done {by_others} times by the survivors and {by_victim} by the killed worker"
        );
        let result: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(u).join("result.json")).expect("result"))
                .expect("JSON");
        assert_eq!(result["status"], "done", "{u}: {result}");
        assert!(!out.join(u).join(".lock").exists(), "{u}: the lock is released");
    }
    // The killed job was taken over and resumed from its checkpoint.
    let started =
        events.iter().find(|e| e["type"] == "job_started" && e["job"] == killed.as_str()).expect("taken over");
    assert_eq!(started["resume"], true, "{started}");
    let train_start = events
        .iter()
        .find(|e| e["type"] == "train" && e["job"] == killed.as_str() && e["event"] == "started")
        .expect("started");
    assert!(train_start["start_step"].as_u64() >= Some(3), "resumed from the checkpoint: {train_start}");
    // The summary of the last worker to end holds every job.
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).expect("summary")).expect("JSON");
    let rows = summary.as_array().expect("rows");
    assert_eq!(rows.len(), 9);
    assert!(rows.iter().all(|r| r["status"] == "done" || r["status"] == "skipped"), "{summary}");
    // Resumed on another worker, the adapter is the one an uninterrupted run gives.
    let alone = dir.join("alone");
    std::fs::write(dir.join("one.jsonl"), job(&killed)).expect("write");
    let reference = batch(&dir.join("one.jsonl"), &alone, &dir).output().expect("runs");
    assert!(reference.status.success(), "{}", text(&reference.stderr));
    assert!(
        adapter_bytes(&out.join(&killed)) == adapter_bytes(&alone.join(&killed)),
        "{killed}: the resumed adapter differs"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--shard K/N` takes every N-th job from job K; a bad shard is refused.
#[test]
fn a_shard_takes_every_nth_job() {
    let dir = work_dir("shard");
    std::fs::write(dir.join("base.toml"), BASE).expect("write");
    std::fs::copy(persona(), dir.join("data.jsonl")).expect("copy");
    let jobs = dir.join("jobs.jsonl");
    let text_jobs: String = (0..5)
        .map(|i| format!("{{\"user\": \"s{i}\", \"data\": \"data.jsonl\", \"config\": {{\"max_steps\": 1}}}}\n"))
        .collect();
    std::fs::write(&jobs, text_jobs).expect("write");
    let out = dir.join("out");
    let run = batch(&jobs, &out, &dir).args(["--shard", "1/2"]).output().expect("runs");
    assert!(run.status.success(), "{}", text(&run.stderr));
    let done: Vec<String> = lines(&text(&run.stdout))
        .iter()
        .filter(|e| e["type"] == "job_finished")
        .map(|e| format!("{}={}", e["job"].as_str().unwrap_or(""), e["status"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(done, ["s1=done", "s3=done"]);
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).expect("summary")).expect("JSON");
    let statuses: Vec<&str> = summary.as_array().expect("rows").iter().filter_map(|r| r["status"].as_str()).collect();
    assert_eq!(statuses, ["pending", "done", "pending", "done", "pending"], "the other shards' jobs are listed too");
    for bad in ["2/2", "1", "a/3"] {
        let run = batch(&jobs, &out, &dir).args(["--shard", bad]).output().expect("runs");
        assert!(!run.status.success() && text(&run.stderr).contains("K/N"), "{bad}: {}", text(&run.stderr));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

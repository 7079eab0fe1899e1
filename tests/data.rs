//! The data pipeline on the tiny model's tokenizer and ChatML template: formats, loss masking,
//! cleaning, the split, packing, and a clear error (file and line) for every kind of bad input.

mod common;

use std::path::{Path, PathBuf};

use common::fixtures;
use edgetune::data::{self, DataConfig, Dedup, Format, Truncation};
use edgetune::tokenizer::Tokenizer;

fn tok() -> Tokenizer {
    Tokenizer::open(&fixtures().join("tiny_llama")).expect("tokenizer")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("edgetune-data-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn cfg() -> DataConfig {
    DataConfig { val_fraction: Some(0.0), ..Default::default() }
}

fn err(path: &Path, cfg: &DataConfig) -> String {
    data::load(path, &tok(), cfg).expect_err("should fail").to_string()
}

#[test]
fn three_chat_formats_give_the_same_tokens_and_only_the_answer_is_trained() {
    let d = tmp("formats");
    let alpaca = write(
        &d,
        "a.jsonl",
        r#"{"instruction": "Name a capital.", "input": "", "output": "Paris is one.", "system": "Be brief."}"#,
    );
    let sharegpt = write(
        &d,
        "s.json",
        r#"[{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Name a capital."}, {"from": "gpt", "value": "Paris is one."}]}]"#,
    );
    let openai = write(
        &d,
        "o.jsonl",
        r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a capital."}, {"role": "assistant", "content": "Paris is one."}]}"#,
    );
    let t = tok();
    let sets: Vec<_> =
        [&alpaca, &sharegpt, &openai].iter().map(|p| data::load(p, &t, &cfg()).expect("loads")).collect();
    let s = &sets[0].train[0];
    for other in &sets[1..] {
        assert_eq!(other.train[0].ids, s.ids);
        assert_eq!(other.train[0].train, s.train);
    }
    let trained: Vec<u32> = s.ids.iter().zip(&s.train).filter(|(_, t)| **t).map(|(&i, _)| i).collect();
    let text = t.decode(&trained).expect("decode");
    assert!(text.starts_with("Paris is one.<|im_end|>"), "trained text: {text:?}");
    let untrained: Vec<u32> = s.ids.iter().zip(&s.train).filter(|(_, t)| !**t).map(|(&i, _)| i).collect();
    let prompt = t.decode(&untrained).expect("decode");
    assert!(prompt.contains("Name a capital.") && !prompt.contains("Paris"), "untrained text: {prompt:?}");

    let all = data::load(&alpaca, &t, &DataConfig { train_on: data::TrainOn::All, ..cfg() }).expect("loads");
    assert_eq!(all.train[0].n_trained(), s.ids.len() - 1, "train_on = all trains every token but the first");
}

#[test]
fn a_configured_system_message_fills_in_only_where_a_record_has_none() {
    let d = tmp("system");
    let own = write(
        &d,
        "own.jsonl",
        r#"{"instruction": "Name a capital.", "input": "", "output": "Paris is one.", "system": "Be brief."}"#,
    );
    let none = write(&d, "none.jsonl", r#"{"instruction": "Name a capital.", "input": "", "output": "Paris is one."}"#);
    let t = tok();
    let with = |system: &str| DataConfig { system: Some(system.into()), ..cfg() };
    let reference = data::load(&own, &t, &cfg()).expect("loads").train.remove(0);
    let filled = data::load(&none, &t, &with("Be brief.")).expect("loads").train.remove(0);
    assert_eq!(filled.ids, reference.ids, "the configured system message renders like a record's own");
    assert_eq!(filled.train, reference.train);
    let kept = data::load(&own, &t, &with("Be verbose.")).expect("loads").train.remove(0);
    assert_eq!(kept.ids, reference.ids, "a record's own system message wins");
    let plain = data::load(&none, &t, &cfg()).expect("loads").train.remove(0);
    assert_ne!(plain.ids, reference.ids, "without one, the template's default applies");
}

#[test]
fn a_broken_json_line_names_its_file_and_line_and_can_be_skipped() {
    let d = tmp("broken");
    let good = r#"{"instruction": "Hi", "output": "Hello"}"#;
    let p = write(&d, "d.jsonl", &format!("{good}\n{{\"instruction\": \"x\", \n{}\n", good.replace("Hi", "Hey")));
    let e = err(&p, &cfg());
    assert!(e.contains("d.jsonl") && e.contains("line 2") && e.contains("invalid JSON"), "{e}");
    let ok = data::load(&p, &tok(), &DataConfig { skip_bad_records: true, ..cfg() }).expect("skips");
    assert_eq!((ok.report.bad_records, ok.train.len()), (1, 2));
}

#[test]
fn unknown_format_no_assistant_turn_and_empty_data_are_clear_errors() {
    let d = tmp("bad");
    let p = write(&d, "u.jsonl", "{\"question\": \"a\", \"answer\": \"b\"}\n");
    let e = err(&p, &cfg());
    assert!(e.contains("line 1") && e.contains("unknown format") && e.contains("question"), "{e}");

    let p = write(&d, "n.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n");
    let e = err(&p, &cfg());
    assert!(e.contains("n.jsonl") && e.contains("line 1") && e.contains("no assistant turn"), "{e}");

    let p = write(&d, "e.jsonl", "\n\n");
    let e = err(&p, &cfg());
    assert!(e.contains("e.jsonl") && e.contains("no records"), "{e}");

    let e = data::load(&p, &tok(), &DataConfig { format: "yaml".parse().unwrap_or(Format::Auto), ..cfg() });
    assert!(e.is_err());
    assert!("yaml".parse::<Format>().expect_err("unknown").to_string().contains("expected auto, alpaca"));
}

#[test]
fn every_sample_too_long_is_a_clear_error_and_truncation_keeps_the_start() {
    let d = tmp("long");
    let p = write(
        &d,
        "l.jsonl",
        "{\"instruction\": \"Tell me a long story please\", \"output\": \"Once upon a time there was a fox.\"}\n",
    );
    let e = err(&p, &DataConfig { max_len: 8, truncation: Truncation::Drop, ..cfg() });
    assert!(e.contains("longer than max_len = 8"), "{e}");
    let full = data::load(&p, &tok(), &cfg()).expect("loads");
    let n = full.train[0].ids.len();
    let cut = data::load(&p, &tok(), &DataConfig { max_len: n - 3, ..cfg() }).expect("truncates");
    assert_eq!(cut.report.truncated, 1);
    assert_eq!(cut.train[0].ids[..], full.train[0].ids[..n - 3]);
}

#[test]
fn dedup_split_text_chunks_and_packing() {
    let d = tmp("clean");
    let mut lines = Vec::new();
    for i in 0..20 {
        lines.push(format!("{{\"instruction\": \"Question {i}\", \"output\": \"Answer {i}\"}}"));
    }
    lines.push("{\"instruction\": \"question   0\", \"output\": \"ANSWER 0\"}".into());
    lines.push("{\"instruction\": \"Question 1\", \"output\": \"Answer 1\"}".into());
    let p = write(&d, "c.jsonl", &lines.join("\n"));
    let t = tok();
    let exact = data::load(&p, &t, &DataConfig { dedup: Dedup::Exact, ..cfg() }).expect("loads");
    assert_eq!(exact.report.duplicates, 1);
    let norm =
        data::load(&p, &t, &DataConfig { val_fraction: Some(0.25), seed: 3, ..Default::default() }).expect("loads");
    assert_eq!(norm.report.duplicates, 2);
    assert_eq!((norm.train.len(), norm.val.len()), (15, 5));
    let again =
        data::load(&p, &t, &DataConfig { val_fraction: Some(0.25), seed: 3, ..Default::default() }).expect("loads");
    assert_eq!(again.val, norm.val, "the split is seeded");
    let other =
        data::load(&p, &t, &DataConfig { val_fraction: Some(0.25), seed: 4, ..Default::default() }).expect("loads");
    assert_ne!(other.val, norm.val, "another seed, another split");
    for v in &norm.val {
        assert!(!norm.train.iter().any(|s| s.line == v.line), "a sample is in both splits");
    }

    let text = write(&tmp("text"), "notes.txt", &"The quick brown fox jumps over the lazy dog. ".repeat(20));
    let chunks = data::load(&text, &t, &DataConfig { max_len: 16, ..cfg() }).expect("text loads");
    assert!(chunks.train.len() > 2 && chunks.train.iter().all(|s| s.ids.len() <= 16));
    let total: usize = chunks.train.iter().map(|s| s.ids.len()).sum();
    assert_eq!(total, t.encode_prompt(&"The quick brown fox jumps over the lazy dog. ".repeat(20)).expect("enc").len());

    let refs: Vec<_> = norm.train.iter().collect();
    let cap = 40;
    let batches = data::pack(&refs, cap);
    let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
    seen.sort();
    assert_eq!(seen, (0..refs.len()).collect::<Vec<_>>(), "every sample is packed once");
    for b in &batches {
        assert!(b.iter().map(|&i| refs[i].ids.len()).sum::<usize>() <= cap);
    }
}

/// Records an app hands over from memory join those of files: the same samples as from a file,
/// and a bad one is named by its position.
#[test]
fn records_from_memory_load_like_a_file_and_bad_ones_are_named_by_position() {
    use edgetune::data::Source;
    let d = tmp("memory");
    let line = r#"{"instruction": "Name a capital.", "output": "Paris is one."}"#;
    let other = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}"#;
    let file = write(&d, "a.jsonl", line);
    let t = tok();
    let from_file = data::load(&file, &t, &cfg()).expect("file");
    let records =
        |r: &[&str]| Source::Records { name: "app records".into(), records: r.iter().map(|s| s.to_string()).collect() };
    let from_memory = data::load_sources(&[records(&[line])], &t, &cfg()).expect("memory");
    assert_eq!(from_memory.train[0].ids, from_file.train[0].ids);
    let both = data::load_sources(&[Source::Path(file.clone()), records(&[other])], &t, &cfg()).expect("both");
    assert_eq!(both.train.len(), 2);
    let e = data::load_sources(&[records(&[other, "{\"instruction\": 3}"])], &t, &cfg()).expect_err("bad").to_string();
    assert!(e.contains("app records") && e.contains("line 2") && e.contains("instruction"), "{e}");
    let e = data::load_sources(&[], &t, &cfg()).expect_err("nothing").to_string();
    assert!(e.contains("no file and no record"), "{e}");
}

/// `n` one-fact records: every answer is said once.
fn facts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            serde_json::json!({"instruction": format!("Question {i}?"), "output": format!("Fact number {i}.")})
                .to_string()
        })
        .collect()
}

fn load_records(records: Vec<String>, cfg: &DataConfig) -> edgetune::Result<data::Dataset> {
    data::load_sources(&[data::Source::Records { name: "records".into(), records }], &tok(), cfg)
}

#[test]
fn small_sets_of_distinct_facts_train_on_everything_by_default() {
    let d = load_records(facts(16), &DataConfig::default()).expect("loads");
    assert_eq!((d.train.len(), d.val.len()), (16, 0), "no fact may leave training");
    let v = &d.report.validation;
    assert_eq!((v.source, v.meaningful), (data::ValSource::None, false));
    assert!(v.why.contains("all 16 samples are trained") && v.why.contains("val_data"), "{}", v.why);
}

#[test]
fn small_sets_hold_out_only_answers_that_another_record_restates() {
    // Twelve facts, the first five asked three ways each with the same answer (as the persona
    // data does): 22 records.
    let mut records = facts(12);
    for i in 0..5 {
        for q in ["Say it again", "Once more"] {
            records.push(
                serde_json::json!({"instruction": format!("{q}, {i}?"), "output": format!("Fact number {i}.")})
                    .to_string(),
            );
        }
    }
    let d = load_records(records.clone(), &DataConfig::default()).expect("loads");
    let v = &d.report.validation;
    assert_eq!((v.source, v.meaningful), (data::ValSource::Restated, true), "{}", v.why);
    // At most a tenth (2 of 22), one per answer, each answer still trained elsewhere.
    assert_eq!((d.train.len(), d.val.len()), (20, 2), "{}", v.why);
    let text = |s: &data::Sample| tok().decode(&s.ids).expect("decode");
    let answer = |s: &data::Sample| {
        let t = text(s);
        (0..12).find(|i| t.contains(&format!("Fact number {i}."))).expect("an answer")
    };
    let held: Vec<usize> = d.val.iter().map(answer).collect();
    assert_ne!(held[0], held[1], "one sample per answer");
    for a in held {
        assert!(a < 5, "fact {a} is said once and must stay in training");
        assert!(d.train.iter().any(|s| answer(s) == a), "fact {a} left training");
    }
    // The same data and seed give the same split.
    let again = load_records(records, &DataConfig::default()).expect("loads");
    assert_eq!(again.val, d.val);
}

#[test]
fn large_sets_hold_out_a_tenth_at_random_and_the_users_file_wins() {
    let d = load_records(facts(1000), &DataConfig::default()).expect("loads");
    let v = &d.report.validation;
    assert_eq!((d.train.len(), d.val.len(), v.source, v.meaningful), (900, 100, data::ValSource::Split, true));
    // An explicit share on a small set splits, but its loss is not trusted to choose the adapter.
    let d = load_records(facts(20), &DataConfig { val_fraction: Some(0.1), ..Default::default() }).expect("loads");
    let v = &d.report.validation;
    assert_eq!((d.train.len(), d.val.len(), v.source, v.meaningful), (18, 2, data::ValSource::Split, false));
    assert!(v.why.contains("keep_best"), "{}", v.why);
    // val_data: all of the training data is trained, every sample of the file validates, and a
    // validation record identical to a training one is dropped.
    let dir = tmp("val-data");
    let extra = facts(3)[2..].iter().chain(&facts(30)[25..]).cloned().collect::<Vec<_>>().join("\n");
    let file = write(&dir, "held.jsonl", &extra);
    let cfg = DataConfig { val_data: Some(file.clone()), ..Default::default() };
    let d = load_records(facts(20), &cfg).expect("loads");
    let v = &d.report.validation;
    assert_eq!((d.train.len(), d.val.len(), v.source, v.meaningful), (20, 5, data::ValSource::File, true));
    assert!(d.val.iter().all(|s| s.file == file), "validation samples come from the file");
    // Both ways of choosing validation samples at once is an error naming both.
    let both = DataConfig { val_fraction: Some(0.2), ..cfg.clone() };
    let e = load_records(facts(20), &both).expect_err("both").to_string();
    assert!(e.contains("val_fraction = 0.2") && e.contains("held.jsonl"), "{e}");
    // A file with nothing usable, or a missing one, names the file.
    let dup = write(&dir, "dup.jsonl", &facts(2).join("\n"));
    let e = load_records(facts(20), &DataConfig { val_data: Some(dup), ..Default::default() }).expect_err("dup");
    assert!(e.to_string().contains("dup.jsonl") && e.to_string().contains("2 duplicates"), "{e}");
    let missing = dir.join("missing.jsonl");
    let e = load_records(facts(20), &DataConfig { val_data: Some(missing), ..Default::default() }).expect_err("gone");
    assert!(e.to_string().contains("missing.jsonl"), "{e}");
}

#[test]
fn small_sets_of_one_question_records_train_as_conversations_drawn_afresh_each_epoch() {
    let t = tok();
    let system = DataConfig { system: Some("Answer briefly.".into()), ..Default::default() };
    let d = load_records(facts(10), &system).expect("loads");
    let c = &d.report.chaining;
    assert_eq!((c.records, c.automatic), (data::AUTO_CHAIN_RECORDS, true), "{}", c.why);
    assert_eq!(d.train.len(), 10, "the records themselves stay the samples the report counts");
    assert_eq!(d.rounds.len(), data::CHAIN_ROUNDS);
    let text = |s: &data::Sample| t.decode(&s.ids).expect("decode");
    let answers = |s: &data::Sample| -> Vec<usize> {
        let txt = text(s);
        let mut found: Vec<(usize, usize)> =
            (0..10).filter_map(|i| txt.find(&format!("Fact number {i}.")).map(|at| (at, i))).collect();
        found.sort();
        found.into_iter().map(|(_, i)| i).collect()
    };
    let single_trained: usize = d.train.iter().map(data::Sample::n_trained).sum();
    for (r, round) in d.rounds.iter().enumerate() {
        // 10 records, 4 to a conversation: 4 + 4 + 2, each record once, the system message once
        // per conversation, and every answer's tokens (and only those) trained as when alone.
        assert_eq!(round.len(), 3, "draw {r}");
        let mut all: Vec<usize> = round.iter().flat_map(answers).collect();
        assert_eq!(round.iter().map(|s| answers(s).len()).collect::<Vec<_>>(), [4, 4, 2], "draw {r}");
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>(), "draw {r}: each record once");
        for s in round {
            assert_eq!(text(s).matches("Answer briefly.").count(), 1, "{}", text(s));
        }
        assert_eq!(round.iter().map(data::Sample::n_trained).sum::<usize>(), single_trained, "draw {r}");
    }
    // Each epoch's conversations are a fresh draw, the same for the same seed.
    let firsts: std::collections::HashSet<Vec<usize>> = d.rounds.iter().map(|r| answers(&r[0])).collect();
    assert!(firsts.len() > 6, "draws repeat: {firsts:?}");
    let again = load_records(facts(10), &system).expect("loads");
    assert_eq!(again.rounds, d.rounds);
    assert_eq!(d.epoch_samples(1), &d.rounds[1][..]);
    assert_eq!(d.epoch_samples(data::CHAIN_ROUNDS + 1), &d.rounds[1][..]);

    // chain = 1, a large set, a record of several turns, or conversations over max_len: each
    // record alone, and the reason is said; an explicit chain that cannot be made is an error
    // naming the record.
    let alone = load_records(facts(10), &DataConfig { chain: Some(1), ..Default::default() }).expect("loads");
    assert!(alone.rounds.is_empty() && alone.epoch_samples(3) == &alone.train[..]);
    let large = load_records(facts(1000), &DataConfig::default()).expect("loads");
    assert!(large.rounds.is_empty(), "{}", large.report.chaining.why);
    assert!(large.report.chaining.why.contains("a set of 1000 samples"), "{}", large.report.chaining.why);
    let mut mixed = facts(9);
    mixed.push(
        serde_json::json!({"messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Yes."}]})
        .to_string(),
    );
    let d = load_records(mixed.clone(), &DataConfig::default()).expect("loads");
    assert!(d.rounds.is_empty());
    assert!(
        d.report.chaining.why.contains("records:10 is not one question and one answer"),
        "{}",
        d.report.chaining.why
    );
    let e = load_records(mixed, &DataConfig { chain: Some(4), ..Default::default() }).expect_err("explicit");
    assert!(e.to_string().contains("data.chain") && e.to_string().contains("records:10"), "{e}");
    let short = DataConfig { max_len: 40, ..Default::default() };
    let d = load_records(facts(10), &short).expect("loads");
    assert!(d.rounds.is_empty() && d.report.chaining.why.contains("over max_len = 40"), "{}", d.report.chaining.why);
    let e = load_records(facts(10), &DataConfig { chain: Some(0), ..Default::default() }).expect_err("zero");
    assert!(e.to_string().contains("chain must be at least 1"), "{e}");
}

/// TRL's DPOTrainer tokenization of preference records in each of its formats
/// (`dpo_tokens_expected.json`, written by tests/reference/dpo.py): the same prompt and
/// completion tokens, each pair as one sample of two sequences whose completions are the targets.
#[test]
fn preference_records_tokenize_as_trl_does_in_every_format() {
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("dpo_tokens_expected.json")).expect("fixture"))
            .expect("json");
    let d = tmp("preference");
    let t = tok();
    for (name, f) in want.as_object().expect("formats") {
        let lines: Vec<String> = f["records"].as_array().expect("records").iter().map(|r| r.to_string()).collect();
        let p = write(&d, &format!("{name}.jsonl"), &lines.join("\n"));
        let set = data::load(&p, &t, &cfg()).expect("loads");
        assert_eq!(set.train.len(), lines.len(), "{name}: one sample a pair");
        let ids = |k: &str, i: usize| -> Vec<u32> {
            f[k][i].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect()
        };
        for s in &set.train {
            let i = s.line - 1;
            let (prompt, chosen, rejected) = (ids("prompt_ids", i), ids("chosen_ids", i), ids("rejected_ids", i));
            let k = s.rejected_at.unwrap_or_else(|| panic!("{name} line {}: not a pair", s.line));
            let seqs = s.sequences();
            for ((ids, train), completion) in seqs.iter().zip([&chosen, &rejected]) {
                let whole: Vec<u32> = prompt.iter().chain(completion.iter()).copied().collect();
                assert_eq!(ids.to_vec(), whole, "{name} line {}: tokens", s.line);
                let targets: Vec<bool> = (0..whole.len()).map(|j| j >= prompt.len()).collect();
                assert_eq!(train.to_vec(), targets, "{name} line {}: only the completion is trained", s.line);
            }
            assert_eq!(k, prompt.len() + chosen.len(), "{name} line {}: the rejected sequence's start", s.line);
        }
    }
}

#[test]
fn bad_preference_records_are_refused_naming_the_line_and_field() {
    let d = tmp("bad-preference");
    for (record, says) in [
        (r#"{"prompt": "Hi", "chosen": "A"}"#, "missing `rejected`"),
        (r#"{"prompt": "Hi", "chosen": "A", "rejected": "A"}"#, "are the same"),
        (r#"{"prompt": "Hi", "chosen": 3, "rejected": "A"}"#, "`chosen` should be a string or a list of messages"),
        (
            r#"{"prompt": "Hi", "chosen": [{"role": "assistant", "content": "A"}], "rejected": "B"}"#,
            "must all be text or all be lists of messages",
        ),
        (r#"{"chosen": "Yes", "rejected": "No"}"#, "share no prompt"),
        (
            r#"{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "robot", "content": "A"}], "rejected": [{"role": "assistant", "content": "B"}]}"#,
            "chosen[0]: unknown role `robot`",
        ),
    ] {
        let p =
            write(&d, "p.jsonl", &format!("{{\"prompt\": \"x\", \"chosen\": \"y\", \"rejected\": \"z\"}}\n{record}\n"));
        let e = err(&p, &cfg());
        assert!(e.contains("p.jsonl") && e.contains("line 2") && e.contains(says), "{record}: {e}");
    }
}

#[test]
fn long_preference_pairs_keep_their_start_or_are_dropped() {
    let d = tmp("long-preference");
    let t = tok();
    let long = "word ".repeat(40);
    let p = write(
        &d,
        "p.jsonl",
        &format!(
            "{{\"prompt\": [{{\"role\": \"user\", \"content\": \"Hi\"}}], \"chosen\": [{{\"role\": \"assistant\", \"content\": \"{long}\"}}], \"rejected\": [{{\"role\": \"assistant\", \"content\": \"No\"}}]}}\n"
        ),
    );
    let full = data::load(&p, &t, &cfg()).expect("loads");
    let s = &full.train[0];
    let k = s.rejected_at.expect("pair");
    assert!(k > 40, "the chosen sequence is long: {k}");
    // Cut to 30 tokens: the chosen sequence keeps its first 30, the rejected one is whole.
    let cut = data::load(&p, &t, &DataConfig { max_len: 30, ..cfg() }).expect("loads");
    let c = &cut.train[0];
    assert_eq!(c.rejected_at, Some(30));
    assert_eq!(c.ids[..30], s.ids[..30]);
    assert_eq!(c.ids[30..], s.ids[k..]);
    assert_eq!(cut.report.truncated, 1);
    let dropped = data::load(&p, &t, &DataConfig { max_len: 30, truncation: Truncation::Drop, ..cfg() });
    assert!(dropped.expect_err("nothing left").to_string().contains("longer than max_len"));
    // A cut that leaves the chosen completion no token drops the pair.
    let prompt_only = data::load(&p, &t, &DataConfig { max_len: 5, ..cfg() });
    assert!(prompt_only.is_err());
}

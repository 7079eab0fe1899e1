//! The generation API on the tiny Llama: sampling, seeds, stop conditions, streaming, chat
//! templates and bad arguments.

mod common;

use std::sync::Arc;

use edgetune::Session;
use edgetune::gpu::{GpuContext, GpuOptions};
use edgetune::infer::{GenerateOptions, Rng, StopReason, sample};
use edgetune::model::llama::{LoadOptions, Quant};
use edgetune::session::{AnswerEvent, ManyRequests, Prompt};
use edgetune::tokenizer::Message;

fn session(max_context: usize) -> Session {
    let ctx =
        Arc::new(GpuContext::new(&GpuOptions::default()).unwrap_or_else(|e| panic!("GPU tests need an adapter: {e}")));
    let opts = LoadOptions { quant: Quant::None, max_context, ..Default::default() };
    Session::open_with(ctx, common::fixtures().join("tiny_llama"), &opts).expect("tiny model")
}

#[test]
fn greedy_is_argmax_and_top_k_1_equals_greedy() {
    let logits = vec![0.1, 3.0, -1.0, 2.9];
    let mut rng = Rng::new(1);
    assert_eq!(sample(&logits, &GenerateOptions::default(), &mut rng), 1);
    let k1 = GenerateOptions { temperature: 5.0, top_k: 1, ..Default::default() };
    for _ in 0..20 {
        assert_eq!(sample(&logits, &k1, &mut rng), 1);
    }
    // top_p small enough keeps only the most likely token.
    let p = GenerateOptions { temperature: 1.0, top_p: 0.3, ..Default::default() };
    assert_eq!(sample(&logits, &p, &mut rng), 1);
    // At high temperature every token gets drawn sometimes.
    let hot = GenerateOptions { temperature: 100.0, ..Default::default() };
    let mut seen = [false; 4];
    for _ in 0..200 {
        seen[sample(&logits, &hot, &mut rng) as usize] = true;
    }
    assert_eq!(seen, [true; 4]);
}

/// Greedy decoding picks the token on the GPU: token by token it is what the CPU sampler picks
/// from the same logits, generation gives that sequence, and after a cache's first decoded
/// token (and again after a LoRA adapter of a higher rank joins) a token creates nothing.
#[test]
fn greedy_decoding_on_the_gpu_picks_what_the_cpu_sampler_picks() {
    let s = session(64);
    let m = &s.model;
    let greedy = GenerateOptions::default();
    let mut rng = Rng::new(0);
    let prompt = s.tokenizer.encode("Paris is").expect("encode");
    let (mut on_gpu, mut on_cpu) = (m.new_cache().expect("cache"), m.new_cache().expect("cache"));
    let mut next = m.next_argmax_with(&prompt, &mut on_gpu, None).expect("prefill");
    assert_eq!(next, sample(&m.next_logits(&prompt, &mut on_cpu).expect("prefill"), &greedy, &mut rng));
    let mut picked = vec![next];
    let mut created = Vec::new();
    for _ in 0..12 {
        let before = m.ctx.counts();
        let gpu = m.next_argmax_with(&[next], &mut on_gpu, None).expect("decode");
        created.push(m.ctx.counts() - before);
        let cpu = sample(&m.next_logits(&[next], &mut on_cpu).expect("decode"), &greedy, &mut rng);
        assert_eq!(gpu, cpu, "token {}", picked.len());
        next = gpu;
        picked.push(next);
    }
    // Each token after the first: nothing created, one submission of one compute pass (its keys
    // and values go into the cache by a dispatch, not by copies that would end the pass).
    for c in &created[1..] {
        assert_eq!((c.buffers, c.bind_groups, c.pipelines, c.submits, c.passes), (0, 0, 0, 1, 1), "{created:?}");
    }
    assert!(created[0].bind_groups > 0, "the first decoded token made the cache's bind groups");
    let opts = GenerateOptions { max_new_tokens: picked.len(), ..Default::default() };
    let g = s.generate("Paris is", &opts, |_| true).expect("generate");
    assert_eq!(g.token_ids, picked[..g.token_ids.len()], "generation decodes greedily on the GPU");

    // An adapter with a higher rank than the cache's buffers: they are made again, once.
    let cfg = edgetune::lora::LoraConfig { r: 8, alpha: 16.0, ..Default::default() };
    let adapter = edgetune::lora::Adapter::new(&m.config, cfg).expect("adapter");
    let lora = edgetune::lora::GpuAdapter::upload(&m.ctx, &adapter);
    let first = m.next_argmax_with(&[next], &mut on_gpu, Some(&lora)).expect("decode with LoRA");
    let before = m.ctx.counts();
    let second = m.next_argmax_with(&[first], &mut on_gpu, Some(&lora)).expect("decode with LoRA");
    let c = m.ctx.counts() - before;
    assert_eq!((c.buffers, c.bind_groups), (0, 0), "{c:?}");
    // B starts at zero, so the adapter changes nothing yet.
    let cpu = sample(&m.next_logits(&[next], &mut on_cpu).expect("decode"), &greedy, &mut rng);
    assert_eq!(first, cpu);
    assert_eq!(second, sample(&m.next_logits(&[first], &mut on_cpu).expect("decode"), &greedy, &mut rng));
}

/// A step fed by the last step's pick on the GPU (`StepToken::Picked`) can be submitted before
/// that pick is read back, and the tokens are those of a step at a time; a cache whose last
/// pass did not pick by argmax refuses it, as does a full one. Greedy generation runs that way: when the first
/// token's text is streamed, the pass that picks the second has already been submitted.
#[test]
fn a_step_fed_by_the_last_pick_on_the_gpu_runs_ahead_of_the_host() {
    use edgetune::model::llama::{RowToken, StepToken};
    let s = session(64);
    let m = &s.model;
    let prompt = s.tokenizer.encode("Paris is").expect("encode");
    let mut cache = m.new_cache().expect("cache");
    let mut one_at_a_time = vec![m.next_argmax_with(&prompt, &mut cache, None).expect("prefill")];
    for _ in 0..12 {
        let last = one_at_a_time[one_at_a_time.len() - 1];
        one_at_a_time.push(m.next_argmax_with(&[last], &mut cache, None).expect("decode"));
    }
    assert!(
        one_at_a_time.windows(2).any(|w| w[0] != w[1]),
        "a sequence of one repeated token would not show which step fed which: {one_at_a_time:?}"
    );
    let staging = [m.ctx.staging("id", 4), m.ctx.staging("id", 4)];
    let mut cache = m.new_cache().expect("cache");
    let first = m.next_argmax_with(&prompt, &mut cache, None).expect("prefill");
    let e = m.submit_argmax(StepToken::Picked, &mut cache, None, &staging[0]).expect_err("after a prompt's pass");
    assert!(e.to_string().contains("one-token step that picked by argmax"), "{e}");
    assert_eq!(cache.len, prompt.len(), "a refused step leaves the cache as it was");
    let mut chained = vec![first];
    let mut pending = m.submit_argmax(StepToken::Id(first), &mut cache, None, &staging[0]).expect("step");
    for k in 1..12 {
        let before = m.ctx.counts();
        let next = m.submit_argmax(StepToken::Picked, &mut cache, None, &staging[k % 2]).expect("chained step");
        let c = m.ctx.counts() - before;
        assert_eq!((c.buffers, c.bind_groups, c.submits), (0, 0, 1), "a chained step creates nothing: {c:?}");
        chained.push(m.ctx.finish_read(pending).expect("read")[0]);
        pending = next;
    }
    chained.push(m.ctx.finish_read(pending).expect("read")[0]);
    assert_eq!(chained, one_at_a_time);
    // A top-k pass, or a step decoded with other rows, picks no id into the cache's buffer for
    // the next step.
    let last = chained[chained.len() - 1];
    m.next_top_k_with(&[last], &mut cache, None, 4).expect("top-k");
    m.submit_argmax(StepToken::Picked, &mut cache, None, &staging[0]).expect_err("after a top-k pass");
    m.next_argmax_with(&[last], &mut cache, None).expect("decode");
    let set = edgetune::lora::GpuAdapterSet::new(&m.ctx, &[], m.config.num_layers).expect("no adapters");
    let mut decoder = m.rows_decoder(1, 1).expect("decoder");
    let mut rows = [edgetune::model::llama::DecodeRow { cache: &mut cache, adapter: None, token: RowToken::Id(last) }];
    m.decode_rows_argmax(&mut decoder, &set, &mut rows).expect("rows step");
    m.submit_argmax(StepToken::Picked, &mut cache, None, &staging[0]).expect_err("after a rows step");
    // Nor past the cache's capacity: a cache of the prompt and two tokens takes one chained step.
    let mut cache = m.new_cache_for(prompt.len() + 2).expect("cache");
    m.next_argmax_with(&prompt, &mut cache, None).expect("prefill");
    m.next_argmax_with(&[first], &mut cache, None).expect("decode");
    let pending = m.submit_argmax(StepToken::Picked, &mut cache, None, &staging[0]).expect("the last position");
    m.ctx.finish_read(pending).expect("read");
    let e = m.submit_argmax(StepToken::Picked, &mut cache, None, &staging[1]).expect_err("past the capacity");
    assert!(e.to_string().contains("exceed the context capacity"), "{e}");

    let start = m.ctx.counts().submits;
    let mut seen = Vec::new();
    let opts = GenerateOptions { max_new_tokens: one_at_a_time.len(), ..Default::default() };
    let g = s
        .generate("Paris is", &opts, |_| {
            seen.push(m.ctx.counts().submits - start);
            true
        })
        .expect("generate");
    assert_eq!(g.token_ids, one_at_a_time[..g.token_ids.len()]);
    assert_eq!(g.token_ids[0], first);
    assert!(!seen.is_empty() && !s.tokenizer.decode(&g.token_ids[..1]).expect("decode").is_empty());
    assert_eq!(seen[0], 2, "the prompt's pass, and the step after the first token before its text is streamed");
}

/// Seeded sampling with a top-k cut takes its candidates from the GPU: the same tokens as
/// sampling the whole row of logits on the CPU with the same seed, and the same text twice.
#[test]
fn top_k_sampling_on_the_gpu_draws_what_the_cpu_sampler_draws() {
    let s = session(64);
    let m = &s.model;
    for (top_k, top_p, temperature) in [(50usize, 1.0f32, 1.0f32), (5, 0.8, 0.7), (256, 0.95, 1.3)] {
        let opts = GenerateOptions { max_new_tokens: 16, temperature, top_k, top_p, seed: 11, ..Default::default() };
        let g = s.generate("Paris is", &opts, |_| true).expect("generate");
        assert_eq!(g.token_ids, s.generate("Paris is", &opts, |_| true).expect("again").token_ids);
        let mut rng = Rng::new(opts.seed);
        let mut cache = m.new_cache().expect("cache");
        let mut ids = s.tokenizer.encode("Paris is").expect("encode");
        let mut picked = Vec::new();
        for _ in 0..g.token_ids.len() {
            let next = sample(&m.next_logits(&ids, &mut cache).expect("logits"), &opts, &mut rng);
            picked.push(next);
            ids = vec![next];
        }
        assert_eq!(g.token_ids, picked, "top_k {top_k}, top_p {top_p}, temperature {temperature}");
        let mut cache = m.new_cache().expect("cache");
        let prompt = s.tokenizer.encode("Paris is").expect("encode");
        let cands = m.next_top_k_with(&prompt, &mut cache, None, top_k).expect("top-k");
        let before = m.ctx.counts();
        m.next_top_k_with(&[cands[0].0], &mut cache, None, top_k).expect("top-k");
        let after_first = m.ctx.counts();
        m.next_top_k_with(&[cands[0].0], &mut cache, None, top_k).expect("top-k");
        let c = m.ctx.counts() - after_first;
        assert!((after_first - before).bind_groups > 0);
        assert_eq!((c.buffers, c.bind_groups, c.submits), (0, 0, 1), "{c:?}");
    }
}

#[test]
fn same_seed_same_text_and_streaming_adds_up() {
    let s = session(64);
    let opts = GenerateOptions { max_new_tokens: 12, temperature: 1.0, top_k: 50, seed: 7, ..Default::default() };
    let mut streamed = String::new();
    let a = s
        .generate("Paris is", &opts, |t| {
            streamed.push_str(t);
            true
        })
        .expect("generate");
    let b = s.generate("Paris is", &opts, |_| true).expect("generate");
    assert_eq!(a.token_ids, b.token_ids);
    assert_eq!(streamed, a.text);
    let c = s.generate("Paris is", &GenerateOptions { seed: 8, ..opts.clone() }, |_| true).expect("generate");
    assert_ne!(a.token_ids, c.token_ids, "a different seed should change a 12-token sample");
}

/// Limits, stop strings and a callback's stop; three new tokens cost three passes (the prompt's
/// and two one-token ones), as picking them by hand does: the last is never fed.
#[test]
fn limits_stop_strings_and_callback_stop() {
    let s = session(64);
    let m = &s.model;
    let before = m.ctx.counts();
    let ids = s.tokenizer.encode("The quick").expect("encode");
    let mut cache = m.new_cache_for(ids.len() + 3).expect("cache");
    let mut picked = vec![m.next_argmax_with(&ids, &mut cache, None).expect("prefill")];
    for _ in 0..2 {
        picked.push(m.next_argmax_with(&picked[picked.len() - 1..], &mut cache, None).expect("decode"));
    }
    let by_hand = m.ctx.counts() - before;
    let before = m.ctx.counts();
    let out = s
        .generate("The quick", &GenerateOptions { max_new_tokens: 3, ..Default::default() }, |_| true)
        .expect("generate");
    assert_eq!(out.token_ids, picked);
    assert_eq!(out.stop_reason, StopReason::MaxTokens);
    assert_eq!((m.ctx.counts() - before).submits, by_hand.submits, "passes beyond the last token");
    let mut calls = 0;
    let out = s
        .generate("The quick", &GenerateOptions { max_new_tokens: 10, ..Default::default() }, |_| {
            calls += 1;
            false
        })
        .expect("generate");
    assert_eq!((calls, out.stop_reason), (1, StopReason::Callback));
    // A stop string taken from the greedy continuation itself.
    let full = s
        .generate("The quick", &GenerateOptions { max_new_tokens: 10, ..Default::default() }, |_| true)
        .expect("generate");
    let stop: String = full.text.chars().skip(2).take(2).collect();
    let cut = s
        .generate(
            "The quick",
            &GenerateOptions { max_new_tokens: 10, stop: vec![stop.clone()], ..Default::default() },
            |_| true,
        )
        .expect("generate");
    assert_eq!(cut.stop_reason, StopReason::StopString, "stop {stop:?} in {:?}", full.text);
    assert!(!cut.text.contains(&stop) && full.text.starts_with(&cut.text), "{:?} vs {:?}", cut.text, full.text);
}

#[test]
fn the_context_limit_ends_generation() {
    let s = session(16);
    let out = s
        .generate("Paris is the capital", &GenerateOptions { max_new_tokens: 100, ..Default::default() }, |_| true)
        .expect("generate");
    assert_eq!(out.stop_reason, StopReason::ContextFull);
    // 16 cached positions give logits for a 17th token, which is emitted but never fed back.
    assert_eq!(out.prompt_tokens + out.token_ids.len(), 17);
}

#[test]
fn chat_uses_the_template() {
    let s = session(128);
    let rendered = s.tokenizer.apply_chat_template(&[Message::new("user", "Hi")], true).expect("template");
    assert_eq!(rendered, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    let out = s
        .chat(&[Message::new("user", "Hi")], &GenerateOptions { max_new_tokens: 4, ..Default::default() }, |_| true)
        .expect("chat");
    assert_eq!(out.prompt_tokens, s.tokenizer.encode(&rendered).expect("encode").len());
}

#[test]
fn bad_arguments_are_errors() {
    let s = session(32);
    let e = s.generate("", &GenerateOptions::default(), |_| true).expect_err("empty prompt");
    assert!(e.to_string().contains("prompt"), "{e}");
    let e = s
        .generate("hi", &GenerateOptions { temperature: f32::NAN, top_p: 0.0, ..Default::default() }, |_| true)
        .expect_err("bad options");
    assert!(e.to_string().contains("temperature") && e.to_string().contains("top_p"), "{e}");
    let e = s.chat(&[], &GenerateOptions::default(), |_| true).expect_err("no messages");
    assert!(e.to_string().contains("messages"), "{e}");
    let long = "Paris is the capital of France. ".repeat(20);
    let e = s.generate(&long, &GenerateOptions::default(), |_| true).expect_err("prompt too long");
    assert!(e.to_string().contains("context"), "{e}");
    let e = s.model.next_logits(&[100_000], &mut s.model.new_cache().expect("cache")).expect_err("bad id");
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
}

/// Two adapters resident on one session answer in alternation exactly as each does alone, with
/// no buffer created when switching between them, and an unknown name is an error naming the
/// resident ones.
#[test]
fn resident_adapters_answer_in_alternation_as_each_alone_without_uploads() {
    use edgetune::lora::{Adapter, LoraConfig};
    let mut s = session(128);
    let make = |seed: u64| {
        let mut a = Adapter::new(&s.model.config, LoraConfig { r: 4, seed, ..Default::default() }).expect("adapter");
        let r = a.layout.r;
        for (i, slot) in a.layout.slots.clone().iter().enumerate() {
            let b = common::rand(slot.n_out * r, seed * 100 + i as u64, 0.2);
            a.params[slot.b..slot.b + b.len()].copy_from_slice(&b);
        }
        a
    };
    let (a, b) = (make(1), make(2));
    let opts = GenerateOptions { max_new_tokens: 6, ..Default::default() };
    let prompt = "Paris is the capital of";
    // Each alone, applied the ordinary way.
    s.set_adapter(Some(&a)).expect("a");
    let alone_a = s.generate(prompt, &opts, |_| true).expect("a").token_ids;
    s.set_adapter(Some(&b)).expect("b");
    let alone_b = s.generate(prompt, &opts, |_| true).expect("b").token_ids;
    s.set_adapter(None).expect("base");
    let base = s.generate(prompt, &opts, |_| true).expect("base").token_ids;
    assert_ne!(alone_a, alone_b, "the two adapters must answer differently, or this tests nothing");

    s.keep_adapter("a", &a).expect("keep a");
    s.keep_adapter("b", &b).expect("keep b");
    assert_eq!(s.resident_adapters(), vec![("a", a.layout.len as u64 * 4), ("b", b.layout.len as u64 * 4)]);
    let warm = s.generate_with(Some("a"), prompt, &opts, |_| true).expect("warm-up");
    assert_eq!(warm.token_ids, alone_a);
    let before = s.model.ctx.counts().buffers;
    for _ in 0..2 {
        assert_eq!(s.generate_with(Some("b"), prompt, &opts, |_| true).expect("b").token_ids, alone_b);
        assert_eq!(s.generate_with(Some("a"), prompt, &opts, |_| true).expect("a").token_ids, alone_a);
        assert_eq!(s.generate_with(None, prompt, &opts, |_| true).expect("base").token_ids, base);
    }
    let per_call = {
        let c0 = s.model.ctx.counts().buffers;
        s.generate_with(None, prompt, &opts, |_| true).expect("base");
        s.model.ctx.counts().buffers - c0
    };
    // Six calls, each making only what any generation makes (its KV cache and workspace).
    assert_eq!(s.model.ctx.counts().buffers - before, 7 * per_call, "switching adapters uploaded something");
    let e = s.generate_with(Some("c"), prompt, &opts, |_| true).expect_err("unknown name");
    assert!(e.to_string().contains("`c`") && e.to_string().contains("\"a\", \"b\""), "{e}");
    assert!(s.drop_adapter("a") && !s.drop_adapter("a"));
    assert!(s.generate_with(Some("a"), prompt, &opts, |_| true).is_err());
}

/// Several users at once: `Session::generate_many` with two resident adapters and the base
/// model across four requests gives each request what `generate_with` gives it alone, greedily
/// and with seeded top-k sampling (each request draws from its own generator), while the steps
/// decode the requests still going in one pass (greedily, each step submitted before the one
/// before is read back). Streamed pieces add up to each request's text;
/// a callback returning false ends only its own request; `chat_many` answers conversations as
/// `chat_with` does. Refused: an unknown adapter name, an empty prompt and a conversation
/// without messages, naming the request.
#[test]
fn many_requests_with_their_own_adapters_get_what_each_gets_alone() {
    use edgetune::lora::{Adapter, LoraConfig};
    let mut s = session(128);
    let make = |r: usize, seed: u64| {
        let mut a = Adapter::new(&s.model.config, LoraConfig { r, seed, ..Default::default() }).expect("adapter");
        for (i, slot) in a.layout.slots.clone().iter().enumerate() {
            let b = common::rand(slot.n_out * r, seed * 100 + i as u64, 0.2);
            a.params[slot.b..slot.b + b.len()].copy_from_slice(&b);
        }
        a
    };
    let (a, b) = (make(4, 1), make(8, 2));
    s.keep_adapter("a", &a).expect("keep a");
    s.keep_adapter("b", &b).expect("keep b");
    let requests = [
        (Some("a"), "Paris is the capital of"),
        (None, "The cat"),
        (Some("b"), "Once upon a time there was"),
        (Some("a"), "One, two,"),
    ];
    for opts in [
        GenerateOptions { max_new_tokens: 7, ..Default::default() },
        GenerateOptions { max_new_tokens: 7, temperature: 0.8, top_k: 20, seed: 5, ..Default::default() },
        // Sampling from the whole row: the rows' logits read back.
        GenerateOptions { max_new_tokens: 7, temperature: 0.8, top_p: 0.9, seed: 6, ..Default::default() },
    ] {
        let alone: Vec<_> =
            requests.iter().map(|&(a, p)| s.generate_with(a, p, &opts, |_| true).expect("alone")).collect();
        assert_ne!(alone[0].token_ids, alone[3].token_ids, "different prompts must differ, or this tests little");
        let mut pieces = vec![String::new(); requests.len()];
        let (start, mut seen) = (s.model.ctx.counts().submits, Vec::new());
        let together = s
            .generate_many(&requests, &opts, |i, piece| {
                pieces[i].push_str(piece);
                seen.push(s.model.ctx.counts().submits - start);
                true
            })
            .expect("together");
        // The adapter set's copy and the prompts' passes; greedily, also the step after the
        // first tokens, submitted before their text streamed.
        let ahead = u64::from(opts.temperature == 0.0);
        assert_eq!(seen.first(), Some(&(1 + requests.len() as u64 + ahead)), "{opts:?}: {seen:?}");
        for (i, (t, a)) in together.iter().zip(&alone).enumerate() {
            assert_eq!(t.token_ids, a.token_ids, "request {i} with {opts:?}");
            assert_eq!(
                (&t.text, t.stop_reason, t.prompt_tokens),
                (&a.text, a.stop_reason, a.prompt_tokens),
                "request {i}"
            );
            assert_eq!(pieces[i], t.text, "request {i}: streamed pieces");
        }
    }
    // Request 2 stops itself after its first piece; the others run to the limit.
    let opts = GenerateOptions { max_new_tokens: 5, ..Default::default() };
    let out = s.generate_many(&requests, &opts, |i, _| i != 2).expect("callback stop");
    let reasons: Vec<StopReason> = out.iter().map(|g| g.stop_reason).collect();
    assert_eq!(reasons[2], StopReason::Callback, "{reasons:?}");
    let stopped = s.generate_with(requests[2].0, requests[2].1, &opts, |_| false).expect("alone, stopped");
    assert_eq!((&out[2].token_ids, &out[2].text), (&stopped.token_ids, &stopped.text));
    for i in [0, 1, 3] {
        assert_eq!(
            out[i].token_ids,
            s.generate_with(requests[i].0, requests[i].1, &opts, |_| true).expect("alone").token_ids
        );
    }
    // More new tokens than the context holds: each request's cache is the model's context, and
    // each ends where it ends alone.
    let long = GenerateOptions { max_new_tokens: 500, ..Default::default() };
    let two = [(Some("a"), "Paris is the capital of"), (None, "The cat")];
    let out = s.generate_many(&two, &long, |_, _| true).expect("past the context");
    for (g, &(name, prompt)) in out.iter().zip(&two) {
        let alone = s.generate_with(name, prompt, &long, |_| true).expect("alone");
        assert_eq!((&g.token_ids, g.stop_reason), (&alone.token_ids, alone.stop_reason), "{prompt}");
    }
    // Conversations, rendered with the chat template, as chat_with answers each alone.
    let (hi, cat) =
        ([Message::new("user", "Hi")], [Message::new("system", "Be brief."), Message::new("user", "Cats?")]);
    let chats: [(Option<&str>, &[Message]); 3] = [(Some("b"), &hi), (None, &cat), (Some("a"), &cat)];
    let many = s.chat_many(&chats, &opts, |_, _| true).expect("chat many");
    for (i, (g, &(name, messages))) in many.iter().zip(&chats).enumerate() {
        let alone = s.chat_with(name, messages, &opts, |_| true).expect("chat alone");
        assert_eq!((&g.token_ids, g.prompt_tokens), (&alone.token_ids, alone.prompt_tokens), "conversation {i}");
    }
    // Prompts and conversations in one call, `rows` at a time: each request's end is told as
    // it ends, with what it generated; in one row each ends before the next starts, in three
    // the one stopped at its first piece ends while others go on.
    let mixed: [(Option<&str>, Prompt); 5] = [
        (Some("a"), Prompt::Text("Paris is the capital of")),
        (Some("b"), Prompt::Chat(&hi)),
        (None, Prompt::Text("The cat")),
        (Some("a"), Prompt::Chat(&cat)),
        (Some("b"), Prompt::Text("One, two,")),
    ];
    let alone: Vec<_> = mixed
        .iter()
        .map(|&(name, p)| match p {
            Prompt::Text(t) => s.generate_with(name, t, &opts, |_| true),
            Prompt::Chat(m) => s.chat_with(name, m, &opts, |_| true),
        })
        .collect::<Result<_, _>>()
        .expect("alone");
    for rows in [1, 3, 0] {
        let job = ManyRequests { requests: &mixed, opts: &opts, rows };
        let mut events: Vec<(bool, usize)> = Vec::new();
        let mut told = vec![None; mixed.len()];
        let out = s
            .answer_many(&job, |event| {
                match event {
                    AnswerEvent::Text { request, .. } => events.push((false, request)),
                    AnswerEvent::End { request, generated } => {
                        events.push((true, request));
                        let again = told[request].replace(generated.token_ids.clone());
                        assert!(again.is_none(), "request {request} ended twice");
                    }
                }
                true
            })
            .expect("answer many");
        for (i, (g, a)) in out.iter().zip(&alone).enumerate() {
            assert_eq!((&g.token_ids, &g.text), (&a.token_ids, &a.text), "rows {rows}: request {i}");
            assert_eq!(told[i].as_ref(), Some(&g.token_ids), "rows {rows}: request {i}'s end");
        }
        // In one row the requests run one after another: each ends before the next streams.
        let ends: Vec<usize> = events.iter().filter(|e| e.0).map(|e| e.1).collect();
        let order: Vec<usize> = events.iter().map(|e| e.1).collect();
        if rows == 1 {
            assert!(order.windows(2).all(|w| w[0] <= w[1]), "{order:?}");
            assert_eq!(ends, [0, 1, 2, 3, 4]);
        } else {
            assert!(order.windows(2).any(|w| w[0] > w[1]), "rows {rows}: requests interleave: {order:?}");
        }
    }
    let stop_1 = s
        .answer_many(&ManyRequests { requests: &mixed, opts: &opts, rows: 3 }, |event| {
            !matches!(event, AnswerEvent::Text { request: 1, .. })
        })
        .expect("stopped");
    assert_eq!(stop_1[1].stop_reason, StopReason::Callback);
    let e = s.chat_many(&[(None, &hi), (None, &[])], &opts, |_, _| true).expect_err("no messages");
    assert!(e.to_string().contains("request 1"), "{e}");
    let e = s.generate_many(&[(None, "hi"), (Some("c"), "hi")], &opts, |_, _| true).expect_err("unknown name");
    assert!(e.to_string().contains("`c`"), "{e}");
    let e = s.generate_many(&[(None, "hi"), (None, "")], &opts, |_, _| true).expect_err("empty prompt");
    assert!(e.to_string().contains("request 1"), "{e}");
}

/// More requests than rows (`infer::generate_queue`, 5 requests in 2 rows): each row takes the
/// next request when its own ends, so a request that ends early (its callback stops it at its
/// first piece) frees its row for the next while the other row's request goes on; each request
/// still gets what `generate` gives it alone, greedily and with seeded sampling. Refused: no
/// rows.
#[test]
fn a_queue_of_more_requests_than_rows_gives_each_what_it_gets_alone() {
    use edgetune::infer::{RowRequest, RowsJob, generate, generate_queue};
    use edgetune::lora::{Adapter, GpuAdapter, LoraConfig};
    let s = session(128);
    let m = &s.model;
    let mut a = Adapter::new(&m.config, LoraConfig { r: 4, seed: 3, ..Default::default() }).expect("adapter");
    for (i, slot) in a.layout.slots.clone().iter().enumerate() {
        let b = common::rand(slot.n_out * 4, 300 + i as u64, 0.2);
        a.params[slot.b..slot.b + b.len()].copy_from_slice(&b);
    }
    let a = GpuAdapter::upload(&m.ctx, &a);
    let texts = ["Paris is the capital of", "The cat", "Once upon a time there was", "One, two,", "Hello there"];
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| s.tokenizer.encode_prompt(t).expect("encode")).collect();
    let requests: Vec<RowRequest<'_>> = ids
        .iter()
        .enumerate()
        .map(|(i, ids)| RowRequest { prompt_ids: ids, adapter: (i % 2 == 0).then_some(0) })
        .collect();
    // Requests 0 and 2 stop at their first piece.
    let stops = |i: usize| i == 0 || i == 2;
    for opts in [
        GenerateOptions { max_new_tokens: 12, ..Default::default() },
        GenerateOptions { max_new_tokens: 12, temperature: 0.8, top_k: 20, seed: 5, ..Default::default() },
    ] {
        let job = RowsJob { model: m, adapters: &[&a], tokenizer: &s.tokenizer, requests: &requests, opts: &opts };
        let mut order = Vec::new();
        let out = generate_queue(&job, 2, |i, _| {
            order.push(i);
            !stops(i)
        })
        .expect("queue");
        for (i, g) in out.iter().enumerate() {
            let lora = requests[i].adapter.map(|_| &a);
            let alone = generate(m, lora, &s.tokenizer, &ids[i], &opts, |_| !stops(i)).expect("alone");
            assert_eq!(
                (&g.token_ids, &g.text, g.stop_reason),
                (&alone.token_ids, &alone.text, alone.stop_reason),
                "request {i} with {opts:?}"
            );
        }
        assert_eq!(out[0].stop_reason, StopReason::Callback);
        // Request 2 took request 0's row while request 1 went on in the other.
        let first_of_2 = order.iter().position(|&i| i == 2).expect("request 2 streamed");
        let last_of_1 = order.iter().rposition(|&i| i == 1).expect("request 1 streamed");
        assert!(first_of_2 < last_of_1, "{opts:?}: pieces by request {order:?}");
    }
    let opts = GenerateOptions::default();
    let job = RowsJob { model: m, adapters: &[&a], tokenizer: &s.tokenizer, requests: &requests, opts: &opts };
    let e = generate_queue(&job, 0, |_, _| true).expect_err("no rows");
    assert!(e.to_string().contains("0 sequences at once"), "{e}");
}

/// `Session::score_answers` decodes the held-out answers many rows at a time (each exchange's
/// base answer beside its adapter's, `infer::ANSWER_ROWS` rows a pass): each answer is the one
/// `chat_with` gives alone, greedily and with seeded sampling, over more exchanges than one pass
/// holds; progress counts every record once, in order, up to the total. A record whose prompt
/// does not fit the context is refused by its file and line before anything is answered.
#[test]
fn scored_answers_decoded_together_are_each_what_chat_gives_alone() {
    use edgetune::data::formats::{Record, Sourced};
    use edgetune::infer::ANSWER_ROWS;
    use edgetune::lora::{Adapter, LoraConfig};
    let mut s = session(128);
    let mut a = Adapter::new(&s.model.config, LoraConfig { r: 8, seed: 3, ..Default::default() }).expect("adapter");
    for (i, slot) in a.layout.slots.clone().iter().enumerate() {
        let b = common::rand(slot.n_out * 8, 300 + i as u64, 0.2);
        a.params[slot.b..slot.b + b.len()].copy_from_slice(&b);
    }
    s.keep_adapter("a", &a).expect("keep");
    s.set_adapter(Some(&a)).expect("apply");
    // Two rows an exchange: more exchanges than one pass of rows holds, the last pass part-full.
    let n = ANSWER_ROWS / 2 + 3;
    let questions: Vec<String> = (0..n).map(|i| format!("Question {i}: what comes after {}?", i * 7)).collect();
    let records: Vec<Sourced> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| Sourced {
            record: Record::Chat(vec![Message::new("user", q.as_str()), Message::new("assistant", "Eight.")]),
            file: "held-out.jsonl".into(),
            line: i + 1,
        })
        .collect();
    for opts in [
        GenerateOptions { max_new_tokens: 6, ..Default::default() },
        GenerateOptions { max_new_tokens: 6, temperature: 0.9, top_k: 30, seed: 11, ..Default::default() },
    ] {
        let mut progress = Vec::new();
        let report = s.score_answers(&records, None, &opts, |i, total| progress.push((i, total))).expect("scores");
        assert_eq!(progress, (1..=n).map(|i| (i, n)).collect::<Vec<_>>(), "progress");
        assert_eq!(report.answers.len(), n);
        let mut differ = 0;
        for (answer, q) in report.answers.iter().zip(&questions) {
            let prompt = [Message::new("user", q.as_str())];
            let base = s.chat_with(None, &prompt, &opts, |_| true).expect("base alone").text;
            let tuned = s.chat_with(Some("a"), &prompt, &opts, |_| true).expect("adapter alone").text;
            assert_eq!((&answer.question, &answer.base), (q, &base), "{opts:?}");
            assert_eq!(answer.adapter.as_ref(), Some(&tuned), "{q} with {opts:?}");
            differ += usize::from(base != tuned);
        }
        assert!(differ > 0, "the adapter must change some answer, or this tests little");
    }
    // A prompt past the context is refused naming its record's file and line, before any pass.
    let long = "word ".repeat(200);
    let mut bad = records;
    bad.push(Sourced {
        record: Record::Chat(vec![Message::new("user", long), Message::new("assistant", "Eight.")]),
        file: "held-out.jsonl".into(),
        line: n + 1,
    });
    let mut progress = 0;
    let opts = GenerateOptions { max_new_tokens: 6, ..Default::default() };
    let e = s.score_answers(&bad, None, &opts, |_, _| progress += 1).expect_err("too long").to_string();
    let line = format!("held-out.jsonl line {}", n + 1);
    assert!(e.contains(&line) && e.contains("do not fit the context of 128"), "{e}");
    assert_eq!(progress, 0, "refused before any answer");
}

//! Text generation: sampling (greedy, temperature, top-k, top-p, seeded), stop conditions (EOS,
//! stop strings, token limit) and streaming through a callback.

use crate::error::{Error, Result};
use crate::gpu::PendingRead;
use crate::gpu::launch::MAX_TOP_K;
use crate::lora::GpuAdapter;
use crate::lora::GpuAdapterSet;
use crate::model::llama::{DecodeRow, KvCache, Model, RowToken, RowsDecoder, StepToken};
use crate::tokenizer::Tokenizer;

/// How to pick tokens and when to stop.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerateOptions {
    /// The most tokens to generate.
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k filter.
    pub top_k: usize,
    /// 1.0 means no nucleus filter.
    pub top_p: f32,
    /// Seed of the sampling draws (unused when greedy).
    pub seed: u64,
    /// Generation stops when the text ends with one of these (the stop string is removed).
    pub stop: Vec<String>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_new_tokens: 128, temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, stop: vec![] }
    }
}

impl GenerateOptions {
    /// Every problem with the options, at once.
    pub fn validate(&self) -> Result<()> {
        let mut p = Vec::new();
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            p.push(format!("temperature {} must be finite and >= 0", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            p.push(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        if p.is_empty() { Ok(()) } else { Err(Error::invalid("generation options", p.join("; "))) }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum StopReason {
    /// The model generated an end-of-sequence token.
    Eos,
    /// The text ended with one of the stop strings.
    StopString,
    /// `max_new_tokens` were generated.
    MaxTokens,
    /// The model's context (`max_context`) is full.
    ContextFull,
    /// The token callback asked to stop.
    Callback,
}

/// The result of one generation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generated {
    /// The generated text (without a stop string that ended it).
    pub text: String,
    /// The generated tokens.
    pub token_ids: Vec<u32>,
    /// Tokens of the prompt, with the chat template applied.
    pub prompt_tokens: usize,
    /// Why generation ended.
    pub stop_reason: StopReason,
}

pub use crate::prim::Rng;

/// Picks the next token from logits.
pub fn sample(logits: &[f32], opts: &GenerateOptions, rng: &mut Rng) -> u32 {
    if opts.temperature == 0.0 {
        return crate::prim::argmax(logits);
    }
    // Highest first in the total order of f32, the lower id first among equal logits, so that
    // the top-k that the GPU picks (`Model::next_top_k_with`) is the same list.
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    if opts.top_k > 0 {
        idx.truncate(opts.top_k);
    }
    let candidates: Vec<(u32, f32)> = idx.iter().map(|&i| (i, logits[i as usize])).collect();
    sample_candidates(&candidates, opts, rng)
}

/// Picks from candidate (id, logit) pairs sorted as [`sample`] sorts them, after its top-k cut:
/// softmax at the temperature, the top-p cut, one draw.
pub fn sample_candidates(candidates: &[(u32, f32)], opts: &GenerateOptions, rng: &mut Rng) -> u32 {
    let Some(&(first, mx)) = candidates.first() else { return 0 };
    if opts.temperature == 0.0 {
        return first;
    }
    let mut idx: Vec<u32> = candidates.iter().map(|c| c.0).collect();
    let mut probs: Vec<f32> = candidates.iter().map(|&(_, l)| ((l - mx) / opts.temperature).exp()).collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if opts.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|&p| {
            acc += p;
            acc >= opts.top_p
        });
        let keep = keep.map_or(probs.len(), |k| k + 1);
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f32 = probs.iter().sum();
    let mut r = rng.next_f32() * total;
    for (p, &i) in probs.iter().zip(&idx) {
        if r < *p {
            return i;
        }
        r -= p;
    }
    idx[idx.len() - 1]
}

/// Answers a conversation: `messages` rendered by the chat template with the generation prompt,
/// then [`generate`].
pub fn chat(
    model: &Model,
    lora: Option<&GpuAdapter>,
    tokenizer: &Tokenizer,
    messages: &[crate::tokenizer::Message],
    opts: &GenerateOptions,
    on_text: impl FnMut(&str) -> bool,
) -> Result<Generated> {
    if messages.is_empty() {
        return Err(Error::invalid("messages", "are empty"));
    }
    let text = tokenizer.apply_chat_template(messages, true)?;
    let ids = tokenizer.encode(&text)?;
    generate(model, lora, tokenizer, &ids, opts, on_text)
}

/// Generates from prompt token ids (with `lora` applied, if given), calling `on_text` with each new piece of text; returning
/// `false` from it stops generation.
pub fn generate(
    model: &Model,
    lora: Option<&GpuAdapter>,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<Generated> {
    opts.validate()?;
    if prompt_ids.is_empty() {
        return Err(Error::invalid("prompt", "is empty"));
    }
    let mut rng = Rng::new(opts.seed);
    let mut cache = model.new_cache_for(cache_tokens(prompt_ids.len(), opts))?;
    if prompt_ids.len() >= cache.capacity {
        return Err(Error::invalid(
            "prompt",
            format!("{} tokens do not fit the context of {}", prompt_ids.len(), cache.capacity),
        ));
    }
    // Greedy decoding picks the token on the GPU and reads back its id; sampling with a top-k
    // cut reads back its candidates; only sampling from the whole vocabulary reads the row.
    let pick = |ids: &[u32], cache: &mut KvCache, rng: &mut Rng| -> Result<u32> {
        if opts.temperature == 0.0 {
            model.next_argmax_with(ids, cache, lora)
        } else if (1..=MAX_TOP_K).contains(&opts.top_k) {
            Ok(sample_candidates(&model.next_top_k_with(ids, cache, lora, opts.top_k)?, opts, rng))
        } else {
            Ok(sample(&model.next_logits_with(ids, cache, lora)?, opts, rng))
        }
    };
    let mut next = pick(prompt_ids, &mut cache, &mut rng)?;
    let mut stream = Stream::new(model, tokenizer, prompt_ids.len());
    if opts.temperature == 0.0 {
        let stop_reason = greedy(model, lora, &mut cache, &mut stream, next, opts, &mut on_text)?;
        return Ok(stream.finish(stop_reason));
    }
    let stop_reason = loop {
        if let Some(reason) = stream.take(next, opts, &mut on_text)? {
            break reason;
        }
        if cache.len >= cache.capacity {
            break StopReason::ContextFull;
        }
        next = pick(&[next], &mut cache, &mut rng)?;
    };
    Ok(stream.finish(stop_reason))
}

/// Greedy decoding after the prompt's pass picked `first`, with the host a step behind the
/// GPU: each step takes as its token the id the step before picked on the GPU
/// ([`StepToken::Picked`]), so it is submitted before that id is read back, and the GPU runs the
/// steps back to back while the host reads each id, streams its text and records the step after.
/// The tokens are those of a step at a time ([`Model::next_argmax_with`]); when one ends the
/// sequence, the step already submitted after it is not read.
fn greedy(
    model: &Model,
    lora: Option<&GpuAdapter>,
    cache: &mut KvCache,
    stream: &mut Stream<'_>,
    first: u32,
    opts: &GenerateOptions,
    on_text: &mut impl FnMut(&str) -> bool,
) -> Result<StopReason> {
    // Two readbacks in flight at most: the step being read and the one submitted after it.
    let staging = [model.ctx.staging("greedy id", 4), model.ctx.staging("greedy id", 4)];
    // Tokens picked so far, the prompt's pass's included: no step picks past the last allowed.
    let mut picked = 1;
    let mut room = |cache: &KvCache| {
        let go = cache.len < cache.capacity && picked < opts.max_new_tokens;
        picked += usize::from(go);
        go
    };
    let mut ahead =
        if room(cache) { Some(model.submit_argmax(StepToken::Id(first), cache, lora, &staging[0])?) } else { None };
    let (mut token, mut slot) = (first, 1);
    loop {
        if let Some(reason) = stream.take(token, opts, on_text)? {
            // A step submitted after the last token goes unread, dropped with the cache.
            return Ok(reason);
        }
        let Some(pending) = ahead.take() else {
            return Ok(StopReason::ContextFull);
        };
        if room(cache) {
            ahead = Some(model.submit_argmax(StepToken::Picked, cache, lora, &staging[slot])?);
            slot ^= 1;
        }
        token = model.ctx.finish_read(pending)?[0];
    }
}

/// The KV cache positions one sequence can use: its prompt and its new tokens (of which the last
/// is never fed); [`Model::new_cache_for`] holds the model's whole context where that is less.
fn cache_tokens(prompt_tokens: usize, opts: &GenerateOptions) -> usize {
    prompt_tokens.saturating_add(opts.max_new_tokens)
}

/// One sequence's continuation as its tokens come ([`generate`], [`generate_rows`]).
struct Stream<'a> {
    tokenizer: &'a Tokenizer,
    eos: Vec<u32>,
    out: Vec<u32>,
    text: String,
    prompt_tokens: usize,
}

impl<'a> Stream<'a> {
    fn new(model: &Model, tokenizer: &'a Tokenizer, prompt_tokens: usize) -> Self {
        let mut eos: Vec<u32> = tokenizer.eos_ids.clone();
        eos.extend(&model.config.eos_token_ids);
        Stream { tokenizer, eos, out: Vec::new(), text: String::new(), prompt_tokens }
    }

    /// Takes the token picked next, calling `on_text` with the text it completes; returns why
    /// generation ends, if it does here.
    fn take(
        &mut self,
        next: u32,
        opts: &GenerateOptions,
        on_text: &mut impl FnMut(&str) -> bool,
    ) -> Result<Option<StopReason>> {
        if self.out.len() >= opts.max_new_tokens {
            return Ok(Some(StopReason::MaxTokens));
        }
        if self.eos.contains(&next) {
            return Ok(Some(StopReason::Eos));
        }
        self.out.push(next);
        // Decode the whole continuation and emit what is new, so multi-byte characters split
        // across tokens come out whole.
        let full = self.tokenizer.decode(&self.out)?;
        let mut stop_hit = false;
        let mut visible = full.clone();
        for s in &opts.stop {
            if let Some(pos) = full.find(s.as_str()) {
                visible.truncate(pos.min(visible.len()));
                stop_hit = true;
            }
        }
        let text = &self.text;
        if visible.len() > text.len() && visible.is_char_boundary(text.len()) && !visible.ends_with('\u{FFFD}') {
            let piece = visible[text.len()..].to_string();
            self.text = visible;
            if !on_text(&piece) {
                return Ok(Some(StopReason::Callback));
            }
        }
        if stop_hit {
            return Ok(Some(StopReason::StopString));
        }
        // The last token allowed ends it here, with no pass to pick one more.
        Ok((self.out.len() >= opts.max_new_tokens).then_some(StopReason::MaxTokens))
    }

    fn finish(self, stop_reason: StopReason) -> Generated {
        Generated { text: self.text, token_ids: self.out, prompt_tokens: self.prompt_tokens, stop_reason }
    }
}

/// One sequence of [`generate_rows`]: its prompt and its adapter (an index into the adapters
/// given; `None` for the base model).
#[derive(Debug, Clone, Copy)]
pub struct RowRequest<'a> {
    /// Prompt token ids.
    pub prompt_ids: &'a [u32],
    /// Its adapter among those given.
    pub adapter: Option<usize>,
}

/// Generates a continuation of several prompts at once, each with its own adapter among
/// `adapters` (or none): every prompt runs alone with its adapter, then each step decodes one
/// token of every sequence not yet ended in one pass ([`Model::decode_rows`]: the base model's
/// products read its weights once for all of them). Each sequence samples with its own
/// generator seeded by `opts.seed` and stops on its own, so it gets what [`generate`] gives it
/// alone (up to the order of the sums). Each has a KV cache of its prompt and
/// `opts.max_new_tokens`, not of the model's whole context, in one pool with the others'
/// ([`Model::new_caches_for`]), so that a step's attention is one dispatch a layer. Greedy
/// decoding keeps the GPU a step ahead of the host: each step is submitted before the ids of
/// the one before are read back ([`Model::submit_rows_argmax`]). More sequences than a step
/// takes ([`Model::most_decode_rows`]) are decoded as [`generate_queue`] decodes them.
/// `on_text` gets each new piece of text with its sequence's index; returning `false` ends that
/// sequence.
pub fn generate_rows(
    model: &Model,
    adapters: &[&GpuAdapter],
    tokenizer: &Tokenizer,
    requests: &[RowRequest<'_>],
    opts: &GenerateOptions,
    on_text: impl FnMut(usize, &str) -> bool,
) -> Result<Vec<Generated>> {
    let rows = rows_for(model, adapters, requests.len());
    generate_queue(&RowsJob { model, adapters, tokenizer, requests, opts }, rows, on_text)
}

/// `wanted` rows, or fewer where a step with `adapters` takes fewer
/// ([`Model::most_decode_rows`]); at least one, so that a model no row fits is refused by the
/// decoder, in words.
pub fn rows_for(model: &Model, adapters: &[&GpuAdapter], wanted: usize) -> usize {
    let rank = adapters.iter().map(|a| a.layout.r).max().unwrap_or(1).max(1);
    wanted.min(model.most_decode_rows(rank)).max(1)
}

/// Requests to decode together ([`generate_queue`]): each with its adapter among `adapters`.
#[derive(Debug, Clone, Copy)]
pub struct RowsJob<'a, 'p> {
    /// The model.
    pub model: &'a Model,
    /// The adapters the requests name.
    pub adapters: &'a [&'a GpuAdapter],
    /// The model's tokenizer, for the text.
    pub tokenizer: &'a Tokenizer,
    /// The requests.
    pub requests: &'a [RowRequest<'p>],
    /// How to pick tokens and when to stop.
    pub opts: &'a GenerateOptions,
}

/// Generates a continuation of each of `job`'s requests, decoding `rows` of them at a time as
/// [`generate_rows`] does: each row decodes a request until it ends, then takes the next request
/// not yet started, whose prompt runs alone in the row's cache before it joins the rows' steps;
/// so a long answer holds one row, not a pass of many. Each request gets what [`generate`] gives
/// it alone (up to the order of the sums). Where every request has a row, each row's cache holds
/// its request's prompt and `max_new_tokens`; else each holds the longest request's. `on_text`
/// gets each new piece of text with its request's index; returning `false` ends that request.
/// Refused: no rows, or more than [`Model::rows_decoder`] takes (of which at most one a request
/// is made).
pub fn generate_queue(
    job: &RowsJob<'_, '_>,
    rows: usize,
    on_text: impl FnMut(usize, &str) -> bool,
) -> Result<Vec<Generated>> {
    generate_queue_each(job, rows, on_text, |_, _| {})
}

/// [`generate_queue`], with `on_end` given each request's index and what it generated as soon
/// as it ends (requests end in any order), so that an answer can be used while longer ones go on.
pub fn generate_queue_each(
    job: &RowsJob<'_, '_>,
    rows: usize,
    mut on_text: impl FnMut(usize, &str) -> bool,
    on_end: impl FnMut(usize, &Generated),
) -> Result<Vec<Generated>> {
    let RowsJob { model, adapters, requests, opts, .. } = *job;
    opts.validate()?;
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let mut loras = Vec::with_capacity(requests.len());
    for (i, r) in requests.iter().enumerate() {
        loras.push(match r.adapter {
            None => None,
            Some(a) => Some(*adapters.get(a).ok_or_else(|| {
                Error::invalid("adapter", format!("request {i} names adapter {a}, of {} given", adapters.len()))
            })?),
        });
        check_row_prompt(model, &format!("request {i}"), r.prompt_ids)?;
    }
    // No more rows than requests (none is refused by the decoder).
    let rows = rows.min(requests.len());
    let set = GpuAdapterSet::new(&model.ctx, adapters, model.config.num_layers)?;
    let decoder = model.rows_decoder(rows, set.max_rank())?;
    // The caches in one pool, so that each step's attention is one dispatch a layer.
    let mut sizes: Vec<usize> = requests.iter().map(|r| cache_tokens(r.prompt_ids.len(), opts)).collect();
    if requests.len() > rows {
        sizes = vec![sizes.iter().copied().max().unwrap_or(1); rows];
    }
    let caches = model.new_caches_for(&sizes)?;
    let mut q = Queue {
        run: job,
        loras,
        set,
        decoder,
        caches,
        request: vec![None; rows],
        token: vec![0; rows],
        fresh: vec![false; rows],
        picked: vec![0; rows],
        streams: (0..requests.len()).map(|_| None).collect(),
        rngs: vec![Rng::new(opts.seed); requests.len()],
        ended: (0..requests.len()).map(|_| None).collect(),
        started: 0,
        on_end,
    };
    if opts.temperature == 0.0 {
        q.greedy(&mut on_text)?
    } else {
        q.sampled(&mut on_text)?
    }
    q.ended.into_iter().map(|g| g.ok_or_else(|| Error::Gpu("a request never ended".into()))).collect()
}

/// The state of [`generate_queue_each`]: which request each row decodes, and each request's
/// text so far.
struct Queue<'r, 'a, 'p, E> {
    run: &'r RowsJob<'a, 'p>,
    loras: Vec<Option<&'a GpuAdapter>>,
    set: GpuAdapterSet,
    decoder: RowsDecoder,
    /// A cache a row.
    caches: Vec<KvCache>,
    /// The request each row decodes (or decoded last).
    request: Vec<Option<usize>>,
    /// Each row's last token, and whether it is still to be taken by its request's stream.
    token: Vec<u32>,
    fresh: Vec<bool>,
    /// The tokens picked for each row's request so far, its prompt's pass's included: no step
    /// picks past the last allowed.
    picked: Vec<usize>,
    /// Each request's text so far, until it ends.
    streams: Vec<Option<Stream<'a>>>,
    rngs: Vec<Rng>,
    /// What each request generated, once it has ended.
    ended: Vec<Option<Generated>>,
    /// Requests given a row so far (they start in order).
    started: usize,
    on_end: E,
}

impl<E: FnMut(usize, &Generated)> Queue<'_, '_, '_, E> {
    /// The request `row` decodes, if that has not ended.
    fn active(&self, row: usize) -> Option<usize> {
        self.request[row].filter(|&r| self.ended[r].is_none())
    }

    /// Whether no row decodes a request and none is left to start.
    fn finished(&self) -> bool {
        self.started == self.run.requests.len() && (0..self.caches.len()).all(|row| self.active(row).is_none())
    }

    /// Whether `row` may decode one more token (counted as picked when it may).
    fn room(&mut self, row: usize) -> bool {
        let cache = &self.caches[row];
        let go = cache.len < cache.capacity && self.picked[row] < self.run.opts.max_new_tokens;
        self.picked[row] += usize::from(go);
        go
    }

    /// Gives each row that is free and not in `busy` (rows of a step whose ids are not yet read)
    /// the next request not yet started: its prompt runs alone in the row's cache and picks its
    /// first token, to be taken.
    fn start(&mut self, busy: &[usize]) -> Result<()> {
        let RowsJob { model, tokenizer, requests, opts, .. } = *self.run;
        for row in 0..self.caches.len() {
            if self.started == requests.len() {
                break;
            }
            if self.active(row).is_some() || busy.contains(&row) {
                continue;
            }
            let (r, prompt) = (self.started, requests[self.started].prompt_ids);
            self.started += 1;
            let cache = &mut self.caches[row];
            cache.len = 0;
            self.token[row] = if opts.temperature == 0.0 {
                model.next_argmax_with(prompt, cache, self.loras[r])?
            } else if (1..=MAX_TOP_K).contains(&opts.top_k) {
                let candidates = model.next_top_k_with(prompt, cache, self.loras[r], opts.top_k)?;
                sample_candidates(&candidates, opts, &mut self.rngs[r])
            } else {
                sample(&model.next_logits_with(prompt, cache, self.loras[r])?, opts, &mut self.rngs[r])
            };
            self.request[row] = Some(r);
            (self.fresh[row], self.picked[row]) = (true, 1);
            self.streams[r] = Some(Stream::new(model, tokenizer, prompt.len()));
        }
        Ok(())
    }

    /// Each row's fresh token taken by its request's stream, which may end the request.
    fn take(&mut self, on_text: &mut impl FnMut(usize, &str) -> bool) -> Result<()> {
        for row in 0..self.caches.len() {
            let Some(r) = self.active(row).filter(|_| self.fresh[row]) else { continue };
            self.fresh[row] = false;
            let Some(stream) = self.streams[r].as_mut() else { continue };
            if let Some(reason) = stream.take(self.token[row], self.run.opts, &mut |piece| on_text(r, piece))? {
                self.end(r, reason)?;
            }
        }
        Ok(())
    }

    /// Ends request `r` for `reason`, and gives `on_end` what it generated.
    fn end(&mut self, r: usize, reason: StopReason) -> Result<()> {
        let stream = self.streams[r].take().ok_or_else(|| Error::Gpu(format!("request {r} ended twice")))?;
        let generated = stream.finish(reason);
        (self.on_end)(r, &generated);
        self.ended[r] = Some(generated);
        Ok(())
    }

    /// Ends the requests of `rows` with [`StopReason::ContextFull`]: their caches are full.
    fn full(&mut self, rows: impl Iterator<Item = usize>) -> Result<()> {
        for row in rows {
            if let Some(r) = self.active(row) {
                self.end(r, StopReason::ContextFull)?;
            }
        }
        Ok(())
    }

    /// A step's rows: those `feed` names (in the order of the rows), each with its token.
    fn step<'c>(
        caches: &'c mut [KvCache],
        request: &[Option<usize>],
        requests: &[RowRequest<'_>],
        feed: &[(usize, RowToken)],
    ) -> Vec<DecodeRow<'c>> {
        let mut feed = feed.iter().peekable();
        caches
            .iter_mut()
            .enumerate()
            .filter_map(|(row, cache)| {
                let &(_, token) = feed.next_if(|f| f.0 == row)?;
                let adapter = request[row].and_then(|r| requests[r].adapter);
                Some(DecodeRow { cache, adapter, token })
            })
            .collect()
    }

    /// Greedy decoding with the host a step behind the GPU, as in [`greedy`]: each step's rows
    /// take as their tokens the ids the step before picked for them on the GPU
    /// ([`RowToken::Picked`]), or the first token of a request just started
    /// ([`RowToken::Id`]), so a step is submitted before the ids of the one before are read
    /// back. A request that ends has had one step submitted after its last token, which is not
    /// read; its row takes the next request once that step's ids are read.
    fn greedy(&mut self, on_text: &mut impl FnMut(usize, &str) -> bool) -> Result<()> {
        let RowsJob { model, requests, .. } = *self.run;
        let ctx = &model.ctx;
        let bytes = 4 * self.caches.len() as u64;
        // Two readbacks in flight at most: the step being read and the one submitted after it.
        let staging = [ctx.staging("rows' ids", bytes), ctx.staging("rows' ids", bytes)];
        let mut slot = 0;
        // The step in flight and its rows.
        let mut ahead: Option<(PendingRead, Vec<usize>)> = None;
        loop {
            self.take(on_text)?;
            // A request going on that the step in flight does not decode has filled its cache.
            let decoded: &[usize] = ahead.as_ref().map_or(&[], |a| &a.1);
            let unfed: Vec<usize> = (0..self.caches.len()).filter(|row| !decoded.contains(row)).collect();
            self.full(unfed.into_iter())?;
            if self.finished() {
                // A step submitted after the last tokens goes unread.
                return Ok(());
            }
            let pending = ahead.take();
            let busy: &[usize] = pending.as_ref().map_or(&[], |p| &p.1);
            self.start(busy)?;
            let mut feed = Vec::new();
            for row in 0..self.caches.len() {
                if self.active(row).is_none() {
                    continue;
                }
                let token = match busy.iter().position(|&b| b == row) {
                    Some(at) => RowToken::Picked(at),
                    None => RowToken::Id(self.token[row]),
                };
                if self.room(row) {
                    feed.push((row, token));
                }
            }
            if !feed.is_empty() {
                let mut rows = Self::step(&mut self.caches, &self.request, requests, &feed);
                let read = model.submit_rows_argmax(&mut self.decoder, &self.set, &mut rows, &staging[slot])?;
                ahead = Some((read, feed.iter().map(|f| f.0).collect()));
                slot ^= 1;
            }
            if let Some((read, rows)) = pending {
                let ids = ctx.finish_read(read)?;
                for (&row, id) in rows.iter().zip(ids) {
                    self.token[row] = id;
                    self.fresh[row] = true;
                }
            }
        }
    }

    /// Sampling: each step reads back each row's top-k candidates, chosen on the GPU (or its
    /// logits, without a top-k the GPU takes), and each request draws from its own generator.
    fn sampled(&mut self, on_text: &mut impl FnMut(usize, &str) -> bool) -> Result<()> {
        let RowsJob { model, requests, opts, .. } = *self.run;
        let vocab = model.config.vocab_size;
        loop {
            self.start(&[])?;
            self.take(on_text)?;
            let filled: Vec<usize> =
                (0..self.caches.len()).filter(|&row| self.caches[row].len >= self.caches[row].capacity).collect();
            self.full(filled.into_iter())?;
            if self.finished() {
                return Ok(());
            }
            let feed: Vec<(usize, RowToken)> = (0..self.caches.len())
                .filter(|&row| self.active(row).is_some())
                .map(|row| (row, RowToken::Id(self.token[row])))
                .collect();
            if feed.is_empty() {
                continue;
            }
            let mut rows = Self::step(&mut self.caches, &self.request, requests, &feed);
            let on_gpu = (1..=MAX_TOP_K).contains(&opts.top_k);
            let (candidates, logits) = if on_gpu {
                (model.decode_rows_top_k(&mut self.decoder, &self.set, &mut rows, opts.top_k)?, Vec::new())
            } else {
                (Vec::new(), model.decode_rows(&mut self.decoder, &self.set, &mut rows)?)
            };
            for (at, &(row, _)) in feed.iter().enumerate() {
                let r = self.request[row].ok_or_else(|| Error::Gpu("a decoded row has no request".into()))?;
                let rng = &mut self.rngs[r];
                self.token[row] = if on_gpu {
                    sample_candidates(&candidates[at], opts, rng)
                } else {
                    sample(&logits[at * vocab..(at + 1) * vocab], opts, rng)
                };
                self.fresh[row] = true;
            }
        }
    }
}

/// Refuses the prompt of the request `what` names where it is empty or leaves no room in the
/// context.
fn check_row_prompt(model: &Model, what: &str, ids: &[u32]) -> Result<()> {
    if ids.is_empty() {
        return Err(Error::invalid("prompt", format!("{what} is empty")));
    }
    if ids.len() >= model.max_context {
        return Err(Error::invalid(
            "prompt",
            format!("{what}: {} tokens do not fit the context of {}", ids.len(), model.max_context),
        ));
    }
    Ok(())
}

/// The most answers [`chat_rows`] decodes together: enough that a GPU, whose decoding is bound
/// by reading the weights, reads them once for many tokens; few enough that the rows' logits
/// stay small (16 rows of a 262,144-token vocabulary: 16 MiB) and a pass's answers come back
/// often.
pub const ANSWER_ROWS: usize = 16;

/// One conversation of [`chat_rows`].
#[derive(Debug, Clone)]
pub struct ChatRequest<'a> {
    /// Its messages, rendered with the chat template and its generation prompt.
    pub messages: &'a [crate::tokenizer::Message],
    /// Its adapter among those given; `None` for the base model.
    pub adapter: Option<usize>,
    /// Where it comes from, for errors about it (a file and line, say).
    pub source: String,
}

impl<'a> ChatRequest<'a> {
    /// A held-out exchange's prompt ([`crate::data::exchanges`]) to answer with `adapter`, named
    /// by its file and line.
    pub fn exchange(x: &'a crate::data::Exchange, adapter: Option<usize>) -> Self {
        ChatRequest { messages: &x.prompt, adapter, source: format!("{} line {}", x.file.display(), x.line) }
    }
}

/// Each request's prompt ids, its messages rendered with the chat template and its generation
/// prompt; a request without messages, or whose prompt leaves no room in the model's context,
/// is refused naming its source.
pub fn chat_prompts(model: &Model, tokenizer: &Tokenizer, requests: &[ChatRequest<'_>]) -> Result<Vec<Vec<u32>>> {
    let mut prompts = Vec::with_capacity(requests.len());
    for r in requests {
        if r.messages.is_empty() {
            return Err(Error::invalid("messages", format!("{} has none", r.source)));
        }
        let ids = tokenizer.encode(&tokenizer.apply_chat_template(r.messages, true)?)?;
        check_row_prompt(model, &r.source, &ids)?;
        prompts.push(ids);
    }
    Ok(prompts)
}

/// Answers conversations, each with its adapter among `adapters`, [`ANSWER_ROWS`] at a time
/// (fewer where [`Model::most_decode_rows`] takes fewer) as [`generate_queue`] decodes them,
/// each row taking the next conversation when its answer ends: each gets what [`chat`] gives it
/// alone (up to the order of the sums) while a step decodes a token of many in one pass. `done`
/// gets the number answered whenever it grows.
pub fn chat_rows(
    model: &Model,
    adapters: &[&GpuAdapter],
    tokenizer: &Tokenizer,
    requests: &[ChatRequest<'_>],
    opts: &GenerateOptions,
    mut done: impl FnMut(usize),
) -> Result<Vec<Generated>> {
    opts.validate()?;
    let prompts = chat_prompts(model, tokenizer, requests)?;
    let rows = rows_for(model, adapters, ANSWER_ROWS.min(requests.len()));
    let requests: Vec<RowRequest<'_>> =
        requests.iter().zip(&prompts).map(|(r, ids)| RowRequest { prompt_ids: ids, adapter: r.adapter }).collect();
    let mut answered = 0;
    let job = RowsJob { model, adapters, tokenizer, requests: &requests, opts };
    generate_queue_each(
        &job,
        rows,
        |_, _| true,
        |_, _| {
            answered += 1;
            done(answered);
        },
    )
}

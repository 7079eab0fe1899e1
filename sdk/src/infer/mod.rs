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
/// ([`Model::new_caches_for`]), so that a step's attention is one dispatch a layer.
/// `on_text` gets each new piece of text with its sequence's index; returning `false` ends that
/// sequence. Refused: more sequences than [`Model::rows_decoder`] takes at once.
pub fn generate_rows(
    model: &Model,
    adapters: &[&GpuAdapter],
    tokenizer: &Tokenizer,
    requests: &[RowRequest<'_>],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(usize, &str) -> bool,
) -> Result<Vec<Generated>> {
    opts.validate()?;
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let lora = |i: usize| -> Result<Option<&GpuAdapter>> {
        match requests[i].adapter {
            None => Ok(None),
            Some(a) => adapters.get(a).copied().map(Some).ok_or_else(|| {
                Error::invalid("adapter", format!("request {i} names adapter {a}, of {} given", adapters.len()))
            }),
        }
    };
    let set = crate::lora::GpuAdapterSet::new(&model.ctx, adapters, model.config.num_layers)?;
    let mut decoder = model.rows_decoder(requests.len(), set.max_rank())?;
    let mut loras = Vec::with_capacity(requests.len());
    for (i, r) in requests.iter().enumerate() {
        loras.push(lora(i)?);
        check_row_prompt(model, &format!("request {i}"), r.prompt_ids)?;
    }
    // The caches in one pool, so that each step's attention is one dispatch a layer.
    let sizes: Vec<usize> = requests.iter().map(|r| cache_tokens(r.prompt_ids.len(), opts)).collect();
    let mut caches = model.new_caches_for(&sizes)?;
    let (mut streams, mut rngs, mut next) = (Vec::new(), Vec::new(), Vec::new());
    for ((r, cache), lora) in requests.iter().zip(&mut caches).zip(loras) {
        let mut rng = Rng::new(opts.seed);
        next.push(if opts.temperature == 0.0 {
            model.next_argmax_with(r.prompt_ids, cache, lora)?
        } else {
            sample(&model.next_logits_with(r.prompt_ids, cache, lora)?, opts, &mut rng)
        });
        rngs.push(rng);
        streams.push(Stream::new(model, tokenizer, r.prompt_ids.len()));
    }
    let mut rows = Rows { model, decoder: &mut decoder, set: &set, requests, caches: &mut caches };
    let ended = if opts.temperature == 0.0 {
        greedy_rows(&mut rows, &mut streams, next, opts, &mut on_text)?
    } else {
        sample_rows(&mut rows, &mut streams, (&mut rngs, next), opts, &mut on_text)?
    };
    Ok(streams.into_iter().zip(ended).map(|(s, e)| s.finish(e)).collect())
}

/// What the steps of [`generate_rows`] decode with: its requests, with a cache each.
struct Rows<'a, 'p> {
    model: &'a Model,
    decoder: &'a mut RowsDecoder,
    set: &'a GpuAdapterSet,
    requests: &'a [RowRequest<'p>],
    caches: &'a mut [KvCache],
}

impl Rows<'_, '_> {
    /// The rows of a step: the requests `feed` names, each with its token; `feed` is in the
    /// order of the requests, as the rows are.
    fn step<'c>(
        caches: &'c mut [KvCache],
        requests: &[RowRequest<'_>],
        feed: &[(usize, RowToken)],
    ) -> Vec<DecodeRow<'c>> {
        let mut feed = feed.iter().peekable();
        caches
            .iter_mut()
            .enumerate()
            .filter_map(|(i, cache)| {
                let &(_, token) = feed.next_if(|f| f.0 == i)?;
                Some(DecodeRow { cache, adapter: requests[i].adapter, token })
            })
            .collect()
    }

    /// Submits the greedy step of the requests `feed` names ([`Model::submit_rows_argmax`]),
    /// reading their ids into `staging`; returns the read and the requests, or `None` where
    /// `feed` names none.
    fn submit(
        &mut self,
        feed: &[(usize, RowToken)],
        staging: &wgpu::Buffer,
    ) -> Result<Option<(PendingRead, Vec<usize>)>> {
        if feed.is_empty() {
            return Ok(None);
        }
        let mut rows = Self::step(self.caches, self.requests, feed);
        let pending = self.model.submit_rows_argmax(self.decoder, self.set, &mut rows, staging)?;
        Ok(Some((pending, feed.iter().map(|f| f.0).collect())))
    }
}

/// Greedy decoding of [`generate_rows`] after the prompts' passes picked `tokens`, with the
/// host a step behind the GPU as in [`greedy`]: each step's rows take as their tokens the ids
/// the step before picked for them on the GPU ([`RowToken::Picked`]), so a step is submitted
/// before the ids of the one before are read back. A step decodes the sequences of the step
/// before that had not ended when it was submitted: a sequence that ends has had one step
/// submitted after its last token, which is not read.
fn greedy_rows(
    rows: &mut Rows<'_, '_>,
    streams: &mut [Stream<'_>],
    mut tokens: Vec<u32>,
    opts: &GenerateOptions,
    on_text: &mut impl FnMut(usize, &str) -> bool,
) -> Result<Vec<StopReason>> {
    let n = streams.len();
    let ctx = &rows.model.ctx;
    // Two readbacks in flight at most: the step being read and the one submitted after it.
    let staging = [ctx.staging("rows' ids", 4 * n as u64), ctx.staging("rows' ids", 4 * n as u64)];
    // Each sequence's tokens picked so far, its prompt's pass's included: no step picks past
    // the last allowed.
    let mut picked = vec![1; n];
    let mut room = |i: usize, cache: &KvCache| {
        let go = cache.len < cache.capacity && picked[i] < opts.max_new_tokens;
        picked[i] += usize::from(go);
        go
    };
    let feed: Vec<(usize, RowToken)> =
        (0..n).filter(|&i| room(i, &rows.caches[i])).map(|i| (i, RowToken::Id(tokens[i]))).collect();
    let mut ahead = rows.submit(&feed, &staging[0])?;
    let mut slot = 1;
    let mut ended: Vec<Option<StopReason>> = vec![None; n];
    loop {
        for (i, stream) in streams.iter_mut().enumerate() {
            if ended[i].is_none() {
                ended[i] = stream.take(tokens[i], opts, &mut |piece| on_text(i, piece))?;
            }
        }
        // A sequence going on that the step in flight does not decode has filled its cache.
        let decoded: &[usize] = ahead.as_ref().map_or(&[], |a| &a.1);
        for (i, e) in ended.iter_mut().enumerate() {
            if e.is_none() && !decoded.contains(&i) {
                *e = Some(StopReason::ContextFull);
            }
        }
        let Some((pending, decoded)) = ahead.take() else { break };
        let feed: Vec<(usize, RowToken)> = decoded
            .iter()
            .enumerate()
            .filter(|&(_, &i)| ended[i].is_none() && room(i, &rows.caches[i]))
            .map(|(row, &i)| (i, RowToken::Picked(row)))
            .collect();
        ahead = rows.submit(&feed, &staging[slot])?;
        slot ^= 1;
        let ids = ctx.finish_read(pending)?;
        decoded.iter().zip(ids).for_each(|(&i, id)| tokens[i] = id);
    }
    Ok(ended.into_iter().map(|e| e.unwrap_or(StopReason::MaxTokens)).collect())
}

/// Sampling in [`generate_rows`] after the prompts' passes picked `next`: each step reads back
/// the rows' logits, and each sequence draws from its own generator.
fn sample_rows(
    rows: &mut Rows<'_, '_>,
    streams: &mut [Stream<'_>],
    (rngs, mut next): (&mut [Rng], Vec<u32>),
    opts: &GenerateOptions,
    on_text: &mut impl FnMut(usize, &str) -> bool,
) -> Result<Vec<StopReason>> {
    let n = streams.len();
    let vocab = rows.model.config.vocab_size;
    let mut ended: Vec<Option<StopReason>> = vec![None; n];
    loop {
        for (i, stream) in streams.iter_mut().enumerate() {
            if ended[i].is_none() {
                ended[i] = stream.take(next[i], opts, &mut |piece| on_text(i, piece))?;
                if ended[i].is_none() && rows.caches[i].len >= rows.caches[i].capacity {
                    ended[i] = Some(StopReason::ContextFull);
                }
            }
        }
        let going: Vec<(usize, RowToken)> =
            (0..n).filter(|&i| ended[i].is_none()).map(|i| (i, RowToken::Id(next[i]))).collect();
        if going.is_empty() {
            break;
        }
        let mut step = Rows::step(rows.caches, rows.requests, &going);
        let logits = rows.model.decode_rows(rows.decoder, rows.set, &mut step)?;
        for (row, &(i, _)) in going.iter().enumerate() {
            next[i] = sample(&logits[row * vocab..(row + 1) * vocab], opts, &mut rngs[i]);
        }
    }
    Ok(ended.into_iter().map(|e| e.unwrap_or(StopReason::MaxTokens)).collect())
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

/// Answers conversations, each with its adapter among `adapters`: through
/// [`generate_rows`], [`ANSWER_ROWS`] at a time (fewer where [`Model::most_decode_rows`] takes
/// fewer), so each gets what [`chat`] gives it alone (up to the order of the sums) while a step
/// decodes a token of each in one pass. `done` gets the number answered after each pass.
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
    let rank = adapters.iter().map(|a| a.layout.r).max().unwrap_or(1).max(1);
    // At least one, so that a model no row fits is refused by the decoder, in words.
    let rows = ANSWER_ROWS.min(model.most_decode_rows(rank)).max(1);
    let mut out = Vec::with_capacity(requests.len());
    for (chunk, ids) in requests.chunks(rows).zip(prompts.chunks(rows)) {
        let rows: Vec<RowRequest<'_>> =
            chunk.iter().zip(ids).map(|(r, ids)| RowRequest { prompt_ids: ids, adapter: r.adapter }).collect();
        out.extend(generate_rows(model, adapters, tokenizer, &rows, opts, |_, _| true)?);
        done(out.len());
    }
    Ok(out)
}

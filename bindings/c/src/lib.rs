//! The C ABI of edgetune (`include/edgetune.h`, generated from this file by cbindgen).
//!
//! Conventions, for every function:
//! - It returns an `edgetune_status`; on anything but `EDGETUNE_OK`,
//!   `edgetune_last_error_message` gives the reason (per thread).
//! - A NULL pointer argument is `EDGETUNE_ERROR_NULL_ARGUMENT`, except where a parameter says it
//!   may be NULL and in the `*_free` functions, which accept NULL and do nothing.
//! - Strings are NUL-terminated UTF-8. A string the library returns is freed with
//!   `edgetune_string_free`; strings it passes to a callback are valid during the call only.
//! - A Rust panic never crosses the ABI: it is caught and reported as `EDGETUNE_ERROR_PANIC`.
//! - Handles (`edgetune_context *`, `edgetune_model *`, `edgetune_adapter *`,
//!   `edgetune_trainer *`) are opaque ids, never addresses, and never reused. Each call looks
//!   its handles up and holds what they name until it returns, so a handle freed on one thread
//!   while another thread is inside a call with it stays valid for that call; any later call
//!   with it fails with `EDGETUNE_ERROR_INVALID_ARGUMENT`, as does a handle of the wrong kind or
//!   one not from this library. The rule that remains: free each handle once you are done with
//!   it, or its model, adapter or trainer stays in memory.
//! - Calls on one model, and calls on one trainer, run one at a time (other threads wait). A call
//!   made from inside a callback on the model or trainer whose call invoked the callback (say,
//!   `edgetune_generate` on the same model from its token callback) returns
//!   `EDGETUNE_ERROR_BUSY` at once instead of waiting for itself; `edgetune_trainer_cancel`
//!   always works, also from a callback.

#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use edgetune::data::{self, Source};
use edgetune::gpu::{GpuContext, GpuOptions};
use edgetune::infer::GenerateOptions;
use edgetune::lora::{Adapter, peft};
use edgetune::model::llama::{LoadOptions, Quant};
use edgetune::quant::gguf_blocks::GgmlType;
use edgetune::session::{AnswerEvent, ManyRequests, Prompt};
use edgetune::tokenizer::Message;
use edgetune::train::{AnswerEval, CancelToken, Event, StopReason, TrainConfig, Trainer};
use edgetune::{Error, Session};

/// What a call returned.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum edgetune_status {
    EDGETUNE_OK = 0,
    /// A pointer argument that must not be NULL was NULL.
    EDGETUNE_ERROR_NULL_ARGUMENT = 1,
    /// An argument or a setting is invalid (bad JSON, an unknown field, a value out of range,
    /// a string that is not UTF-8, a call out of order).
    EDGETUNE_ERROR_INVALID_ARGUMENT = 2,
    /// A file or folder could not be read or written.
    EDGETUNE_ERROR_IO = 3,
    /// A file's content is not what was expected (a broken model, dataset or checkpoint).
    EDGETUNE_ERROR_FORMAT = 4,
    /// The model uses something edgetune does not support.
    EDGETUNE_ERROR_UNSUPPORTED = 5,
    /// No GPU adapter was found.
    EDGETUNE_ERROR_NO_GPU = 6,
    /// The GPU reported an error.
    EDGETUNE_ERROR_GPU = 7,
    /// Training kept producing a non-finite loss.
    EDGETUNE_ERROR_DIVERGED = 8,
    /// A bug in edgetune (a caught panic). Please report it with the message.
    EDGETUNE_ERROR_PANIC = 9,
    /// The call was made from inside a callback on the model or trainer that the call which
    /// invoked the callback is using; make it after that call returns.
    EDGETUNE_ERROR_BUSY = 10,
    /// The GPU ran out of memory while allocating; the message names what, the planned bytes
    /// and which setting to lower.
    EDGETUNE_ERROR_OUT_OF_MEMORY = 11,
}

use edgetune_status::*;

/// How the base's linear weights are held: `EDGETUNE_QUANT_GGUF` (what the Rust API, the CLI and
/// Python default to) keeps the values of a GGUF file's quantized tensors (Q4_0, Q4_1, Q4_K,
/// Q5_0, Q5_1, Q5_K, Q6_K, Q8_0) and holds the rest, and every weight of a Hugging Face folder,
/// as NF4; `EDGETUNE_QUANT_NF4`
/// holds every linear weight as NF4 (a GGUF file's blocks rounded again); `EDGETUNE_QUANT_NONE`
/// holds f32. The numbers are fixed: 0 stays NF4.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum edgetune_quant {
    EDGETUNE_QUANT_NF4 = 0,
    EDGETUNE_QUANT_NONE = 1,
    EDGETUNE_QUANT_GGUF = 2,
}

/// Which fields of an `edgetune_event` are set.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum edgetune_event_kind {
    /// Training starts: `total_steps`, `step` (non-zero when resumed), `gpu_memory_bytes`
    /// (planned), and in `message` the settings chosen from the data, one per line
    /// (`setting = value (why)`; see `edgetune_trainer_settings`).
    EDGETUNE_EVENT_STARTED = 0,
    /// An optimizer step ended: `step`, `total_steps`, `epoch`, `loss`, `lr`, `grad_norm`,
    /// `tokens_per_s`, `eta_s`, `gpu_memory_bytes`.
    EDGETUNE_EVENT_STEP = 1,
    /// An evaluation: `step`, `val_loss`, `perplexity`, `best_val_loss`.
    EDGETUNE_EVENT_EVAL = 2,
    /// Something worth telling the user (`message`), such as a skipped non-finite step or a
    /// validation loss that rises while the training loss falls (with what to do about it).
    EDGETUNE_EVENT_WARNING = 3,
    /// A checkpoint was written (`message` is its path).
    EDGETUNE_EVENT_CHECKPOINT = 4,
    /// Training ended: `step`, `best_val_loss`, `message` ("completed", "early_stopped" or
    /// "cancelled").
    EDGETUNE_EVENT_FINISHED = 5,
}

/// A training event. Fields a kind does not set are 0 (NaN for `val_loss`, `perplexity`,
/// `best_val_loss` and the rewards). `message` is NULL or a string valid during the callback
/// only. The rewards are DPO's (TRL's `rewards/chosen` and so on), on step events and on
/// evaluations of preference pairs: means over the step's (or the validation set's) pairs.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct edgetune_event {
    pub kind: edgetune_event_kind,
    pub step: u64,
    pub total_steps: u64,
    pub epoch: f64,
    pub loss: f32,
    pub lr: f32,
    pub grad_norm: f32,
    pub val_loss: f32,
    pub perplexity: f32,
    pub best_val_loss: f32,
    pub tokens_per_s: f64,
    pub eta_s: f64,
    pub gpu_memory_bytes: u64,
    pub message: *const c_char,
    pub reward_chosen: f32,
    pub reward_rejected: f32,
    pub reward_margin: f32,
    pub reward_accuracy: f32,
    /// On evaluations of a trainer that scores answers (`edgetune_trainer_score_answers`): the
    /// base model's mean exact match, token F1 and ROUGE-L over the held-out answers, and the
    /// adapter's at this step; NaN otherwise.
    pub answers_base_exact: f64,
    pub answers_base_f1: f64,
    pub answers_base_rouge_l: f64,
    pub answers_exact: f64,
    pub answers_f1: f64,
    pub answers_rouge_l: f64,
}

/// Receives training events on the thread that called `edgetune_trainer_run`.
pub type edgetune_event_callback = Option<unsafe extern "C" fn(userdata: *mut c_void, event: *const edgetune_event)>;

/// Receives generated text piece by piece; return 0 to stop generating, non-zero to go on.
pub type edgetune_token_callback = Option<unsafe extern "C" fn(userdata: *mut c_void, piece: *const c_char) -> i32>;

/// Receives the text of one of several requests piece by piece (`edgetune_generate_many`): the
/// request's index in the list and the piece; return 0 to end that request, non-zero to go on.
pub type edgetune_request_callback =
    Option<unsafe extern "C" fn(userdata: *mut c_void, request: usize, piece: *const c_char) -> i32>;

/// Told that one of several requests has ended (`edgetune_generate_many_each`), as soon as it
/// ends: the request's index in the list and its result as a JSON object, `{"text",
/// "token_ids", "prompt_tokens", "stop_reason"}`, valid during the call only.
pub type edgetune_request_end_callback =
    Option<unsafe extern "C" fn(userdata: *mut c_void, request: usize, result_json: *const c_char)>;

/// A GPU context: the adapter and device that models are loaded onto (an opaque handle).
#[derive(Debug)]
pub struct edgetune_context {
    _opaque: [u8; 0],
}

/// A model on the GPU with its tokenizer and the adapter applied to generation, if any (an
/// opaque handle).
#[derive(Debug)]
pub struct edgetune_model {
    _opaque: [u8; 0],
}

/// A LoRA adapter in host memory, for one model's shapes (an opaque handle).
#[derive(Debug)]
pub struct edgetune_adapter {
    _opaque: [u8; 0],
}

/// A training run: settings, data, and (after the first run or resume) its state (an opaque
/// handle).
#[derive(Debug)]
pub struct edgetune_trainer {
    _opaque: [u8; 0],
}

/// What an `edgetune_context` names.
struct ContextObj {
    ctx: Arc<GpuContext>,
}

/// What an `edgetune_model` names.
struct ModelObj {
    session: Arc<Exclusive<Session>>,
}

/// What an `edgetune_adapter` names.
struct AdapterObj {
    adapter: Adapter,
}

/// What an `edgetune_trainer` names.
struct TrainerObj {
    cancel: CancelToken,
    inner: Exclusive<TrainerState>,
}

static CONTEXTS: Handles<ContextObj> = Handles::new("context");
static MODELS: Handles<ModelObj> = Handles::new("model");
static ADAPTERS: Handles<AdapterObj> = Handles::new("adapter");
static TRAINERS: Handles<TrainerObj> = Handles::new("trainer");

/// Ids of handles: the next one (times 16, so a handle looks like an aligned pointer).
static NEXT_HANDLE: AtomicUsize = AtomicUsize::new(1);

/// The live handles of one kind (see the module docs): a handle is an id that a call looks up
/// here and holds (an `Arc`) until it returns; freeing removes it, and whatever it named is
/// dropped when the last call holding it returns.
struct Handles<T> {
    kind: &'static str,
    live: Mutex<Option<LiveMap<T>>>,
}

/// A kind's live handles by id (made at the first one).
type LiveMap<T> = HashMap<usize, Arc<T>>;

impl<T> Handles<T> {
    const fn new(kind: &'static str) -> Self {
        Handles { kind, live: Mutex::new(None) }
    }

    fn map(&self) -> Result<MutexGuard<'_, Option<LiveMap<T>>>, Fail> {
        self.live.lock().map_err(|_| Fail::panicked(&format!("the {} handles", self.kind)))
    }

    /// Registers `value` and returns its new handle.
    fn add<H>(&self, value: T) -> Result<*mut H, Fail> {
        let id = NEXT_HANDLE.fetch_add(1, Ordering::Relaxed).wrapping_mul(16);
        self.map()?.get_or_insert_with(HashMap::new).insert(id, Arc::new(value));
        Ok(id as *mut H)
    }

    /// What a handle argument names, held for the call.
    fn get<H>(&self, p: *const H, arg: &str) -> Result<Arc<T>, Fail> {
        if p.is_null() {
            return Err(Fail::null(arg));
        }
        let found = self.map()?.as_ref().and_then(|m| m.get(&(p as usize)).cloned());
        found.ok_or_else(|| {
            Fail::invalid(format!(
                "`{arg}` is not a live edgetune_{} handle (it was freed, or is another kind of handle, or not from \
                 this library)",
                self.kind
            ))
        })
    }

    /// Frees a handle (NULL, or one already freed, does nothing). What it named is dropped here
    /// unless a call on another thread still holds it, outside the lock either way.
    fn free<H>(&self, p: *mut H) {
        let removed = match self.map() {
            Ok(mut m) => m.as_mut().and_then(|m| m.remove(&(p as usize))),
            Err(_) => None,
        };
        drop(removed);
    }
}

thread_local! {
    /// A number for this thread, never 0 (see `Exclusive`).
    static THREAD_TOKEN: u64 = {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        NEXT.fetch_add(1, Ordering::Relaxed)
    };
}

/// A value that calls use one at a time: other threads wait, and the thread that holds it (a
/// callback inside a call that uses it) gets `EDGETUNE_ERROR_BUSY` instead of waiting for
/// itself forever.
struct Exclusive<T> {
    value: Mutex<T>,
    /// The token of the thread holding `value`, or 0.
    holder: AtomicU64,
}

impl<T> Exclusive<T> {
    fn new(value: T) -> Self {
        Exclusive { value: Mutex::new(value), holder: AtomicU64::new(0) }
    }

    /// Holds the value for this call. `what` names it in errors ("model", "trainer").
    fn hold(&self, what: &str) -> Result<Held<'_, T>, Fail> {
        let me = THREAD_TOKEN.with(|t| *t);
        if self.holder.load(Ordering::Acquire) == me {
            return Err(Fail {
                status: EDGETUNE_ERROR_BUSY,
                message: format!(
                    "the {what} is in use by the call that invoked this callback, on this thread; make this call \
                     after that call returns"
                ),
            });
        }
        let guard = self.value.lock().map_err(|_| Fail::panicked(&format!("the {what}")))?;
        self.holder.store(me, Ordering::Release);
        Ok(Held { guard, holder: &self.holder })
    }
}

/// An `Exclusive` value held by this thread's call.
struct Held<'a, T> {
    guard: MutexGuard<'a, T>,
    holder: &'a AtomicU64,
}

impl<T> Drop for Held<'_, T> {
    fn drop(&mut self) {
        // Before the guard (a field) unlocks the value.
        self.holder.store(0, Ordering::Release);
    }
}

impl<T> std::ops::Deref for Held<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> std::ops::DerefMut for Held<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

struct TrainerState {
    session: Arc<Exclusive<Session>>,
    config: TrainConfig,
    files: Vec<PathBuf>,
    records: Vec<String>,
    checkpoint: Option<PathBuf>,
    trainer: Option<Trainer>,
    /// The adapter the last run returned (the best one by validation loss with keep_best).
    result: Option<Adapter>,
    /// The held-out exchanges to answer at each evaluation, and how
    /// (`edgetune_trainer_score_answers`).
    answers: Option<(Vec<data::Exchange>, GenerateOptions)>,
}

// --- errors ---------------------------------------------------------------------------------

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

#[cfg(test)]
thread_local! {
    /// Makes the next guarded call on this thread panic inside its body (tests only).
    static INJECT_PANIC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[derive(Debug)]
struct Fail {
    status: edgetune_status,
    message: String,
}

impl Fail {
    fn null(arg: &str) -> Fail {
        Fail { status: EDGETUNE_ERROR_NULL_ARGUMENT, message: format!("`{arg}` is NULL") }
    }
    fn invalid(message: impl Into<String>) -> Fail {
        Fail { status: EDGETUNE_ERROR_INVALID_ARGUMENT, message: message.into() }
    }
    /// A lock that a panicking call left poisoned: what it guarded may be half-updated.
    fn panicked(what: &str) -> Fail {
        Fail {
            status: EDGETUNE_ERROR_PANIC,
            message: format!(
                "{what} cannot be used: an earlier call panicked while using it (a bug in edgetune; please report \
                 it); free it and create it again"
            ),
        }
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        let status = match &e {
            Error::NoAdapter { .. } => EDGETUNE_ERROR_NO_GPU,
            Error::Gpu(_) => EDGETUNE_ERROR_GPU,
            Error::OutOfMemory { .. } => EDGETUNE_ERROR_OUT_OF_MEMORY,
            Error::Io { .. } => EDGETUNE_ERROR_IO,
            Error::Unsupported { .. } => EDGETUNE_ERROR_UNSUPPORTED,
            Error::Diverged { .. } => EDGETUNE_ERROR_DIVERGED,
            Error::Invalid { .. } | Error::Cancelled => EDGETUNE_ERROR_INVALID_ARGUMENT,
            // Every variant is named, with no catch-all, so that a new one is mapped on purpose.
            Error::Format { .. }
            | Error::Shape { .. }
            | Error::MissingTensor { .. }
            | Error::Tokenizer { .. }
            | Error::Template(_) => EDGETUNE_ERROR_FORMAT,
        };
        Fail { status, message: e.to_string() }
    }
}

fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs `body`, catching panics, and turns its outcome into a status (and the thread's message).
fn guard(body: impl FnOnce() -> Result<(), Fail>) -> edgetune_status {
    let body = move || {
        #[cfg(test)]
        if INJECT_PANIC.with(|p| p.replace(false)) {
            panic!("injected by a test");
        }
        body()
    };
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => EDGETUNE_OK,
        Ok(Err(f)) => {
            set_last_error(&f.message);
            f.status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("internal error (a bug in edgetune): {what}"));
            EDGETUNE_ERROR_PANIC
        }
    }
}

/// Reads a required string argument.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string that outlives the call.
unsafe fn text<'a>(p: *const c_char, arg: &str) -> Result<&'a str, Fail> {
    if p.is_null() {
        return Err(Fail::null(arg));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map_err(|e| Fail::invalid(format!("`{arg}` is not UTF-8 (invalid byte at offset {})", e.valid_up_to())))
}

/// Reads an optional string argument (NULL is None).
unsafe fn opt_text<'a>(p: *const c_char, arg: &str) -> Result<Option<&'a str>, Fail> {
    if p.is_null() { Ok(None) } else { unsafe { text(p, arg) }.map(Some) }
}

/// Checks an out-pointer and clears what it points to.
unsafe fn out_ptr<'a, T>(p: *mut *mut T, arg: &str) -> Result<&'a mut *mut T, Fail> {
    // SAFETY: the caller passes NULL or a writable pointer.
    let slot = unsafe { p.as_mut() }.ok_or_else(|| Fail::null(arg))?;
    *slot = std::ptr::null_mut();
    Ok(slot)
}

// --- errors and strings ---------------------------------------------------------------------

/// Copies the calling thread's last error message into `buf` (at most `len` bytes, always
/// NUL-terminated when `len > 0`) and returns the message's full length in bytes, without the
/// NUL, so a caller can size a buffer. `buf` may be NULL when `len` is 0. Thread-safe: each
/// thread has its own message. The message stays until the next failing call on that thread.
///
/// # Safety
/// `buf` is NULL or points to `len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_last_error_message(buf: *mut c_char, len: usize) -> usize {
    catch_unwind(|| {
        LAST_ERROR.with(|e| {
            let e = e.borrow();
            let bytes = e.as_bytes();
            if !buf.is_null() && len > 0 {
                let n = bytes.len().min(len - 1);
                // SAFETY: buf has len >= n + 1 writable bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), n);
                    *buf.add(n) = 0;
                }
            }
            bytes.len()
        })
    })
    .unwrap_or(0)
}

/// Frees a string returned by this library. NULL is accepted.
///
/// # Safety
/// `s` is NULL or a string from this library, not freed before.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_string_free(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: from CString::into_raw in this library.
        let _ = catch_unwind(|| drop(unsafe { CString::from_raw(s) }));
    }
}

/// The version of this header: the library's major version. A program built against this
/// header runs with a library of the same major and minor version and at least its patch (while
/// the major version is 0, each minor version may change the ABI, as the installed library's
/// soname, `libedgetune.so.MAJOR.MINOR`, says). Compare with [`edgetune_version`] at run time.
pub const EDGETUNE_VERSION_MAJOR: u32 = 0;
/// The version of this header: the library's minor version.
pub const EDGETUNE_VERSION_MINOR: u32 = 1;
/// The version of this header: the library's patch version.
pub const EDGETUNE_VERSION_PATCH: u32 = 0;

/// The library's version ("0.1.0"), a static string: do not free it.
#[unsafe(no_mangle)]
pub extern "C" fn edgetune_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

// --- context and model ----------------------------------------------------------------------

/// Opens a GPU context on the adapter whose name contains `adapter_name`, or, when it is NULL,
/// on the one the `EDGETUNE_ADAPTER` environment variable names, else the best available (a
/// discrete GPU first). The caller owns `*out` and frees it with `edgetune_context_free`. A
/// context may be shared by models on several threads.
///
/// # Safety
/// `adapter_name` is NULL or a string; `out` points to writable storage.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_context_new(
    adapter_name: *const c_char,
    out: *mut *mut edgetune_context,
) -> edgetune_status {
    guard(|| {
        let out = unsafe { out_ptr(out, "out") }?;
        let name = unsafe { opt_text(adapter_name, "adapter_name") }?;
        let ctx = GpuContext::new(&GpuOptions { adapter: name.map(str::to_string), ..Default::default() })?;
        *out = CONTEXTS.add(ContextObj { ctx: Arc::new(ctx) })?;
        Ok(())
    })
}

/// Describes the context's adapter (name, backend, features) as a JSON object in `*out`, which
/// the caller frees with `edgetune_string_free`.
///
/// # Safety
/// `ctx` is a live context; `out` points to writable storage.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_context_describe(
    ctx: *const edgetune_context,
    out: *mut *mut c_char,
) -> edgetune_status {
    guard(|| {
        let out = unsafe { out_ptr(out, "out") }?;
        let ctx = CONTEXTS.get(ctx, "ctx")?;
        let json = serde_json::to_string(&ctx.ctx.report).map_err(|e| Fail::invalid(e.to_string()))?;
        *out = CString::new(json).map_err(|e| Fail::invalid(e.to_string()))?.into_raw();
        Ok(())
    })
}

/// Frees a context. Models loaded on it keep what they need of it. NULL, or a handle freed
/// before, is accepted and does nothing.
///
/// # Safety
/// None: any value is accepted.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_context_free(ctx: *mut edgetune_context) {
    let _ = catch_unwind(AssertUnwindSafe(|| CONTEXTS.free(ctx)));
}

/// Loads a model (a Hugging Face folder or a .gguf file) onto `ctx`, with its weights as
/// `quant` (an `edgetune_quant` value) says and a KV cache of `max_context` tokens (0: 2048, capped by the model). The
/// caller owns `*out` and frees it with `edgetune_model_free`. A model handle may be used from
/// several threads; calls on one model run one at a time.
///
/// # Safety
/// `ctx` is a live context, `path` a string, `out` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_model_load(
    ctx: *const edgetune_context,
    path: *const c_char,
    quant: i32,
    max_context: u32,
    out: *mut *mut edgetune_model,
) -> edgetune_status {
    guard(|| {
        let out = unsafe { out_ptr(out, "out") }?;
        let ctx = CONTEXTS.get(ctx, "ctx")?;
        let path = unsafe { text(path, "path") }?;
        // An int, not the enum type: a value outside the enum from C must be an error, not
        // undefined behaviour.
        let quant = match quant {
            q if q == edgetune_quant::EDGETUNE_QUANT_NF4 as i32 => Quant::Nf4,
            q if q == edgetune_quant::EDGETUNE_QUANT_NONE as i32 => Quant::None,
            q if q == edgetune_quant::EDGETUNE_QUANT_GGUF as i32 => Quant::Gguf,
            q => return Err(Fail::invalid(format!("quant {q} is not an edgetune_quant value"))),
        };
        let mut load = LoadOptions { quant, ..Default::default() };
        if max_context > 0 {
            load.max_context = max_context as usize;
        }
        let session = Session::open_with(ctx.ctx.clone(), path, &load)?;
        *out = MODELS.add(ModelObj { session: Arc::new(Exclusive::new(session)) })?;
        Ok(())
    })
}

/// Frees a model. Trainers created on it, and calls on it still running on other threads, keep
/// what they need of it. NULL, or a handle freed before, is accepted and does nothing.
///
/// # Safety
/// None: any value is accepted.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_model_free(model: *mut edgetune_model) {
    let _ = catch_unwind(AssertUnwindSafe(|| MODELS.free(model)));
}

// --- adapters and generation ----------------------------------------------------------------

/// Loads an adapter for `model`'s shapes: a PEFT adapter folder (`adapter_model.safetensors` +
/// `adapter_config.json`) or a GGUF LoRA file (llama.cpp's format). The caller owns `*out` and frees it with `edgetune_adapter_free`.
///
/// # Safety
/// `model` is a live model, `dir` a string, `out` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_adapter_load(
    model: *const edgetune_model,
    dir: *const c_char,
    out: *mut *mut edgetune_adapter,
) -> edgetune_status {
    guard(|| {
        let out = unsafe { out_ptr(out, "out") }?;
        let model = MODELS.get(model, "model")?;
        let dir = unsafe { text(dir, "dir") }?;
        let adapter = edgetune::lora::load(Path::new(dir), &model.session.hold("model")?.model.config)?;
        *out = ADAPTERS.add(AdapterObj { adapter })?;
        Ok(())
    })
}

/// Saves an adapter as a PEFT folder (`base_model` is recorded in its config; NULL records
/// none). Files are written to temporary names, then renamed.
///
/// # Safety
/// `adapter` is a live adapter, `dir` a string, `base_model` NULL or a string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_adapter_save(
    adapter: *const edgetune_adapter,
    dir: *const c_char,
    base_model: *const c_char,
) -> edgetune_status {
    guard(|| {
        let adapter = ADAPTERS.get(adapter, "adapter")?;
        let dir = unsafe { text(dir, "dir") }?;
        let base = unsafe { opt_text(base_model, "base_model") }?.unwrap_or("");
        peft::save(Path::new(dir), &adapter.adapter, base)?;
        Ok(())
    })
}

/// Saves an adapter trained for `model` as a GGUF LoRA file that llama.cpp (`--lora`) and
/// Ollama (`ADAPTER`) apply to that model's GGUF: `type` is "f32", "f16", "bf16" or "q8_0"
/// (NULL: "f16"). The file is written to a temporary name, then renamed.
///
/// # Safety
/// `model` is a live model, `adapter` a live adapter, `path` a string, `type_name` NULL or a
/// string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_adapter_save_gguf(
    model: *const edgetune_model,
    adapter: *const edgetune_adapter,
    path: *const c_char,
    type_name: *const c_char,
) -> edgetune_status {
    guard(|| {
        let model = MODELS.get(model, "model")?;
        let adapter = ADAPTERS.get(adapter, "adapter")?;
        let path = unsafe { text(path, "path") }?;
        let ty = match unsafe { opt_text(type_name, "type") }?.unwrap_or("f16") {
            "f32" => GgmlType::F32,
            "f16" => GgmlType::F16,
            "bf16" => GgmlType::Bf16,
            "q8_0" => GgmlType::Q8_0,
            other => {
                return Err(Fail::invalid(format!("type `{other}`: expected f32, f16, bf16 or q8_0")));
            }
        };
        let config = model.session.hold("model")?.model.config.clone();
        edgetune::lora::gguf::save(Path::new(path), &adapter.adapter, &config, ty)?;
        Ok(())
    })
}

/// Frees an adapter (a model it was applied to keeps its own copy). NULL, or a handle freed
/// before, is accepted and does nothing.
///
/// # Safety
/// None: any value is accepted.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_adapter_free(adapter: *mut edgetune_adapter) {
    let _ = catch_unwind(AssertUnwindSafe(|| ADAPTERS.free(adapter)));
}

/// Applies `adapter` (unmerged) to everything `model` generates from now on; NULL goes back to
/// the base model. Switching uploads the adapter's weights, a few MB for a small rank.
///
/// # Safety
/// `model` is a live model; `adapter` is NULL or a live adapter.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_model_set_adapter(
    model: *const edgetune_model,
    adapter: *const edgetune_adapter,
) -> edgetune_status {
    guard(|| {
        let model = MODELS.get(model, "model")?;
        let adapter = if adapter.is_null() { None } else { Some(ADAPTERS.get(adapter, "adapter")?) };
        model.session.hold("model")?.set_adapter(adapter.as_ref().map(|a| &a.adapter))?;
        Ok(())
    })
}

/// Generation options from JSON: [`GenerateOptions`]' fields plus `chat`, `system` and
/// `adapter`.
struct GenerateSettings {
    opts: GenerateOptions,
    chat: bool,
    system: Option<String>,
    /// A resident adapter by name (`edgetune_model_keep_adapter`).
    adapter: Option<String>,
    /// The most requests decoded together (`edgetune_generate_many`); 0 for as many as fit.
    rows: Option<usize>,
}

fn generate_settings(json: Option<&str>) -> Result<GenerateSettings, Fail> {
    let Some(json) = json else {
        return Ok(GenerateSettings {
            opts: GenerateOptions::default(),
            chat: false,
            system: None,
            adapter: None,
            rows: None,
        });
    };
    let bad = |e: serde_json::Error| Fail::invalid(format!("options_json: {e}"));
    let mut v: serde_json::Value = serde_json::from_str(json).map_err(bad)?;
    let obj = v.as_object_mut().ok_or_else(|| Fail::invalid("options_json: expected a JSON object"))?;
    let chat = match obj.remove("chat") {
        None => false,
        Some(c) => c.as_bool().ok_or_else(|| Fail::invalid("options_json: `chat` must be true or false"))?,
    };
    let mut string = |key: &str| match obj.remove(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(Fail::invalid(format!("options_json: `{key}` must be a string"))),
    };
    let (system, adapter) = (string("system")?, string("adapter")?);
    let rows = match obj.remove("rows") {
        None | Some(serde_json::Value::Null) => None,
        Some(r) => Some(
            r.as_u64()
                .and_then(|r| usize::try_from(r).ok())
                .ok_or_else(|| Fail::invalid("options_json: `rows` must be a whole number (0: as many as fit)"))?,
        ),
    };
    Ok(GenerateSettings { opts: serde_json::from_value(v).map_err(bad)?, chat, system, adapter, rows })
}

/// Keeps `adapter` on the GPU beside `model` under `name` (replacing one of that name), so
/// that `edgetune_generate` with `"adapter": name` in its options applies it with no upload and
/// without changing the adapter other calls use: one model serves several users or personas.
/// The model keeps its own copy, so the adapter may be freed afterwards.
///
/// # Safety
/// `model` is a live model, `name` a string, `adapter` a live adapter.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_model_keep_adapter(
    model: *const edgetune_model,
    name: *const c_char,
    adapter: *const edgetune_adapter,
) -> edgetune_status {
    guard(|| {
        let model = MODELS.get(model, "model")?;
        let name = unsafe { text(name, "name") }?;
        let adapter = ADAPTERS.get(adapter, "adapter")?;
        model.session.hold("model")?.keep_adapter(name, &adapter.adapter)?;
        Ok(())
    })
}

/// Frees the GPU memory of the resident adapter `name`; naming none is an
/// `EDGETUNE_ERROR_INVALID_ARGUMENT`.
///
/// # Safety
/// `model` is a live model, `name` a string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_model_drop_adapter(
    model: *const edgetune_model,
    name: *const c_char,
) -> edgetune_status {
    guard(|| {
        let model = MODELS.get(model, "model")?;
        let name = unsafe { text(name, "name") }?;
        if !model.session.hold("model")?.drop_adapter(name) {
            return Err(Fail::invalid(format!("no resident adapter named `{name}`")));
        }
        Ok(())
    })
}

/// Generates a continuation of `prompt` with the model's current adapter.
///
/// `options_json` may be NULL (greedy, 128 new tokens) or a JSON object with any of
/// `max_new_tokens`, `temperature` (0: greedy), `top_k`, `top_p`, `seed`, `stop` (a list of
/// strings), `chat` (true: `prompt` is a user message rendered with the chat template) and
/// `system` (with `chat`, a system message) and `adapter` (the name of a resident adapter, see
/// `edgetune_model_keep_adapter`, used for this call only). `on_token` may be NULL; it gets each piece of
/// text as it is decoded, and returning 0 from it stops generation (not an error). `out_text`
/// may be NULL; otherwise it receives the whole text, which the caller frees with
/// `edgetune_string_free`.
///
/// # Safety
/// `model` is a live model, `prompt` a string, `options_json` NULL or a string, `out_text` NULL
/// or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_generate(
    model: *const edgetune_model,
    prompt: *const c_char,
    options_json: *const c_char,
    on_token: edgetune_token_callback,
    userdata: *mut c_void,
    out_text: *mut *mut c_char,
) -> edgetune_status {
    guard(|| {
        if let Some(slot) = unsafe { out_text.as_mut() } {
            *slot = std::ptr::null_mut();
        }
        let model = MODELS.get(model, "model")?;
        let prompt = unsafe { text(prompt, "prompt") }?;
        let GenerateSettings { opts, chat, system, adapter, rows } =
            generate_settings(unsafe { opt_text(options_json, "options_json") }?)?;
        if rows.is_some() {
            return Err(Fail::invalid("options_json: `rows` is taken by edgetune_generate_many only"));
        }
        let on_text = |piece: &str| -> bool {
            let Some(cb) = on_token else { return true };
            let Ok(c) = CString::new(piece.replace('\0', " ")) else { return true };
            // SAFETY: a C callback given by the caller, with its own userdata.
            unsafe { cb(userdata, c.as_ptr()) != 0 }
        };
        let session = model.session.hold("model")?;
        let out = if chat {
            let mut messages = Vec::new();
            if let Some(system) = system {
                messages.push(Message::new("system", system));
            }
            messages.push(Message::new("user", prompt));
            match &adapter {
                Some(name) => session.chat_with(Some(name), &messages, &opts, on_text)?,
                None => session.chat(&messages, &opts, on_text)?,
            }
        } else {
            if system.is_some() {
                return Err(Fail::invalid("options_json: `system` needs \"chat\": true"));
            }
            match &adapter {
                Some(name) => session.generate_with(Some(name), prompt, &opts, on_text)?,
                None => session.generate(prompt, &opts, on_text)?,
            }
        };
        if let Some(slot) = unsafe { out_text.as_mut() } {
            *slot = CString::new(out.text.replace('\0', " ")).map_err(|e| Fail::invalid(e.to_string()))?.into_raw();
        }
        Ok(())
    })
}

/// One request of `edgetune_generate_many`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ManyRequest {
    prompt: String,
    #[serde(default)]
    adapter: Option<String>,
}

/// Generates for several requests at once, each with the resident adapter it names (see
/// `edgetune_model_keep_adapter`) or the base model: each request gets what
/// `edgetune_generate` with `"adapter"` gives it alone, and each step decodes one token of
/// every request still going in one pass, so serving several users costs little more than
/// serving one. A step decodes as many requests as fit (or `"rows"`), and each of its rows
/// takes the next request when its own ends.
///
/// `requests_json` is a JSON array of objects `{"prompt": "...", "adapter": "name"}`
/// (`adapter` may be left out or null for the base model). `options_json` may be NULL or take
/// `edgetune_generate`'s options for every request (`max_new_tokens`, `temperature`, `top_k`,
/// `top_p`, `seed`, `stop`, `chat`, `system`; not `adapter`), and `rows`, the most requests a
/// step decodes together (0, the default: as many as fit); with a seed each request samples
/// from its own generator. `on_token` may be NULL; it gets each piece of text with its
/// request's index, and returning 0 from it ends that request only. `*out_results_json`
/// receives a JSON array, one object a request in order, `{"text", "token_ids",
/// "prompt_tokens", "stop_reason"}`, which the caller frees with `edgetune_string_free`.
///
/// # Safety
/// `model` is a live model, `requests_json` a string, `options_json` NULL or a string,
/// `out_results_json` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_generate_many(
    model: *const edgetune_model,
    requests_json: *const c_char,
    options_json: *const c_char,
    on_token: edgetune_request_callback,
    userdata: *mut c_void,
    out_results_json: *mut *mut c_char,
) -> edgetune_status {
    let call = ManyCall { model, requests_json, options_json, on_token, on_end: None, userdata, out_results_json };
    // SAFETY: the caller's arguments, as this function's contract states them.
    guard(|| unsafe { generate_many(call) })
}

/// `edgetune_generate_many`, with `on_end` (which may be NULL) told each request's end as soon
/// as it ends, in the order the requests end: its index and its result as a JSON object, the
/// one `*out_results_json` later holds at that index, so that an app can hand back a short
/// answer while longer ones go on. `userdata` goes to both callbacks.
///
/// # Safety
/// As `edgetune_generate_many`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_generate_many_each(
    model: *const edgetune_model,
    requests_json: *const c_char,
    options_json: *const c_char,
    on_token: edgetune_request_callback,
    on_end: edgetune_request_end_callback,
    userdata: *mut c_void,
    out_results_json: *mut *mut c_char,
) -> edgetune_status {
    let call = ManyCall { model, requests_json, options_json, on_token, on_end, userdata, out_results_json };
    // SAFETY: the caller's arguments, as this function's contract states them.
    guard(|| unsafe { generate_many(call) })
}

/// The arguments of `edgetune_generate_many_each`.
struct ManyCall {
    model: *const edgetune_model,
    requests_json: *const c_char,
    options_json: *const c_char,
    on_token: edgetune_request_callback,
    on_end: edgetune_request_end_callback,
    userdata: *mut c_void,
    out_results_json: *mut *mut c_char,
}

/// The body of `edgetune_generate_many_each`, run inside `guard`.
///
/// # Safety
/// As `edgetune_generate_many`.
unsafe fn generate_many(call: ManyCall) -> Result<(), Fail> {
    let ManyCall { model, requests_json, options_json, on_token, on_end, userdata, out_results_json } = call;
    let out = unsafe { out_ptr(out_results_json, "out_results_json") }?;
    let model = MODELS.get(model, "model")?;
    let requests = unsafe { text(requests_json, "requests_json") }?;
    let requests: Vec<ManyRequest> = serde_json::from_str(requests).map_err(|e| {
        Fail::invalid(format!("requests_json: expected a JSON array of {{\"prompt\", \"adapter\"}} objects: {e}"))
    })?;
    let GenerateSettings { opts, chat, system, adapter, rows } =
        generate_settings(unsafe { opt_text(options_json, "options_json") }?)?;
    if adapter.is_some() {
        return Err(Fail::invalid("options_json: `adapter` is not taken here; name each request's in requests_json"));
    }
    if system.is_some() && !chat {
        return Err(Fail::invalid("options_json: `system` needs \"chat\": true"));
    }
    let on_event = |event: AnswerEvent<'_>| -> bool {
        match event {
            AnswerEvent::Text { request, text } => {
                let Some(cb) = on_token else { return true };
                let Ok(c) = CString::new(text.replace('\0', " ")) else { return true };
                // SAFETY: a C callback given by the caller, with its own userdata.
                unsafe { cb(userdata, request, c.as_ptr()) != 0 }
            }
            AnswerEvent::End { request, generated } => {
                let Some(cb) = on_end else { return true };
                let Ok(json) = serde_json::to_string(generated) else { return true };
                let Ok(c) = CString::new(json) else { return true };
                // SAFETY: a C callback given by the caller, with its own userdata.
                unsafe { cb(userdata, request, c.as_ptr()) };
                true
            }
        }
    };
    let session = model.session.hold("model")?;
    let conversations: Vec<Vec<Message>> = if chat {
        requests
            .iter()
            .map(|r| {
                let mut messages = Vec::new();
                if let Some(system) = &system {
                    messages.push(Message::new("system", system.clone()));
                }
                messages.push(Message::new("user", r.prompt.clone()));
                messages
            })
            .collect()
    } else {
        Vec::new()
    };
    let list: Vec<(Option<&str>, Prompt)> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let prompt = if chat { Prompt::Chat(&conversations[i]) } else { Prompt::Text(&r.prompt) };
            (r.adapter.as_deref(), prompt)
        })
        .collect();
    let job = ManyRequests { requests: &list, opts: &opts, rows: rows.unwrap_or(0) };
    let results = session.answer_many(&job, on_event)?;
    let json = serde_json::to_string(&results).map_err(|e| Fail::invalid(e.to_string()))?;
    *out = CString::new(json).map_err(|e| Fail::invalid(e.to_string()))?.into_raw();
    Ok(())
}

/// The mean next-token loss of `text` under `model` with its current adapter (its perplexity is
/// `exp(loss)`), in `*out`.
///
/// # Safety
/// `model` is a live model, `text` a string, `out` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_model_loss(
    model: *const edgetune_model,
    text: *const c_char,
    out: *mut f32,
) -> edgetune_status {
    guard(|| {
        // SAFETY: NULL or writable.
        let out = unsafe { out.as_mut() }.ok_or_else(|| Fail::null("out"))?;
        let model = MODELS.get(model, "model")?;
        let body = unsafe { self::text(text, "text") }?;
        *out = model.session.hold("model")?.mean_loss(body)?;
        Ok(())
    })
}

/// The records of `records_json` (a JSON array of records in any format a data file may
/// hold, record N named as line N of "records"), every one readable.
fn held_out_records(records: &str) -> Result<Vec<data::formats::Sourced>, Fail> {
    let list: Vec<serde_json::Value> = serde_json::from_str(records)
        .map_err(|e| Fail::invalid(format!("records_json: expected a JSON array of records: {e}")))?;
    let texts: Vec<String> = list.iter().map(serde_json::Value::to_string).collect();
    let (read, bad) = data::formats::read_records(Path::new("records"), &texts, data::formats::Format::Auto);
    data::formats::refuse_bad(&bad)?;
    Ok(read)
}

/// Answers held-out records with the base model and with the model's current adapter, and
/// scores each answer against the record's own: exact match and token F1 (as SQuAD's evaluation
/// computes them) and ROUGE-L (as Python's `rouge-score` does). `records_json` is a JSON array of
/// records in any format a data file may hold; each must be a conversation whose last message is
/// the assistant's reference answer (record N is reported as line N of "records").
/// `options_json` may be NULL (greedy, 128 new tokens) or take `edgetune_generate`'s options
/// (`max_new_tokens`, `temperature`, `top_k`, `top_p`, `seed`, `stop`, and `system` for records
/// without a system message; not `adapter`). `*out_report_json` receives a JSON object,
/// `{"answers": [{"line", "question", "reference", "base", "base_scores", "adapter",
/// "adapter_scores"}, ...], "base": {"exact", "f1", "rouge_l"}, "adapter": {...} or null}`, which
/// the caller frees with `edgetune_string_free`.
///
/// # Safety
/// `model` is a live model, `records_json` a string, `options_json` NULL or a string,
/// `out_report_json` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_score_answers(
    model: *const edgetune_model,
    records_json: *const c_char,
    options_json: *const c_char,
    out_report_json: *mut *mut c_char,
) -> edgetune_status {
    guard(|| {
        let out = unsafe { out_ptr(out_report_json, "out_report_json") }?;
        let model = MODELS.get(model, "model")?;
        let records = unsafe { text(records_json, "records_json") }?;
        let GenerateSettings { opts, system, adapter, .. } =
            generate_settings(unsafe { opt_text(options_json, "options_json") }?)?;
        if adapter.is_some() {
            return Err(Fail::invalid("options_json: `adapter` is not taken here; set the model's adapter"));
        }
        let read = held_out_records(records)?;
        let report = model.session.hold("model")?.score_answers(&read, system.as_deref(), &opts, |_, _| {})?;
        let json = serde_json::to_string(&report).map_err(|e| Fail::invalid(e.to_string()))?;
        *out = CString::new(json).map_err(|e| Fail::invalid(e.to_string()))?.into_raw();
        Ok(())
    })
}

// --- training -------------------------------------------------------------------------------

/// Creates a trainer for `model` with the settings in `config_json`: a JSON object with any
/// `TrainConfig` field (the same names as the CLI's TOML file, e.g.
/// `{"epochs": 3, "learning_rate": 2e-4, "lora": {"r": 16}, "data": {"max_len": 512}}`); NULL
/// or `{}` takes the defaults. Unknown fields and invalid values are errors. `batch_tokens`,
/// `epochs`, `learning_rate`, `warmup_steps`, `keep_best` and `data.val_fraction` left out (or
/// `null`) are chosen from the data when training starts (see `edgetune_trainer_settings`);
/// `data.val_data` names a file of the user's own held-out records to validate on. Add data with
/// `edgetune_trainer_add_file` / `edgetune_trainer_add_record`, then run. The caller owns
/// `*out` and frees it with `edgetune_trainer_free`. Thread-safety: `edgetune_trainer_cancel`
/// may be called from any thread at any time; the other trainer calls run one at a time.
///
/// # Safety
/// `model` is a live model, `config_json` NULL or a string, `out` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_trainer_new(
    model: *const edgetune_model,
    config_json: *const c_char,
    out: *mut *mut edgetune_trainer,
) -> edgetune_status {
    guard(|| {
        let out = unsafe { out_ptr(out, "out") }?;
        let model = MODELS.get(model, "model")?;
        let config: TrainConfig = match unsafe { opt_text(config_json, "config_json") }? {
            Some(j) => serde_json::from_str(j).map_err(|e| Fail::invalid(format!("config_json: {e}")))?,
            None => TrainConfig::default(),
        };
        config.validate()?;
        let state = TrainerState {
            session: model.session.clone(),
            config,
            files: Vec::new(),
            records: Vec::new(),
            checkpoint: None,
            trainer: None,
            result: None,
            answers: None,
        };
        *out = TRAINERS.add(TrainerObj { cancel: CancelToken::default(), inner: Exclusive::new(state) })?;
        Ok(())
    })
}

/// The state of a trainer that takes data, or an error once its data is fixed.
fn adding_data<'a>(t: &'a TrainerObj, what: &str) -> Result<Held<'a, TrainerState>, Fail> {
    let state = t.inner.hold("trainer")?;
    if state.trainer.is_some() {
        return Err(Fail::invalid(format!("{what}: the trainer has started, so its data is fixed")));
    }
    Ok(state)
}

/// Adds a training data file or folder (Alpaca, ShareGPT or OpenAI-style chat as JSON or JSONL,
/// or text files), read when training starts. Must come before the first run or resume.
///
/// # Safety
/// `trainer` is a live trainer, `path` a string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_trainer_add_file(
    trainer: *const edgetune_trainer,
    path: *const c_char,
) -> edgetune_status {
    guard(|| {
        let t = TRAINERS.get(trainer, "trainer")?;
        let path = unsafe { text(path, "path") }?;
        let p = PathBuf::from(path);
        if !p.exists() {
            return Err(Error::Io { path: p, source: std::io::ErrorKind::NotFound.into() }.into());
        }
        adding_data(&t, "edgetune_trainer_add_file")?.files.push(p);
        Ok(())
    })
}

/// Adds one training record held by the app: a JSON object in any format a data file may hold,
/// e.g. `{"messages": [{"role": "user", "content": "…"}, {"role": "assistant", "content": "…"}]}`.
/// It is checked when training starts; errors name it as line N of "records", N counting from
/// 1 in the order added. Must come before the first run or resume.
///
/// # Safety
/// `trainer` is a live trainer, `record_json` a string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_trainer_add_record(
    trainer: *const edgetune_trainer,
    record_json: *const c_char,
) -> edgetune_status {
    guard(|| {
        let t = TRAINERS.get(trainer, "trainer")?;
        let record = unsafe { text(record_json, "record_json") }?;
        adding_data(&t, "edgetune_trainer_add_record")?.records.push(record.to_string());
        Ok(())
    })
}

/// Answers held-out records at each evaluation of the run, with the adapter as it is then, and
/// scores them as `edgetune_score_answers` does: evaluation events then carry the base model's
/// and the adapter's mean exact match, token F1 and ROUGE-L (`answers_*`). `records_json` and
/// `options_json` are as for `edgetune_score_answers` (conversations ending in the reference
/// answer, or preference pairs whose chosen answer is the reference). Evaluations need
/// validation samples (`data.val_data`, or a split), which the run checks when it starts. Must
/// come before the first run or resume.
///
/// # Safety
/// `trainer` is a live trainer, `records_json` a string, `options_json` NULL or a string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_trainer_score_answers(
    trainer: *const edgetune_trainer,
    records_json: *const c_char,
    options_json: *const c_char,
) -> edgetune_status {
    guard(|| {
        let t = TRAINERS.get(trainer, "trainer")?;
        let records = unsafe { text(records_json, "records_json") }?;
        let GenerateSettings { opts, system, adapter, .. } =
            generate_settings(unsafe { opt_text(options_json, "options_json") }?)?;
        if adapter.is_some() {
            return Err(Fail::invalid("options_json: `adapter` is not taken here; the trainer's adapter answers"));
        }
        opts.validate()?;
        let read = held_out_records(records)?;
        let exchanges = data::exchanges(&read, system.as_deref())?;
        adding_data(&t, "edgetune_trainer_score_answers")?.answers = Some((exchanges, opts));
        Ok(())
    })
}

/// Where checkpoints are written: every `checkpoint_every` steps or `checkpoint_every_s` seconds
/// of the settings (600 s by default) and when a run ends or is cancelled (atomically: a
/// temporary file, then a rename).
///
/// # Safety
/// `trainer` is a live trainer, `path` a string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_trainer_set_checkpoint_path(
    trainer: *const edgetune_trainer,
    path: *const c_char,
) -> edgetune_status {
    guard(|| {
        let t = TRAINERS.get(trainer, "trainer")?;
        let path = PathBuf::from(unsafe { text(path, "path") }?);
        let mut state = t.inner.hold("trainer")?;
        if let Some(tr) = state.trainer.as_mut() {
            tr.set_checkpoint_path(path.clone());
        }
        state.checkpoint = Some(path);
        Ok(())
    })
}

impl TrainerState {
    /// The trainer, built from the data on first use.
    fn trainer(&mut self, cancel: &CancelToken) -> Result<&mut Trainer, Fail> {
        if self.trainer.is_none() {
            let mut sources: Vec<Source> = self.files.iter().cloned().map(Source::Path).collect();
            if !self.records.is_empty() {
                sources.push(Source::Records { name: "records".into(), records: self.records.clone() });
            }
            if sources.is_empty() {
                return Err(Fail::invalid(
                    "the trainer has no data: add some with edgetune_trainer_add_file or edgetune_trainer_add_record",
                ));
            }
            let session = self.session.hold("model")?;
            let dataset = data::load_sources(&sources, &session.tokenizer, &self.config.data)?;
            let mut trainer = Trainer::new(session.model.clone(), &dataset, self.config.clone())?;
            if let Some((exchanges, opts)) = &self.answers {
                let tokenizer = Arc::new(session.tokenizer.clone());
                trainer.score_answers_at_evals(AnswerEval {
                    tokenizer,
                    exchanges: exchanges.clone(),
                    opts: opts.clone(),
                })?;
            }
            trainer.set_cancel_token(cancel.clone());
            if let Some(p) = &self.checkpoint {
                trainer.set_checkpoint_path(p.clone());
            }
            self.trainer = Some(trainer);
        }
        self.trainer.as_mut().ok_or_else(|| Fail::invalid("no trainer"))
    }

    /// What the last run returned, or before any run the adapter as it is.
    fn trained_adapter(&mut self, cancel: &CancelToken) -> Result<Adapter, Fail> {
        match &self.result {
            Some(a) => Ok(a.clone()),
            None => Ok(self.trainer(cancel)?.adapter()?),
        }
    }
}

/// Runs `f` on the trainer (built from its data if need be) with a path argument.
///
/// # Safety
/// `trainer` is NULL or a live trainer, `path` NULL or a string.
unsafe fn with_trainer_at(
    trainer: *const edgetune_trainer,
    path: *const c_char,
    f: impl FnOnce(&mut Trainer, &Path) -> edgetune::Result<()>,
) -> Result<(), Fail> {
    let t = TRAINERS.get(trainer, "trainer")?;
    let path = unsafe { text(path, "path") }?;
    let mut state = t.inner.hold("trainer")?;
    Ok(f(state.trainer(&t.cancel)?, Path::new(path))?)
}

/// Restores a checkpoint written by a run with the same model, data and settings; the next
/// `edgetune_trainer_run` continues from it, and gives the adapter a run without interruption
/// would have given, byte for byte.
///
/// # Safety
/// `trainer` is a live trainer, `path` a string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_trainer_resume(
    trainer: *const edgetune_trainer,
    path: *const c_char,
) -> edgetune_status {
    guard(|| unsafe { with_trainer_at(trainer, path, |tr, path| tr.resume(path)) })
}

/// Trains until the settings' epochs or `max_steps` are done, early stopping ends it, or
/// `edgetune_trainer_cancel` is called (then it returns `EDGETUNE_OK` after a
/// `EDGETUNE_EVENT_FINISHED` event with message "cancelled"). `on_event` may be NULL; it is
/// called on this thread. The trained adapter is then available from
/// `edgetune_trainer_adapter` and `edgetune_trainer_save_adapter`.
///
/// # Safety
/// `trainer` is a live trainer; `on_event` NULL or a function that may read the event during
/// the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_trainer_run(
    trainer: *const edgetune_trainer,
    on_event: edgetune_event_callback,
    userdata: *mut c_void,
) -> edgetune_status {
    guard(|| {
        let t = TRAINERS.get(trainer, "trainer")?;
        let mut state = t.inner.hold("trainer")?;
        let outcome = state.trainer(&t.cancel)?.run(|e| {
            if let Some(cb) = on_event {
                with_c_event(e, |ev| {
                    // SAFETY: the caller's callback and userdata; the event lives for the call.
                    unsafe { cb(userdata, ev) }
                });
            }
        })?;
        state.result = Some(outcome.adapter);
        Ok(())
    })
}

/// Builds the C view of an event and hands it to `f`.
fn with_c_event(e: &Event, f: impl FnOnce(&edgetune_event)) {
    let mut ev = edgetune_event {
        kind: edgetune_event_kind::EDGETUNE_EVENT_STEP,
        step: 0,
        total_steps: 0,
        epoch: 0.0,
        loss: 0.0,
        lr: 0.0,
        grad_norm: 0.0,
        val_loss: f32::NAN,
        perplexity: f32::NAN,
        best_val_loss: f32::NAN,
        tokens_per_s: 0.0,
        eta_s: 0.0,
        gpu_memory_bytes: 0,
        message: std::ptr::null(),
        reward_chosen: f32::NAN,
        reward_rejected: f32::NAN,
        reward_margin: f32::NAN,
        reward_accuracy: f32::NAN,
        answers_base_exact: f64::NAN,
        answers_base_f1: f64::NAN,
        answers_base_rouge_l: f64::NAN,
        answers_exact: f64::NAN,
        answers_f1: f64::NAN,
        answers_rouge_l: f64::NAN,
    };
    let mut rewards = |r: &Option<edgetune::train::Rewards>| {
        if let Some(r) = r {
            (ev.reward_chosen, ev.reward_rejected, ev.reward_margin, ev.reward_accuracy) =
                (r.chosen, r.rejected, r.margins, r.accuracies);
        }
    };
    let mut message = None;
    match e {
        Event::Started { total_steps, start_step, planned_gpu_bytes, chosen, .. } => {
            ev.kind = edgetune_event_kind::EDGETUNE_EVENT_STARTED;
            (ev.total_steps, ev.step, ev.gpu_memory_bytes) = (*total_steps, *start_step, *planned_gpu_bytes);
            message = Some(chosen.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"));
        }
        Event::Step {
            step,
            total_steps,
            epoch,
            loss,
            lr,
            grad_norm,
            tokens_per_s,
            eta_s,
            gpu_memory_bytes,
            rewards: r,
            ..
        } => {
            rewards(r);
            (ev.step, ev.total_steps, ev.epoch, ev.loss, ev.lr) = (*step, *total_steps, *epoch, *loss, *lr);
            (ev.grad_norm, ev.tokens_per_s, ev.eta_s, ev.gpu_memory_bytes) =
                (*grad_norm, *tokens_per_s, *eta_s, *gpu_memory_bytes);
        }
        Event::Eval { step, val_loss, perplexity, best_val_loss, rewards: r, answers, .. } => {
            rewards(r);
            if let Some(a) = answers {
                (ev.answers_base_exact, ev.answers_base_f1, ev.answers_base_rouge_l) =
                    (a.base.exact, a.base.f1, a.base.rouge_l);
                (ev.answers_exact, ev.answers_f1, ev.answers_rouge_l) =
                    (a.adapter.exact, a.adapter.f1, a.adapter.rouge_l);
            }
            ev.kind = edgetune_event_kind::EDGETUNE_EVENT_EVAL;
            (ev.step, ev.val_loss, ev.perplexity, ev.best_val_loss) = (*step, *val_loss, *perplexity, *best_val_loss);
        }
        Event::Warning { step, message: m } => {
            ev.kind = edgetune_event_kind::EDGETUNE_EVENT_WARNING;
            ev.step = *step;
            message = Some(m.clone());
        }
        Event::Checkpoint { step, path } => {
            ev.kind = edgetune_event_kind::EDGETUNE_EVENT_CHECKPOINT;
            ev.step = *step;
            message = Some(path.display().to_string());
        }
        Event::Finished { step, reason, best_val_loss } => {
            ev.kind = edgetune_event_kind::EDGETUNE_EVENT_FINISHED;
            ev.step = *step;
            ev.best_val_loss = best_val_loss.unwrap_or(f32::NAN);
            message = Some(
                match reason {
                    StopReason::Completed => "completed",
                    StopReason::EarlyStopped => "early_stopped",
                    StopReason::Cancelled => "cancelled",
                }
                .to_string(),
            );
        }
    }
    let c = message.map(|m| CString::new(m.replace('\0', " ")).unwrap_or_default());
    if let Some(c) = &c {
        ev.message = c.as_ptr();
    }
    f(&ev);
}

/// Asks a running (or the next) `edgetune_trainer_run` to stop after its current step, write a
/// checkpoint (if a path is set) and return. Thread-safe: call it from any thread, also while
/// another thread is inside `edgetune_trainer_run`. A cancelled trainer stays cancelled; to go
/// on, create a new trainer and resume from the checkpoint.
///
/// # Safety
/// `trainer` is a live trainer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_trainer_cancel(trainer: *const edgetune_trainer) -> edgetune_status {
    guard(|| {
        TRAINERS.get(trainer, "trainer")?.cancel.cancel();
        Ok(())
    })
}

/// Writes a checkpoint of the training state as it is now to `path` (atomically).
///
/// # Safety
/// `trainer` is a live trainer, `path` a string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_trainer_save_checkpoint(
    trainer: *const edgetune_trainer,
    path: *const c_char,
) -> edgetune_status {
    guard(|| unsafe { with_trainer_at(trainer, path, |tr, path| tr.write_checkpoint(path)) })
}

/// The settings of the run as JSON, every automatic choice filled in, and the choices with their
/// reasons: `{"config": {...TrainConfig...}, "chosen": [{"setting": "epochs", "value": "6",
/// "why": "..."}, ...]}`. `config` given to `edgetune_trainer_new` repeats the run exactly. Fixes
/// the trainer's data (as a run does). The caller owns `*out` and frees it with
/// `edgetune_string_free`.
///
/// # Safety
/// `trainer` is a live trainer, `out` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_trainer_settings(
    trainer: *const edgetune_trainer,
    out: *mut *mut c_char,
) -> edgetune_status {
    guard(|| {
        let out = unsafe { out_ptr(out, "out") }?;
        let t = TRAINERS.get(trainer, "trainer")?;
        let mut state = t.inner.hold("trainer")?;
        let tr = state.trainer(&t.cancel)?;
        let json = serde_json::json!({"config": tr.config(), "chosen": tr.chosen()}).to_string();
        *out = CString::new(json).map_err(|e| Fail::invalid(e.to_string()))?.into_raw();
        Ok(())
    })
}

/// The trained adapter: after a run, the one it returned (the best by a meaningful validation
/// loss with `keep_best`, else the final one); before any run, the adapter as it is (fresh or
/// resumed). The caller owns `*out` and frees it with `edgetune_adapter_free`.
///
/// # Safety
/// `trainer` is a live trainer, `out` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_trainer_adapter(
    trainer: *const edgetune_trainer,
    out: *mut *mut edgetune_adapter,
) -> edgetune_status {
    guard(|| {
        let out = unsafe { out_ptr(out, "out") }?;
        let t = TRAINERS.get(trainer, "trainer")?;
        let adapter = t.inner.hold("trainer")?.trained_adapter(&t.cancel)?;
        *out = ADAPTERS.add(AdapterObj { adapter })?;
        Ok(())
    })
}

/// Saves the trained adapter (see `edgetune_trainer_adapter`) as a PEFT folder that Hugging
/// Face PEFT loads, recording the model's path as its base.
///
/// # Safety
/// `trainer` is a live trainer, `dir` a string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_trainer_save_adapter(
    trainer: *const edgetune_trainer,
    dir: *const c_char,
) -> edgetune_status {
    guard(|| {
        let t = TRAINERS.get(trainer, "trainer")?;
        let dir = unsafe { text(dir, "dir") }?;
        let mut state = t.inner.hold("trainer")?;
        let base = state.session.hold("model")?.path.display().to_string();
        let adapter = state.trained_adapter(&t.cancel)?;
        peft::save(Path::new(dir), &adapter, &base)?;
        Ok(())
    })
}

/// Frees a trainer. A call on it still running on another thread (a run, a cancel) keeps what
/// it needs until it returns; to stop a run, cancel it first. NULL, or a handle freed before, is
/// accepted and does nothing.
///
/// # Safety
/// None: any value is accepted.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn edgetune_trainer_free(trainer: *mut edgetune_trainer) {
    let _ = catch_unwind(AssertUnwindSafe(|| TRAINERS.free(trainer)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        let mut buf = [0 as c_char; 256];
        let n = unsafe { edgetune_last_error_message(buf.as_mut_ptr(), buf.len()) };
        let s = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
        assert_eq!(n, s.len(), "the returned length is the message's");
        s
    }

    /// The header's version constants and `edgetune_version()` are the crate's version (the
    /// CMake project and the soname take theirs from the same place; see CMakeLists.txt).
    #[test]
    fn the_header_version_is_the_crate_version() {
        let v = |s: &str| s.parse::<u32>().expect("a number");
        assert_eq!(EDGETUNE_VERSION_MAJOR, v(env!("CARGO_PKG_VERSION_MAJOR")));
        assert_eq!(EDGETUNE_VERSION_MINOR, v(env!("CARGO_PKG_VERSION_MINOR")));
        assert_eq!(EDGETUNE_VERSION_PATCH, v(env!("CARGO_PKG_VERSION_PATCH")));
        let text = unsafe { CStr::from_ptr(edgetune_version()) }.to_str().expect("UTF-8");
        assert_eq!(text, env!("CARGO_PKG_VERSION"));
        let cmake = include_str!("../CMakeLists.txt");
        assert!(cmake.contains(&format!("VERSION {}", env!("CARGO_PKG_VERSION"))), "CMakeLists.txt's project version");
    }

    /// A panic inside an export comes back as EDGETUNE_ERROR_PANIC with a message, leaves the
    /// out-pointer NULL, and the library keeps working on that thread.
    #[test]
    fn a_panic_inside_an_export_is_a_status_not_an_unwind() {
        let mut model: *mut edgetune_model = std::ptr::null_mut();
        INJECT_PANIC.with(|p| p.set(true));
        let status = unsafe { edgetune_model_load(std::ptr::null(), std::ptr::null(), 0, 0, &mut model) };
        assert_eq!(status, EDGETUNE_ERROR_PANIC);
        assert!(model.is_null(), "no handle may come out of a panic");
        let message = last_error();
        assert!(message.contains("internal error") && message.contains("injected by a test"), "{message}");

        // The next call runs normally and reports its own error.
        let mut loss = 0f32;
        let status = unsafe { edgetune_model_loss(std::ptr::null(), c"x".as_ptr(), &mut loss) };
        assert_eq!(status, EDGETUNE_ERROR_NULL_ARGUMENT);
        assert!(last_error().contains("`model`"), "{}", last_error());
    }

    /// The repository's test fixtures: `EDGETUNE_FIXTURES` when set (the crate's tests run from
    /// its unpacked `.crate` file, which has no fixtures of its own), else `tests/reference/fixtures`
    /// of the checkout the crate is built in.
    fn fixtures() -> PathBuf {
        std::env::var_os("EDGETUNE_FIXTURES")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/reference/fixtures"))
    }

    /// Runs `body` on a thread and fails if it has not finished within a minute and a half: a
    /// deadlock fails the test instead of hanging it.
    fn within_time(what: &str, body: impl FnOnce() + Send + 'static) {
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            body();
            let _ = tx.send(());
        });
        match rx.recv_timeout(std::time::Duration::from_secs(90)) {
            Ok(()) => worker.join().expect("the test body"),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                if let Err(p) = worker.join() {
                    std::panic::resume_unwind(p)
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{what}: still running after 90 s (a deadlock)"),
        }
    }

    /// A context and the tiny Llama fixture loaded on it.
    fn tiny_model() -> (*mut edgetune_context, *mut edgetune_model) {
        let mut ctx = std::ptr::null_mut();
        assert_eq!(unsafe { edgetune_context_new(std::ptr::null(), &mut ctx) }, EDGETUNE_OK, "{}", last_error());
        let path = CString::new(fixtures().join("tiny_llama").display().to_string()).expect("path");
        let mut model = std::ptr::null_mut();
        let status = unsafe { edgetune_model_load(ctx, path.as_ptr(), 0, 256, &mut model) };
        assert_eq!(status, EDGETUNE_OK, "{}", last_error());
        (ctx, model)
    }

    /// Every `edgetune_quant` value loads a GGUF file (GGUF keeps its quantized blocks); any other
    /// number is an error that says what it is.
    #[test]
    fn every_quant_value_loads_and_others_are_refused() {
        let mut ctx = std::ptr::null_mut();
        assert_eq!(unsafe { edgetune_context_new(std::ptr::null(), &mut ctx) }, EDGETUNE_OK, "{}", last_error());
        let path = CString::new(fixtures().join("tiny_llama_spm.gguf").display().to_string()).expect("path");
        for q in [
            edgetune_quant::EDGETUNE_QUANT_NF4,
            edgetune_quant::EDGETUNE_QUANT_NONE,
            edgetune_quant::EDGETUNE_QUANT_GGUF,
        ] {
            let mut model = std::ptr::null_mut();
            let status = unsafe { edgetune_model_load(ctx, path.as_ptr(), q as i32, 64, &mut model) };
            assert_eq!(status, EDGETUNE_OK, "{q:?}: {}", last_error());
            unsafe { edgetune_model_free(model) };
        }
        let mut model = std::ptr::null_mut();
        let status = unsafe { edgetune_model_load(ctx, path.as_ptr(), 3, 64, &mut model) };
        assert_eq!(status, EDGETUNE_ERROR_INVALID_ARGUMENT);
        assert!(last_error().contains("quant 3 is not an edgetune_quant value"), "{}", last_error());
        unsafe { edgetune_context_free(ctx) };
    }

    /// A trainer on `model` with a few records and `settings`.
    fn tiny_trainer(model: *const edgetune_model, settings: &std::ffi::CStr) -> *mut edgetune_trainer {
        let mut t = std::ptr::null_mut();
        assert_eq!(unsafe { edgetune_trainer_new(model, settings.as_ptr(), &mut t) }, EDGETUNE_OK, "{}", last_error());
        for i in 0..6 {
            let record = CString::new(format!(
                r#"{{"messages": [{{"role": "user", "content": "question {i}"}}, {{"role": "assistant", "content": "answer {i} is {}"}}]}}"#,
                i * 7
            ))
            .expect("record");
            assert_eq!(unsafe { edgetune_trainer_add_record(t, record.as_ptr()) }, EDGETUNE_OK, "{}", last_error());
        }
        t
    }

    const SETTINGS: &std::ffi::CStr =
        c"{\"max_steps\": 3, \"batch_tokens\": 64, \"lora\": {\"r\": 2, \"alpha\": 4}, \"data\": {\"val_fraction\": 0}}";

    /// A freed handle, a handle of another kind and a made-up one are errors that name the
    /// argument, never a read of freed memory; freeing twice, or freeing garbage, does nothing.
    #[test]
    fn freed_foreign_and_made_up_handles_are_errors() {
        within_time("handles", || {
            let (ctx, model) = tiny_model();
            let t = tiny_trainer(model, SETTINGS);
            let mut loss = 0f32;
            let as_model = t as *const edgetune_model;
            assert_eq!(
                unsafe { edgetune_model_loss(as_model, c"x".as_ptr(), &mut loss) },
                EDGETUNE_ERROR_INVALID_ARGUMENT
            );
            assert!(last_error().contains("`model` is not a live edgetune_model handle"), "{}", last_error());
            let made_up = 0x1234usize as *const edgetune_model;
            assert_eq!(
                unsafe { edgetune_model_loss(made_up, c"x".as_ptr(), &mut loss) },
                EDGETUNE_ERROR_INVALID_ARGUMENT
            );
            assert_eq!(
                unsafe { edgetune_model_loss(model, c"a b c".as_ptr(), &mut loss) },
                EDGETUNE_OK,
                "{}",
                last_error()
            );
            unsafe { edgetune_model_free(model) };
            assert_eq!(
                unsafe { edgetune_model_loss(model, c"a b c".as_ptr(), &mut loss) },
                EDGETUNE_ERROR_INVALID_ARGUMENT
            );
            assert!(last_error().contains("was freed"), "{}", last_error());
            // The trainer keeps the model it was made on.
            let mut json = std::ptr::null_mut();
            assert_eq!(unsafe { edgetune_trainer_settings(t, &mut json) }, EDGETUNE_OK, "{}", last_error());
            unsafe { edgetune_string_free(json) };
            unsafe { edgetune_trainer_free(t) };
            assert_eq!(unsafe { edgetune_trainer_cancel(t) }, EDGETUNE_ERROR_INVALID_ARGUMENT);
            unsafe { edgetune_trainer_free(t) };
            unsafe { edgetune_model_free(model) };
            unsafe { edgetune_adapter_free(0x5678usize as *mut edgetune_adapter) };
            unsafe { edgetune_context_free(ctx) };
        });
    }

    /// A trainer freed on one thread while another runs it and a third cancels it: the run
    /// finishes with its trainer, the cancels before the free work and those after it are
    /// errors.
    #[test]
    fn freeing_a_trainer_while_other_threads_run_and_cancel_it_is_safe() {
        within_time("free while running", || {
            let (ctx, model) = tiny_model();
            let t = tiny_trainer(
                model,
                c"{\"max_steps\": 200, \"batch_tokens\": 64, \"lora\": {\"r\": 2}, \"data\": {\"val_fraction\": 0}}",
            );
            let id = t as usize;
            let (stepped_tx, stepped_rx) = std::sync::mpsc::channel::<()>();
            let runner = std::thread::spawn(move || {
                let tx = Box::new(stepped_tx);
                unsafe extern "C" fn on_event(userdata: *mut c_void, event: *const edgetune_event) {
                    let tx = unsafe { &*(userdata as *const std::sync::mpsc::Sender<()>) };
                    if unsafe { (*event).kind } == edgetune_event_kind::EDGETUNE_EVENT_STEP {
                        let _ = tx.send(());
                    }
                }
                let status =
                    unsafe { edgetune_trainer_run(id as *const _, Some(on_event), &*tx as *const _ as *mut c_void) };
                (status, last_error())
            });
            // Once the run is under way (a cancel before its first step would end it before
            // any step is reported), one thread cancels in a loop while this one frees.
            stepped_rx.recv().expect("a first step");
            let canceller = std::thread::spawn(move || {
                let mut statuses = Vec::new();
                loop {
                    let s = unsafe { edgetune_trainer_cancel(id as *const _) };
                    statuses.push(s);
                    if s != EDGETUNE_OK {
                        return statuses;
                    }
                    std::thread::yield_now();
                }
            });
            std::thread::sleep(std::time::Duration::from_millis(5));
            unsafe { edgetune_trainer_free(id as *mut edgetune_trainer) };
            let statuses = canceller.join().expect("canceller");
            assert_eq!(statuses.last(), Some(&EDGETUNE_ERROR_INVALID_ARGUMENT), "cancels after the free fail");
            assert!(statuses[..statuses.len() - 1].iter().all(|s| *s == EDGETUNE_OK), "{statuses:?}");
            let (status, message) = runner.join().expect("runner");
            assert_eq!(status, EDGETUNE_OK, "the run finishes with its trainer: {message}");
            unsafe { edgetune_model_free(model) };
            unsafe { edgetune_context_free(ctx) };
        });
    }

    /// What the callbacks below saw when they called back into the library.
    #[derive(Default)]
    struct Reentry {
        model: usize,
        trainer: usize,
        statuses: Vec<(&'static str, edgetune_status)>,
    }

    /// A token callback that calls the model it is generating with, and an event callback that
    /// calls its own trainer and its model: the calls on the busy model or trainer return
    /// EDGETUNE_ERROR_BUSY at once, cancel and calls on the idle model work, and nothing waits
    /// for itself.
    #[test]
    fn callbacks_that_call_back_in_get_busy_never_a_deadlock() {
        within_time("re-entry", || {
            let (ctx, model) = tiny_model();
            unsafe extern "C" fn on_token(userdata: *mut c_void, _piece: *const c_char) -> i32 {
                let r = unsafe { &mut *(userdata as *mut Reentry) };
                let m = r.model as *const edgetune_model;
                let mut loss = 0f32;
                r.statuses.push(("loss", unsafe { edgetune_model_loss(m, c"x y".as_ptr(), &mut loss) }));
                let again = unsafe {
                    edgetune_generate(
                        m,
                        c"hi".as_ptr(),
                        std::ptr::null(),
                        None,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                    )
                };
                r.statuses.push(("generate", again));
                r.statuses.push(("set_adapter", unsafe { edgetune_model_set_adapter(m, std::ptr::null()) }));
                0
            }
            let mut r = Reentry { model: model as usize, ..Default::default() };
            let status = unsafe {
                edgetune_generate(
                    model,
                    c"hello".as_ptr(),
                    std::ptr::null(),
                    Some(on_token),
                    &mut r as *mut Reentry as *mut c_void,
                    std::ptr::null_mut(),
                )
            };
            assert_eq!(status, EDGETUNE_OK, "{}", last_error());
            assert_eq!(
                r.statuses,
                vec![
                    ("loss", EDGETUNE_ERROR_BUSY),
                    ("generate", EDGETUNE_ERROR_BUSY),
                    ("set_adapter", EDGETUNE_ERROR_BUSY)
                ]
            );

            unsafe extern "C" fn on_event(userdata: *mut c_void, event: *const edgetune_event) {
                let r = unsafe { &mut *(userdata as *mut Reentry) };
                if unsafe { (*event).kind } != edgetune_event_kind::EDGETUNE_EVENT_STEP || !r.statuses.is_empty() {
                    return;
                }
                let t = r.trainer as *const edgetune_trainer;
                let mut json = std::ptr::null_mut();
                r.statuses.push(("settings", unsafe { edgetune_trainer_settings(t, &mut json) }));
                r.statuses.push(("save_checkpoint", unsafe {
                    edgetune_trainer_save_checkpoint(t, c"/nonexistent/x".as_ptr())
                }));
                let mut loss = 0f32;
                let m = r.model as *const edgetune_model;
                r.statuses.push(("model loss", unsafe { edgetune_model_loss(m, c"x y".as_ptr(), &mut loss) }));
                r.statuses.push(("cancel", unsafe { edgetune_trainer_cancel(t) }));
            }
            let t = tiny_trainer(model, SETTINGS);
            let mut r = Reentry { model: model as usize, trainer: t as usize, ..Default::default() };
            let status = unsafe { edgetune_trainer_run(t, Some(on_event), &mut r as *mut Reentry as *mut c_void) };
            assert_eq!(status, EDGETUNE_OK, "{}", last_error());
            assert_eq!(
                r.statuses,
                vec![
                    ("settings", EDGETUNE_ERROR_BUSY),
                    ("save_checkpoint", EDGETUNE_ERROR_BUSY),
                    ("model loss", EDGETUNE_OK),
                    ("cancel", EDGETUNE_OK)
                ]
            );
            // The trainer works again once the run has returned.
            let mut json = std::ptr::null_mut();
            assert_eq!(unsafe { edgetune_trainer_settings(t, &mut json) }, EDGETUNE_OK, "{}", last_error());
            unsafe { edgetune_string_free(json) };
            unsafe { edgetune_trainer_free(t) };
            unsafe { edgetune_model_free(model) };
            unsafe { edgetune_context_free(ctx) };
        });
    }

    /// Every export runs its body inside the panic boundary: `guard` or `catch_unwind`.
    #[test]
    fn every_export_is_behind_the_panic_boundary() {
        let source = include_str!("lib.rs");
        let mut exports = 0;
        for (i, chunk) in source.split("#[unsafe(no_mangle)]").enumerate().skip(1) {
            let signature = chunk.lines().find(|l| l.contains("extern \"C\" fn")).unwrap_or_default();
            let name = signature.split("fn ").nth(1).and_then(|s| s.split('(').next()).unwrap_or("?");
            let body_end = chunk.find("\n}\n").unwrap_or(chunk.len());
            let body = &chunk[..body_end];
            let bounded = body.contains("guard(") || body.contains("catch_unwind(");
            // The version is a static string literal: nothing in it can panic.
            let trivial = name == "edgetune_version" && body.contains("concat!(env!(\"CARGO_PKG_VERSION\"), \"\\0\")");
            assert!(bounded || trivial, "export #{i} `{name}` is not wrapped in guard or catch_unwind");
            exports += 1;
        }
        assert!(exports >= 26, "found only {exports} exports: the scan is broken");
    }
}

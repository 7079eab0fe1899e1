"""edgetune for Python: fine-tune a LoRA adapter on a local LLM on any GPU, and generate with it.

A thin ctypes layer over the edgetune C library (``libedgetune``); it needs no torch and no
compiler. Handles are freed by ``close()``, by ``with`` blocks, or when garbage-collected::

    import edgetune

    with edgetune.Model.load("SmolLM2-135M-Instruct.Q4_1.gguf") as model:
        print(model.generate("Who are you?", chat=True, max_new_tokens=40))
        with model.trainer({"epochs": 3, "lora": {"r": 16}}) as trainer:
            trainer.add_file("my_data.jsonl")
            for event in trainer.events():
                if event.kind == "step":
                    print(event.step, event.loss)
            trainer.save_adapter("my-adapter")
            with trainer.adapter() as adapter:
                model.set_adapter(adapter)
        print(model.generate("Who are you?", chat=True, max_new_tokens=40))
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

from . import _native

__all__ = [
    "Adapter",
    "Context",
    "EdgetuneError",
    "Event",
    "Model",
    "Trainer",
    "version",
]

#: The package's version, the C library's it was built with (``version()`` asks the library).
__version__ = "0.1.0"

PathLike = Union[str, "os.PathLike[str]"]

_lib = _native.load_library()


# --- errors ---------------------------------------------------------------------------------


class EdgetuneError(Exception):
    """A call into edgetune failed. ``status`` is the C status name, ``message`` its text."""

    status = "EDGETUNE_ERROR"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class NullArgumentError(EdgetuneError, ValueError):
    status = "EDGETUNE_ERROR_NULL_ARGUMENT"


class InvalidArgumentError(EdgetuneError, ValueError):
    status = "EDGETUNE_ERROR_INVALID_ARGUMENT"


class IOFailure(EdgetuneError, OSError):
    status = "EDGETUNE_ERROR_IO"


class FormatError(EdgetuneError, ValueError):
    status = "EDGETUNE_ERROR_FORMAT"


class UnsupportedError(EdgetuneError):
    status = "EDGETUNE_ERROR_UNSUPPORTED"


class NoGpuError(EdgetuneError):
    status = "EDGETUNE_ERROR_NO_GPU"


class GpuError(EdgetuneError):
    status = "EDGETUNE_ERROR_GPU"


class DivergedError(EdgetuneError):
    status = "EDGETUNE_ERROR_DIVERGED"


class InternalError(EdgetuneError):
    status = "EDGETUNE_ERROR_PANIC"


class BusyError(EdgetuneError):
    """A call made from inside a callback (``on_token``, ``on_event``) on the model or trainer
    whose call invoked that callback: make it after that call returns."""

    status = "EDGETUNE_ERROR_BUSY"


class OutOfGpuMemoryError(GpuError, MemoryError):
    """The GPU ran out of memory while allocating; the message names what, the planned bytes
    and which setting to lower."""

    status = "EDGETUNE_ERROR_OUT_OF_MEMORY"


_ERRORS = {
    1: NullArgumentError,
    2: InvalidArgumentError,
    3: IOFailure,
    4: FormatError,
    5: UnsupportedError,
    6: NoGpuError,
    7: GpuError,
    8: DivergedError,
    9: InternalError,
    10: BusyError,
    11: OutOfGpuMemoryError,
}
__all__ += [cls.__name__ for cls in _ERRORS.values()]


def _last_error() -> str:
    n = _lib.edgetune_last_error_message(None, 0)
    buf = ctypes.create_string_buffer(n + 1)
    _lib.edgetune_last_error_message(buf, n + 1)
    return buf.value.decode("utf-8", "replace")


def _check(status: int) -> None:
    if status != 0:
        cls = _ERRORS.get(status, EdgetuneError)
        raise cls(_last_error())


def _c(text: Optional[Union[str, PathLike]]) -> Optional[bytes]:
    if text is None:
        return None
    return os.fsencode(text) if not isinstance(text, str) else text.encode("utf-8")


def _take_string(ptr: ctypes.c_void_p) -> str:
    """Copies a string the library returned, then frees it."""
    try:
        return ctypes.string_at(ptr).decode("utf-8", "replace") if ptr else ""
    finally:
        _lib.edgetune_string_free(ptr)


def version() -> str:
    """The C library's version."""
    return _lib.edgetune_version().decode()


class _Handle:
    """Owns one C handle; ``close()`` (or leaving a ``with`` block) frees it once. Closing is
    safe from any thread, also while another thread is inside a call on the object: that call
    finishes (the library keeps what it uses until it returns), and later calls raise
    ``ValueError``."""

    _free: Callable[[ctypes.c_void_p], None]

    def __init__(self, ptr: ctypes.c_void_p):
        self._ptr = ptr

    @property
    def _handle(self) -> ctypes.c_void_p:
        if not self._ptr:
            raise ValueError(f"this {type(self).__name__} is closed")
        return self._ptr

    def close(self) -> None:
        ptr, self._ptr = self._ptr, None
        if ptr:
            type(self)._free(ptr)

    @property
    def closed(self) -> bool:
        return not self._ptr

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # At interpreter exit the library may be gone already; the OS frees everything then.
        try:
            self.close()
        except Exception:
            pass


def _on_worker(
    name: str, produce: Callable[[Callable[[Any], bool]], Any], on_early_exit: Callable[[], None]
) -> Iterator[Any]:
    """Runs ``produce(put)`` on a worker thread and yields what it puts. ``put`` returns False
    once the consumer has left. If the consumer leaves early, ``on_early_exit()`` is called and
    the worker is waited for; an exception from ``produce`` is raised to the consumer."""
    items: "queue.Queue[Any]" = queue.Queue(maxsize=64)
    stop = threading.Event()
    done = object()
    failure: list[BaseException] = []

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            produce(put)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            failure.append(e)
        finally:
            put(done)

    worker = threading.Thread(target=work, name=name, daemon=True)
    worker.start()
    finished = False
    try:
        while (item := items.get()) is not done:
            yield item
        finished = True
    finally:
        stop.set()
        if not finished:
            on_early_exit()
        worker.join()
    if failure:
        raise failure[0]


def _new(fn, *args) -> ctypes.c_void_p:
    out = ctypes.c_void_p()
    _check(fn(*args, ctypes.byref(out)))
    return out


# --- context, model, adapters ---------------------------------------------------------------


class Context(_Handle):
    """A GPU context: the adapter and device models are loaded onto.

    ``adapter_name`` picks the GPU whose name contains it; ``None`` takes ``EDGETUNE_ADAPTER``
    from the environment, else the best GPU found (a discrete one first).
    """

    _free = _lib.edgetune_context_free

    def __init__(self, adapter_name: Optional[str] = None):
        super().__init__(_new(_lib.edgetune_context_new, _c(adapter_name)))

    def describe(self) -> dict:
        """The adapter: name, backend, device type, driver, features and limits."""
        out = _new(_lib.edgetune_context_describe, self._handle)
        return json.loads(_take_string(out))


_QUANTS = {"nf4": 0, "none": 1, "gguf": 2}


def _generate_options(*, chat: bool, stop: Optional[Iterable[str]], **values: Any) -> dict[str, Any]:
    """The options JSON of ``edgetune_generate`` and ``edgetune_generate_many``: the values given."""
    options: dict[str, Any] = {"chat": chat}
    options.update({key: value for key, value in values.items() if value is not None})
    if stop is not None:
        options["stop"] = list(stop)
    return options


class Model(_Handle):
    """A model on the GPU with its tokenizer. Use :meth:`load`."""

    _free = _lib.edgetune_model_free

    @classmethod
    def load(
        cls,
        path: PathLike,
        *,
        quant: str = "gguf",
        max_context: int = 0,
        context: Optional[Context] = None,
    ) -> "Model":
        """Loads a Hugging Face folder or a ``.gguf`` file.

        ``quant`` is ``"gguf"`` (the default: a GGUF file's quantized tensors keep their own
        values, NF4 for its other weights and for a Hugging Face folder), ``"nf4"`` (NF4
        throughout) or ``"none"`` (f32).
        ``max_context`` sizes the KV cache in tokens (0: 2048, capped by the model). Without a
        ``context`` the default GPU is opened for this model alone.
        """
        if quant not in _QUANTS:
            raise InvalidArgumentError(f"quant: expected one of {sorted(_QUANTS)}, got {quant!r}")
        if not 0 <= max_context < 2**32:
            raise InvalidArgumentError(f"max_context: expected 0 to 2^32-1, got {max_context}")
        own = context is None
        ctx = Context() if own else context
        try:
            ptr = _new(_lib.edgetune_model_load, ctx._handle, _c(path), _QUANTS[quant], max_context)
        finally:
            if own:
                ctx.close()  # the model keeps what it needs
        model = cls(ptr)
        model.path = os.fspath(path)
        return model

    def generate(
        self,
        prompt: str,
        *,
        chat: bool = False,
        system: Optional[str] = None,
        max_new_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Optional[Iterable[str]] = None,
        on_token: Optional[Callable[[str], Optional[bool]]] = None,
        adapter: Optional[str] = None,
    ) -> str:
        """Generates from ``prompt`` and returns the text (greedy unless ``temperature`` > 0).

        With ``chat=True`` the prompt is a user message rendered with the model's chat template
        (and ``system`` a system message). ``adapter`` names a resident adapter
        (:meth:`keep_adapter`) to apply to this call only. ``on_token`` gets each piece of text as it is decoded;
        returning ``False`` from it stops generation. An exception it raises stops generation
        and is raised from here.
        """
        options = _generate_options(
            chat=chat,
            system=system,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            adapter=adapter,
        )
        raised: list[BaseException] = []

        def piece(_userdata, text: bytes) -> int:
            try:
                return 0 if on_token(text.decode("utf-8", "replace")) is False else 1
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the C call
                raised.append(e)
                return 0

        callback = _native.TOKEN_CALLBACK(piece if on_token is not None else 0)
        out = ctypes.c_void_p()
        status = _lib.edgetune_generate(
            self._handle, _c(prompt), _c(json.dumps(options)), callback, None, ctypes.byref(out)
        )
        text = _take_string(out) if out else ""
        if raised:
            raise raised[0]
        _check(status)
        return text

    def generate_many(
        self,
        requests: Iterable[Union[str, tuple[Optional[str], str]]],
        *,
        chat: bool = False,
        system: Optional[str] = None,
        max_new_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Optional[Iterable[str]] = None,
        rows: Optional[int] = None,
        on_token: Optional[Callable[[int, str], Optional[bool]]] = None,
        on_end: Optional[Callable[[int, str], None]] = None,
    ) -> list[str]:
        """Generates for several requests at once and returns their texts in order: each
        request is ``(adapter, prompt)``, ``adapter`` the name of a resident adapter
        (:meth:`keep_adapter`) or ``None`` for the base model, or just a prompt for the base
        model. Each text is what :meth:`generate` with that ``adapter`` gives alone; each step
        decodes one token of every request still going in one pass (at most ``rows``, else as
        many as fit, a row taking the next request when its own ends), so serving several
        users costs little more than serving one. The options apply to every request (with a
        seed, each samples from its own generator). ``on_token`` gets each piece of text with
        its request's index; returning ``False`` ends that request only. ``on_end`` gets each
        request's index and text as soon as it ends, in the order they end. An exception either
        raises stops generation and is raised from here.
        """
        listed = []
        for r in requests:
            adapter, prompt = (None, r) if isinstance(r, str) else r
            listed.append({"prompt": prompt, "adapter": adapter})
        options = _generate_options(
            chat=chat,
            system=system,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            rows=rows,
        )
        raised: list[BaseException] = []

        def piece(_userdata, request: int, text: bytes) -> int:
            # Once a callback has raised, every request ends at its next piece.
            if raised:
                return 0
            if on_token is None:
                return 1
            try:
                return 0 if on_token(request, text.decode("utf-8", "replace")) is False else 1
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the C call
                raised.append(e)
                return 0

        def ended(_userdata, request: int, result: bytes) -> None:
            if raised:
                return
            try:
                on_end(request, json.loads(result)["text"])
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the C call
                raised.append(e)

        callback = _native.REQUEST_CALLBACK(piece if on_token is not None or on_end is not None else 0)
        end_callback = _native.REQUEST_END_CALLBACK(ended if on_end is not None else 0)
        out = ctypes.c_void_p()
        status = _lib.edgetune_generate_many_each(
            self._handle,
            _c(json.dumps(listed)),
            _c(json.dumps(options)),
            callback,
            end_callback,
            None,
            ctypes.byref(out),
        )
        results = json.loads(_take_string(out)) if out else []
        if raised:
            raise raised[0]
        _check(status)
        return [r["text"] for r in results]

    def stream(self, prompt: str, **options) -> Iterator[str]:
        """Yields the pieces of text as :meth:`generate` decodes them (generation runs on a
        worker thread; closing the iterator early stops it)."""
        return _on_worker(
            "edgetune-generate", lambda put: self.generate(prompt, on_token=put, **options), lambda: None
        )

    def loss(self, text: str) -> float:
        """The mean next-token cross-entropy of ``text`` (with the current adapter)."""
        out = ctypes.c_float()
        _check(_lib.edgetune_model_loss(self._handle, _c(text), ctypes.byref(out)))
        return out.value

    def score_answers(
        self,
        records: Iterable[dict],
        *,
        system: Optional[str] = None,
        max_new_tokens: Optional[int] = None,
    ) -> dict:
        """Answers held-out records (greedy) with the base model and with the current adapter
        and scores each answer against the record's own last (assistant) message: exact match
        and token F1 as SQuAD's evaluation computes them, ROUGE-L as ``rouge-score`` does.

        ``records`` are conversations in any training format. Returns ``{"answers": [...],
        "base": {"exact", "f1", "rouge_l"}, "adapter": {...} or None}``; each answer has its
        ``line`` (1-based), ``question``, ``reference``, ``base`` and ``adapter`` texts and their
        scores.
        """
        options: dict[str, Any] = {}
        if system is not None:
            options["system"] = system
        if max_new_tokens is not None:
            options["max_new_tokens"] = max_new_tokens
        out = ctypes.c_void_p()
        status = _lib.edgetune_score_answers(
            self._handle, _c(json.dumps(list(records))), _c(json.dumps(options)), ctypes.byref(out)
        )
        _check(status)
        return json.loads(_take_string(out))

    def set_adapter(self, adapter: Optional["Adapter"]) -> None:
        """Applies ``adapter`` to everything generated from now on; ``None`` goes back to the
        base model. The model keeps its own copy, so the adapter may be closed afterwards."""
        _check(_lib.edgetune_model_set_adapter(self._handle, adapter._handle if adapter else None))

    def keep_adapter(self, name: str, adapter: "Adapter") -> None:
        """Keeps ``adapter`` on the GPU under ``name`` beside any others; ``generate(...,
        adapter=name)`` applies it with no upload and without changing :meth:`set_adapter`'s."""
        _check(_lib.edgetune_model_keep_adapter(self._handle, _c(name), adapter._handle))

    def drop_adapter(self, name: str) -> None:
        """Frees the GPU memory of the resident adapter ``name``."""
        _check(_lib.edgetune_model_drop_adapter(self._handle, _c(name)))

    def load_adapter(self, path: PathLike) -> "Adapter":
        """Loads an adapter made for this model: a PEFT folder or a GGUF LoRA file."""
        return Adapter(_new(_lib.edgetune_adapter_load, self._handle, _c(path)))

    def trainer(self, config: Union[None, Mapping[str, Any], str] = None) -> "Trainer":
        """A :class:`Trainer` for this model (see there)."""
        return Trainer(self, config)


class Adapter(_Handle):
    """A LoRA adapter in host memory. From :meth:`Model.load_adapter` or
    :meth:`Trainer.adapter`."""

    _free = _lib.edgetune_adapter_free

    def save(self, path: PathLike, base_model: Optional[str] = None) -> None:
        """Writes a PEFT adapter folder (``adapter_model.safetensors`` and
        ``adapter_config.json``), atomically."""
        _check(_lib.edgetune_adapter_save(self._handle, _c(path), _c(base_model)))

    def save_gguf(self, path: PathLike, model: "Model", type: str = "f16") -> None:
        """Writes a GGUF LoRA file that llama.cpp (``--lora``) and Ollama (``ADAPTER``) apply to
        ``model``'s GGUF; ``type`` is ``"f32"``, ``"f16"``, ``"bf16"`` or ``"q8_0"``."""
        _check(_lib.edgetune_adapter_save_gguf(model._handle, self._handle, _c(path), _c(type)))


# --- training -------------------------------------------------------------------------------

_KINDS = ("started", "step", "eval", "warning", "checkpoint", "finished")


def _scores(exact: float, f1: float, rouge_l: float) -> Optional[dict]:
    if math.isnan(exact):
        return None
    return {"exact": exact, "f1": f1, "rouge_l": rouge_l}


@dataclass(frozen=True)
class Event:
    """One training event. ``kind`` is one of ``"started"``, ``"step"``, ``"eval"``,
    ``"warning"``, ``"checkpoint"`` or ``"finished"``; fields a kind does not set are 0 (or
    NaN for the validation figures and the rewards, ``None`` for ``message``). The rewards are
    DPO's (TRL's ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` and
    ``rewards/accuracies``), on the steps and evaluations of ``"method": "dpo"``. On the
    evaluations of a trainer that scores answers (:meth:`Trainer.score_answers_at_evals`),
    ``answers_base`` and ``answers`` hold the base model's and the adapter's mean scores
    (``{"exact", "f1", "rouge_l"}``); otherwise they are ``None``."""

    kind: str
    step: int
    total_steps: int
    epoch: float
    loss: float
    lr: float
    grad_norm: float
    val_loss: float
    perplexity: float
    best_val_loss: float
    tokens_per_s: float
    eta_s: float
    gpu_memory_bytes: int
    message: Optional[str]
    reward_chosen: float = math.nan
    reward_rejected: float = math.nan
    reward_margin: float = math.nan
    reward_accuracy: float = math.nan
    answers_base: Optional[dict] = None
    answers: Optional[dict] = None

    @classmethod
    def _from_c(cls, e: _native.Event) -> "Event":
        kind = _KINDS[e.kind] if 0 <= e.kind < len(_KINDS) else f"unknown({e.kind})"
        message = e.message.decode("utf-8", "replace") if e.message else None
        return cls(
            kind,
            e.step,
            e.total_steps,
            e.epoch,
            e.loss,
            e.lr,
            e.grad_norm,
            e.val_loss,
            e.perplexity,
            e.best_val_loss,
            e.tokens_per_s,
            e.eta_s,
            e.gpu_memory_bytes,
            message,
            e.reward_chosen,
            e.reward_rejected,
            e.reward_margin,
            e.reward_accuracy,
            _scores(e.answers_base_exact, e.answers_base_f1, e.answers_base_rouge_l),
            _scores(e.answers_exact, e.answers_f1, e.answers_rouge_l),
        )

    @property
    def has_val_loss(self) -> bool:
        return not math.isnan(self.val_loss)


class Trainer(_Handle):
    """Trains a LoRA adapter on ``model``.

    ``config`` holds any training setting (the names of the CLI's TOML file), as a dict or a
    JSON string, e.g. ``{"epochs": 3, "learning_rate": 2e-4, "lora": {"r": 16},
    "data": {"max_len": 512}}``; unknown names are errors. Settings left out (``batch_tokens``,
    ``epochs``, ``learning_rate``, ``warmup_steps``, ``keep_best``, ``data.val_fraction``) are
    chosen from the data (see :meth:`settings`); ``{"data": {"val_data": "held.jsonl"}}`` names
    the user's own held-out records. Add data with :meth:`add_file` or
    :meth:`add_records`, then :meth:`run` or iterate :meth:`events`. :meth:`cancel` may be
    called from any thread.
    """

    _free = _lib.edgetune_trainer_free

    def __init__(self, model: Model, config: Union[None, Mapping[str, Any], str] = None):
        text = config if isinstance(config, str) or config is None else json.dumps(config)
        super().__init__(_new(_lib.edgetune_trainer_new, model._handle, _c(text)))
        self.model = model

    def add_file(self, path: PathLike) -> "Trainer":
        """Adds a dataset file (JSONL/JSON with chat messages, instruction/output,
        prompt/completion or text records; CSV; plain text)."""
        _check(_lib.edgetune_trainer_add_file(self._handle, _c(path)))
        return self

    def add_record(self, record: Union[Mapping[str, Any], str]) -> "Trainer":
        """Adds one record from memory, in any shape a JSONL line may have."""
        text = record if isinstance(record, str) else json.dumps(record)
        _check(_lib.edgetune_trainer_add_record(self._handle, _c(text)))
        return self

    def add_records(self, records: Iterable[Union[Mapping[str, Any], str]]) -> "Trainer":
        for record in records:
            self.add_record(record)
        return self

    def score_answers_at_evals(
        self,
        records: Iterable[dict],
        *,
        system: Optional[str] = None,
        max_new_tokens: Optional[int] = None,
    ) -> "Trainer":
        """Answers held-out ``records`` at each evaluation with the adapter as it is then, and
        scores them as :meth:`Model.score_answers` does: the ``"eval"`` events then carry
        ``answers_base`` and ``answers``. Evaluations need validation samples (``data.val_data``
        or a split). Call it before the first run."""
        options: dict[str, Any] = {}
        if system is not None:
            options["system"] = system
        if max_new_tokens is not None:
            options["max_new_tokens"] = max_new_tokens
        status = _lib.edgetune_trainer_score_answers(
            self._handle, _c(json.dumps(list(records))), _c(json.dumps(options))
        )
        _check(status)
        return self

    def set_checkpoint_path(self, path: PathLike) -> None:
        """Writes a checkpoint there when the run ends, is cancelled, or reaches the settings'
        ``checkpoint_every`` steps or ``checkpoint_every_s`` seconds (600 by default)."""
        _check(_lib.edgetune_trainer_set_checkpoint_path(self._handle, _c(path)))

    def resume(self, path: PathLike) -> None:
        """Continues from a checkpoint of a run with the same model, data and settings."""
        _check(_lib.edgetune_trainer_resume(self._handle, _c(path)))

    def save_checkpoint(self, path: PathLike) -> None:
        _check(_lib.edgetune_trainer_save_checkpoint(self._handle, _c(path)))

    def cancel(self) -> None:
        """Stops a running :meth:`run` after its current step (thread-safe)."""
        _check(_lib.edgetune_trainer_cancel(self._handle))

    def run(self, on_event: Optional[Callable[[Event], None]] = None) -> Optional[Event]:
        """Trains to the end (or until cancelled) and returns the ``"finished"`` event.

        ``on_event`` is called with each :class:`Event` on this thread. If it raises, the run is
        cancelled and the exception is raised from here.
        """
        raised: list[BaseException] = []
        finished: list[Event] = []

        def forward(_userdata, e) -> None:
            event = Event._from_c(e.contents)
            if event.kind == "finished":
                finished.append(event)
            if on_event is None or raised:
                return
            try:
                on_event(event)
            except BaseException as ex:  # noqa: BLE001 - re-raised below, after the C call
                raised.append(ex)
                _lib.edgetune_trainer_cancel(self._ptr)

        status = _lib.edgetune_trainer_run(self._handle, _native.EVENT_CALLBACK(forward), None)
        if raised:
            raise raised[0]
        _check(status)
        return finished[-1] if finished else None

    def events(self) -> Iterator[Event]:
        """Runs training on a worker thread and yields its events. Leaving the loop early
        cancels the run (and waits for it to stop); an error is raised from the iterator."""
        return _on_worker("edgetune-train", self.run, self.cancel)

    def settings(self) -> dict:
        """The run's settings with every automatic choice filled in (``"config"``, which given
        to a new trainer repeats the run), and the choices made from the data with their reasons
        (``"chosen"``: ``setting``, ``value``, ``why``). Fixes the trainer's data."""
        return json.loads(_take_string(_new(_lib.edgetune_trainer_settings, self._handle)))

    def adapter(self) -> Adapter:
        """The trained adapter (a run, or a resume, must have happened)."""
        return Adapter(_new(_lib.edgetune_trainer_adapter, self._handle))

    def save_adapter(self, path: PathLike) -> None:
        """Saves the trained adapter as a PEFT folder, recording the model's path as its base."""
        _check(_lib.edgetune_trainer_save_adapter(self._handle, _c(path)))

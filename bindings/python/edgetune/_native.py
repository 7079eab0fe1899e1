"""Finds libedgetune and declares the C functions of ``edgetune.h`` for ctypes."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

_NAMES = {"linux": "libedgetune.so", "darwin": "libedgetune.dylib", "win32": "edgetune.dll"}
LIBRARY_NAME = _NAMES.get(sys.platform, "libedgetune.so")


def _candidates() -> list[Path]:
    """Where the library may be, in the order they are tried: ``EDGETUNE_LIB`` alone when set;
    else the copy a wheel bundles inside the package (named like an extension module,
    ``libedgetune.<suffix>``, by the build), then a build in the repository's target folders."""
    found = []
    if os.environ.get("EDGETUNE_LIB"):
        return [Path(os.environ["EDGETUNE_LIB"])]
    here = Path(__file__).resolve().parent
    found.extend(sorted(here.glob("libedgetune.*.so")) + sorted(here.glob("libedgetune.*.pyd")))
    found.append(here / LIBRARY_NAME)
    targets = []
    if os.environ.get("CARGO_TARGET_DIR"):
        targets.append(Path(os.environ["CARGO_TARGET_DIR"]))
    repo = here.parent.parent.parent
    targets.append(repo / "target")
    targets.append(Path.home() / ".cache" / "edgetune" / "target")
    for target in targets:
        for profile in ("release", "debug"):
            found.append(target / profile / LIBRARY_NAME)
    return found


def load_library() -> ctypes.CDLL:
    tried = _candidates()
    for path in tried:
        if path.is_file():
            return _declare(ctypes.CDLL(str(path)))
    listed = "\n  ".join(str(p) for p in tried)
    raise OSError(
        f"{LIBRARY_NAME} not found; tried:\n  {listed}\n"
        "Build it with `cargo build --release -p edgetune-capi` from the edgetune repository, "
        "or set EDGETUNE_LIB to its path."
    )


class Event(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int),
        ("step", ctypes.c_uint64),
        ("total_steps", ctypes.c_uint64),
        ("epoch", ctypes.c_double),
        ("loss", ctypes.c_float),
        ("lr", ctypes.c_float),
        ("grad_norm", ctypes.c_float),
        ("val_loss", ctypes.c_float),
        ("perplexity", ctypes.c_float),
        ("best_val_loss", ctypes.c_float),
        ("tokens_per_s", ctypes.c_double),
        ("eta_s", ctypes.c_double),
        ("gpu_memory_bytes", ctypes.c_uint64),
        ("message", ctypes.c_char_p),
        ("reward_chosen", ctypes.c_float),
        ("reward_rejected", ctypes.c_float),
        ("reward_margin", ctypes.c_float),
        ("reward_accuracy", ctypes.c_float),
        ("answers_base_exact", ctypes.c_double),
        ("answers_base_f1", ctypes.c_double),
        ("answers_base_rouge_l", ctypes.c_double),
        ("answers_exact", ctypes.c_double),
        ("answers_f1", ctypes.c_double),
        ("answers_rouge_l", ctypes.c_double),
    ]


EVENT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(Event))
TOKEN_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_char_p)
REQUEST_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
REQUEST_END_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)

_P = ctypes.c_void_p  # every handle is opaque
_S = ctypes.c_char_p
_OUT = ctypes.POINTER(ctypes.c_void_p)
_STATUS = ctypes.c_int

_PROTOTYPES = {
    "edgetune_last_error_message": (ctypes.c_size_t, [ctypes.c_char_p, ctypes.c_size_t]),
    "edgetune_string_free": (None, [_P]),
    "edgetune_version": (_S, []),
    "edgetune_context_new": (_STATUS, [_S, _OUT]),
    "edgetune_context_describe": (_STATUS, [_P, _OUT]),
    "edgetune_context_free": (None, [_P]),
    "edgetune_model_load": (_STATUS, [_P, _S, ctypes.c_int32, ctypes.c_uint32, _OUT]),
    "edgetune_model_free": (None, [_P]),
    "edgetune_adapter_load": (_STATUS, [_P, _S, _OUT]),
    "edgetune_adapter_save": (_STATUS, [_P, _S, _S]),
    "edgetune_adapter_save_gguf": (_STATUS, [_P, _P, _S, _S]),
    "edgetune_model_keep_adapter": (_STATUS, [_P, _S, _P]),
    "edgetune_model_drop_adapter": (_STATUS, [_P, _S]),
    "edgetune_adapter_free": (None, [_P]),
    "edgetune_model_set_adapter": (_STATUS, [_P, _P]),
    "edgetune_generate": (_STATUS, [_P, _S, _S, TOKEN_CALLBACK, _P, _OUT]),
    "edgetune_generate_many": (_STATUS, [_P, _S, _S, REQUEST_CALLBACK, _P, _OUT]),
    "edgetune_generate_many_each": (_STATUS, [_P, _S, _S, REQUEST_CALLBACK, REQUEST_END_CALLBACK, _P, _OUT]),
    "edgetune_model_loss": (_STATUS, [_P, _S, ctypes.POINTER(ctypes.c_float)]),
    "edgetune_score_answers": (_STATUS, [_P, _S, _S, _OUT]),
    "edgetune_trainer_new": (_STATUS, [_P, _S, _OUT]),
    "edgetune_trainer_add_file": (_STATUS, [_P, _S]),
    "edgetune_trainer_add_record": (_STATUS, [_P, _S]),
    "edgetune_trainer_score_answers": (_STATUS, [_P, _S, _S]),
    "edgetune_trainer_set_checkpoint_path": (_STATUS, [_P, _S]),
    "edgetune_trainer_resume": (_STATUS, [_P, _S]),
    "edgetune_trainer_run": (_STATUS, [_P, EVENT_CALLBACK, _P]),
    "edgetune_trainer_cancel": (_STATUS, [_P]),
    "edgetune_trainer_save_checkpoint": (_STATUS, [_P, _S]),
    "edgetune_trainer_adapter": (_STATUS, [_P, _OUT]),
    "edgetune_trainer_settings": (_STATUS, [_P, _OUT]),
    "edgetune_trainer_save_adapter": (_STATUS, [_P, _S]),
    "edgetune_trainer_free": (None, [_P]),
}


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    for name, (restype, argtypes) in _PROTOTYPES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError as e:
            raise OSError(f"{lib._name} does not export {name}: it is older than this package") from e
        fn.restype = restype
        fn.argtypes = argtypes
    return lib

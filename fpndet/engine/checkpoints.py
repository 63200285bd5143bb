"""Atomic, resumable checkpoints.

Two kinds of files are written:

* **Model weights** (``*.safetensors``): one self-contained safetensors file. The model's
  configuration (a JSON-serialisable dict) is stored as a JSON string in the safetensors header
  metadata under the key ``"fpndet_config"``; extra metadata (e.g. the class names, the step) is
  stored under ``"fpndet_metadata"``. The file alone is enough to rebuild the model. A readable
  copy of the configuration can also be written as a separate JSON file (``config_json_path``);
  it is informational only, the safetensors header is authoritative.
* **Training state** (``*.pth``): a ``torch.save`` archive with the model, optimizer, scheduler
  and AMP-scaler state dicts, the step and epoch, the RNG states and free-form extras. Its content
  is restricted to tensors, dicts, lists, tuples, ints, floats, bools, strs and None, so it loads
  with ``torch.load(weights_only=True)`` (no arbitrary code runs when resuming).

Every file is written atomically: to a temporary file in the same folder, flushed and fsync'ed,
renamed over the destination with ``os.replace``, and the folder is fsync'ed. A crash mid-write
leaves the previous file untouched and no temporary file behind (unless the process is killed,
in which case only a hidden ``.<name>.*.tmp`` file may remain next to the intact destination).

Unreadable files raise :class:`fpndet.errors.InputError` naming the file.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from fpndet.errors import InputError, OutputError

CONFIG_METADATA_KEY = "fpndet_config"
EXTRA_METADATA_KEY = "fpndet_metadata"
TRAINING_STATE_FORMAT = "fpndet-training-state-v1"

_SafetensorError = getattr(safetensors, "SafetensorError", RuntimeError)
_READ_ERRORS = (
    _SafetensorError,
    RuntimeError,
    ValueError,
    EOFError,
    OSError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
)


# --------------------------------------------------------------------------------------------
# Atomic writing
# --------------------------------------------------------------------------------------------
def atomic_save(obj_writer: Callable[[IO[bytes]], Any], path: str | os.PathLike) -> None:
    """Write a file atomically through ``obj_writer(binary_file)``.

    ``obj_writer`` receives an open binary file (a temporary file in the folder of ``path``) and
    writes the content, e.g. ``lambda f: torch.save(obj, f)``. The file is then flushed,
    fsync'ed and renamed over ``path`` (``os.replace``), and the folder is fsync'ed so the rename
    survives a power loss. If anything raises, the temporary file is removed, ``path`` keeps its
    previous content, and the exception propagates; an ``OSError`` (a full disk, a missing
    permission) becomes :class:`~fpndet.errors.OutputError` naming ``path``. Missing parent
    folders are created.
    """
    path = Path(path)
    temp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(descriptor, "wb") as handle:
            obj_writer(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp_name, 0o666 & ~_current_umask())  # mkstemp's 0600 would hide the file from others
        os.replace(temp_name, path)
    except BaseException as error:
        if temp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp_name)
        cause = _os_error_in(error)  # torch.save reports a failed write as a RuntimeError
        if cause is not None:
            raise OutputError(path, cause.strerror or str(cause)) from error
        raise
    _fsync_directory(path.parent)


def _os_error_in(error: BaseException) -> OSError | None:
    """The ``OSError`` that ``error`` is, or that caused it (``__cause__``/``__context__``)."""
    seen = 0
    while error is not None and seen < 5:
        if isinstance(error, OSError):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the hidden ``.<name>.*.tmp`` files :func:`atomic_save` leaves behind when its process
    is killed mid-write (never a finished file). Returns the files removed."""
    removed = []
    for temporary in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(OSError):
            temporary.unlink()
            removed.append(temporary)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_save`)."""
    atomic_save(lambda handle: handle.write(data), path)


def _fsync_directory(folder: Path) -> None:
    """fsync a folder so a rename in it is durable (a no-op where folders cannot be opened)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


# --------------------------------------------------------------------------------------------
# Model weights (safetensors)
# --------------------------------------------------------------------------------------------
def save_model_weights(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    *,
    config: Mapping,
    metadata: Mapping[str, Any] | None = None,
    config_json_path: str | os.PathLike | None = None,
) -> None:
    """Save model weights and their configuration as one safetensors file, atomically.

    Args:
        path: destination, conventionally ``model.safetensors``.
        state_dict: parameter/buffer name -> Tensor (any device, dtype, layout). Tensors are
            copied to contiguous CPU memory, so views, non-contiguous and storage-sharing tensors
            (tied weights) are all accepted.
        config: JSON-serialisable model configuration (an OmegaConf container is converted),
            stored in the header metadata under ``"fpndet_config"``.
        metadata: optional JSON-serialisable extras (class names, step, ...), stored under
            ``"fpndet_metadata"`` and returned inside the config by :func:`load_model_weights`
            under the key ``"_metadata"``.
        config_json_path: if given, also write the configuration as readable JSON there.

    Raises:
        TypeError: the config or metadata is not JSON-serialisable.
    """
    tensors = {
        str(name): tensor.detach().to("cpu").contiguous().clone() for name, tensor in state_dict.items()
    }
    config_dict = _plain_container(config)
    header = {CONFIG_METADATA_KEY: json.dumps(config_dict, sort_keys=True)}
    if metadata is not None:
        header[EXTRA_METADATA_KEY] = json.dumps(_plain_container(metadata), sort_keys=True)
    data = safetensors.torch.save(tensors, metadata=header)
    atomic_write_bytes(path, data)
    if config_json_path is not None:
        atomic_write_bytes(config_json_path, json.dumps(config_dict, indent=2, sort_keys=True).encode())


def load_model_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a file written by :func:`save_model_weights`.

    Returns:
        ``(state_dict, config)``: CPU tensors by name, and the configuration dict (``{}`` for a
        safetensors file without fpndet metadata). Metadata passed at save time is under
        ``config["_metadata"]``.

    Raises:
        InputError: the file is missing, truncated, corrupt or has a malformed config.
    """
    path = Path(path)
    _require_file(path)
    try:
        with safetensors.safe_open(os.fspath(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            state_dict = {name: handle.get_tensor(name) for name in handle.keys()}
    except _READ_ERRORS as error:
        raise InputError(path, f"checkpoint is truncated or corrupt: {error}") from error
    config = _json_from_header(path, header, CONFIG_METADATA_KEY, default={})
    if not isinstance(config, dict):
        raise InputError(path, f"the {CONFIG_METADATA_KEY!r} metadata is not a JSON object")
    if EXTRA_METADATA_KEY in header:
        config["_metadata"] = _json_from_header(path, header, EXTRA_METADATA_KEY, default=None)
    return state_dict, config


def _json_from_header(path: Path, header: Mapping[str, str], key: str, *, default: Any) -> Any:
    if key not in header:
        return default
    try:
        return json.loads(header[key])
    except json.JSONDecodeError as error:
        raise InputError(path, f"the {key!r} metadata is not valid JSON: {error}") from error


def _plain_container(value: Any) -> Any:
    """An OmegaConf container as plain dicts/lists; anything else unchanged. JSON-checked."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    else:
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping) and not isinstance(value, dict):
        value = dict(value)
    try:
        json.dumps(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"not JSON-serialisable: {error}") from error
    return value


# --------------------------------------------------------------------------------------------
# Training state (torch.save, loadable with weights_only=True)
# --------------------------------------------------------------------------------------------
def save_training_state(
    path: str | os.PathLike,
    *,
    model_state: Mapping[str, torch.Tensor],
    optimizer_state: Mapping | None,
    scheduler_state: Mapping | None,
    scaler_state: Mapping | None,
    step: int,
    epoch: int,
    rng_state: Mapping,
    extra: Mapping | None = None,
    ema_state: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Save everything needed to resume training, atomically, loadable with ``weights_only=True``.

    Tensors are moved to CPU. NumPy arrays become tensors and NumPy scalars Python numbers.
    Callables inside the scheduler state (older torch stores e.g. OneCycleLR's annealing
    function there) are dropped: the scheduler rebuilt at resume time has its own. Any other
    object that ``torch.load(weights_only=True)`` would refuse raises ``TypeError`` here, at save
    time, naming where it is.

    To resume, build the model, optimizer and scheduler as for a fresh run, *then* load the
    optimizer state and then the scheduler state (building a scheduler rewrites the optimizer's
    learning rates, so it must come before the optimizer state is loaded).

    Args:
        path: destination, conventionally ``last.pth``.
        model_state, optimizer_state, scheduler_state, scaler_state: the ``state_dict()`` of
            each (None where not used).
        step: optimizer steps taken so far; epoch: epochs completed so far.
        rng_state: from :func:`capture_rng_state`.
        extra: free-form extras (best metric so far, config, ...).
        ema_state: the ``state_dict()`` of the weight EMA (``train.ema``), stored as
            ``"ema_state"``; None: not stored.
    """
    payload = {
        "format": TRAINING_STATE_FORMAT,
        "model_state": _sanitise(model_state, "model_state", drop_callables=False),
        "optimizer_state": _sanitise(optimizer_state, "optimizer_state", drop_callables=False),
        "scheduler_state": _sanitise(scheduler_state, "scheduler_state", drop_callables=True),
        "scaler_state": _sanitise(scaler_state, "scaler_state", drop_callables=False),
        "step": int(step),
        "epoch": int(epoch),
        "rng_state": _sanitise(rng_state, "rng_state", drop_callables=False),
        "extra": _sanitise(extra or {}, "extra", drop_callables=False),
    }
    if ema_state is not None:
        payload["ema_state"] = _sanitise(ema_state, "ema_state", drop_callables=False)
    atomic_save(lambda handle: torch.save(payload, handle), path)


_DROP = object()


def _sanitise(value: Any, where: str, *, drop_callables: bool) -> Any:
    """Recursively convert ``value`` into types that ``torch.load(weights_only=True)`` accepts."""
    if isinstance(value, np.generic):  # before the builtins: np.float64 subclasses float
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu")
    if isinstance(value, (torch.dtype, torch.device, torch.Size)):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value)).clone()
    if isinstance(value, Mapping):
        result = {}
        for key, item in value.items():
            converted = _sanitise(item, f"{where}[{key!r}]", drop_callables=drop_callables)
            if converted is not _DROP:
                result[_sanitise_key(key, where)] = converted
        return result
    if isinstance(value, (list, tuple)):
        items = [_sanitise(item, f"{where}[{i}]", drop_callables=drop_callables) for i, item in enumerate(value)]
        items = [item for item in items if item is not _DROP]
        return items if isinstance(value, list) else tuple(items)
    if drop_callables and callable(value):
        return _DROP
    raise TypeError(
        f"{where} holds a {type(value).__module__}.{type(value).__qualname__}, which "
        "torch.load(weights_only=True) cannot load; store plain numbers, strings, lists, dicts "
        "or tensors"
    )


def _sanitise_key(key: Any, where: str) -> Any:
    if isinstance(key, np.generic):
        return key.item()
    if isinstance(key, (str, int, float, bool)) or key is None:
        return key
    raise TypeError(f"{where} has a key of type {type(key).__qualname__}; use str or int keys")


def load_training_state(path: str | os.PathLike) -> dict:
    """Load a file written by :func:`save_training_state` (``weights_only=True``, onto the CPU).

    Returns:
        ``{"format", "model_state", "optimizer_state", "scheduler_state", "scaler_state", "step",
        "epoch", "rng_state", "extra"}`` (the keyword names of :func:`save_training_state`), and
        ``"ema_state"`` when one was saved.

    Raises:
        InputError: the file is missing, truncated, corrupt, holds objects that cannot be loaded
            safely, or is not an fpndet training state.
    """
    path = Path(path)
    _require_file(path)
    state = _torch_load(path)
    if not isinstance(state, dict) or state.get("format") != TRAINING_STATE_FORMAT:
        raise InputError(path, "not an fpndet training state (written by save_training_state)")
    return state


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise InputError(path, _unsafe_pickle_problem(str(error))) from None
    except _READ_ERRORS as error:
        detail = str(error)
        if not zipfile.is_zipfile(path):
            detail = f"not a complete torch.save archive ({error})"
        raise InputError(path, f"checkpoint is truncated or corrupt: {detail}") from error


def _unsafe_pickle_problem(torch_message: str) -> str:
    """One line in fpndet's words for a file torch refuses under ``weights_only=True`` (torch's
    own text is several lines and suggests ``weights_only=False``, which would run the file's code)."""
    found = re.search(r"GLOBAL ([\w.]+)", torch_message)
    what = f" (it holds a pickled {found.group(1)})" if found else ""
    return (f"not a plain state dict{what}: fpndet reads only tensors from .pth files and never runs code from "
            "them; save the weights with torch.save(model.state_dict(), path) or use a .safetensors file")


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise InputError(path, "checkpoint file does not exist")


# --------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------
def capture_rng_state() -> dict:
    """Global RNG states of Python ``random``, NumPy (legacy global), torch CPU and torch CUDA.

    Returns:
        A dict of tensors, ints, floats and None only (loadable with ``weights_only=True``):
        ``{"python": {"version", "state": int64 Tensor[625], "gauss_next"},
        "numpy": {"algorithm", "keys": int64 Tensor[624], "pos", "has_gauss", "cached_gaussian"},
        "torch_cpu": uint8 Tensor, "torch_cuda": [uint8 Tensor per device]}`` (the last only when
        CUDA is available).
    """
    version, python_state, gauss_next = random.getstate()
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": {
            "version": int(version),
            "state": torch.tensor(python_state, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "algorithm": str(algorithm),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping) -> None:
    """Restore RNG states captured by :func:`capture_rng_state`.

    Missing entries are left alone. CUDA states are restored for as many devices as both the
    saved state and this machine have.
    """
    if "python" in state:
        python = state["python"]
        random.setstate(
            (int(python["version"]), tuple(int(v) for v in python["state"].tolist()), python["gauss_next"])
        )
    if "numpy" in state:
        numpy_state = state["numpy"]
        np.random.set_state(
            (
                numpy_state["algorithm"],
                np.asarray(numpy_state["keys"].numpy(), dtype=np.uint32),
                int(numpy_state["pos"]),
                int(numpy_state["has_gauss"]),
                float(numpy_state["cached_gaussian"]),
            )
        )
    if "torch_cpu" in state:
        torch.set_rng_state(state["torch_cpu"].to("cpu", torch.uint8))
    if "torch_cuda" in state and torch.cuda.is_available():
        for device_index, device_state in enumerate(state["torch_cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state.to("cpu", torch.uint8), device_index)


# --------------------------------------------------------------------------------------------
# Generic state-dict files
# --------------------------------------------------------------------------------------------
_WRAPPER_KEYS = ("model", "state_dict", "model_state", "model_state_dict")  # first match wins


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict (name -> Tensor, on the CPU) from a weights file.

    ``.safetensors`` files are read with safetensors; anything else (``.pth``, ``.pt``, ``.bin``,
    ``.ckpt``) with ``torch.load(weights_only=True, map_location="cpu")``. A state dict wrapped
    as ``{"model": ...}`` or ``{"state_dict": ...}`` (also ``"model_state"`` as in a training
    state from :func:`save_training_state`, and ``"model_state_dict"``) is unwrapped.

    Raises:
        InputError: the file is missing, truncated, corrupt, unsafe to load, or holds no state
            dict of tensors.
    """
    path = Path(path)
    _require_file(path)
    if path.suffix == ".safetensors":
        try:
            loaded: Any = safetensors.torch.load_file(os.fspath(path), device="cpu")
        except _READ_ERRORS as error:
            raise InputError(path, f"checkpoint is truncated or corrupt: {error}") from error
    else:
        loaded = _torch_load(path)
    for _ in range(3):
        if isinstance(loaded, Mapping):
            wrapper = next((key for key in _WRAPPER_KEYS if isinstance(loaded.get(key), Mapping)), None)
            if wrapper is not None:
                loaded = loaded[wrapper]
                continue
        break
    if not isinstance(loaded, Mapping) or not loaded:
        raise InputError(path, "not a checkpoint: it holds no state dict (a mapping of names to tensors)")
    not_tensors = [key for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise InputError(
            path, f"not a state dict: entries such as {not_tensors[0]!r} are not tensors"
        )
    return {str(key): value for key, value in loaded.items()}

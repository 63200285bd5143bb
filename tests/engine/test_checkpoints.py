from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from fpndet.engine import checkpoints
from fpndet.engine.checkpoints import (
    atomic_save,
    atomic_write_bytes,
    capture_rng_state,
    load_model_weights,
    load_state_dict_file,
    load_training_state,
    remove_stale_temporaries,
    restore_rng_state,
    save_model_weights,
    save_training_state,
)
from fpndet.errors import InputError, OutputError


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def _truncate(path, keep_fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


# ------------------------------------------------------------------------------- atomic writes
def test_atomic_write_bytes_replaces_content_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(path, b"first")
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(path.parent) == ["file.bin"]


def test_crash_while_writing_keeps_previous_file_and_removes_temp(tmp_path):
    path = tmp_path / "state.pth"
    atomic_write_bytes(path, b"previous content")

    def crashing_writer(handle):
        handle.write(b"partial new cont")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save(crashing_writer, path)
    assert path.read_bytes() == b"previous content"
    assert os.listdir(tmp_path) == ["state.pth"]


def test_crash_at_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    model = _tiny_model()
    save_model_weights(path, model.state_dict(), config={"version": 1})
    before = path.read_bytes()

    def failing_replace(source, destination):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(checkpoints.os, "replace", failing_replace)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(OutputError, match="model.safetensors: cannot write: simulated crash"):
        save_model_weights(path, model.state_dict(), config={"version": 2})
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]
    _, config = load_model_weights(path)
    assert config == {"version": 1}


def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """ENOSPC in the middle of writing (simulated: every write after the first 4 KiB fails)."""
    import errno

    path = tmp_path / "last.pth"
    save_training_state(path, model_state=_tiny_model().state_dict(), optimizer_state=None, scheduler_state=None,
                        scaler_state=None, step=1, epoch=0, rng_state=capture_rng_state())
    before = path.read_bytes()
    real_fdopen = os.fdopen

    class FillingDisk:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(checkpoints.os, "fdopen", lambda *a, **k: FillingDisk(real_fdopen(*a, **k)))
    with pytest.raises(OutputError) as caught:
        save_training_state(path, model_state=_tiny_model().state_dict(), optimizer_state=None, scheduler_state=None,
                            scaler_state=None, step=2, epoch=0, rng_state=capture_rng_state())
    monkeypatch.undo()
    assert str(caught.value) == f"{path}: cannot write: No space left on device; the previous file is intact"
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pth"]
    assert load_training_state(path)["step"] == 1


def test_a_real_full_tmpfs_names_the_file_and_keeps_the_previous_checkpoint(tmp_path):
    """The same on a 1 MiB tmpfs (needs permission to mount; skipped otherwise)."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a size-limited tmpfs here (needs root)")
    try:
        path = mount / "last.safetensors"
        save_model_weights(path, {"w": torch.zeros(1000)}, config={"version": 1})
        before = path.read_bytes()
        with pytest.raises(OutputError, match=r"last.safetensors: cannot write: No space left on device"):
            save_model_weights(path, {"w": torch.zeros(400_000)}, config={"version": 2})  # 1.6 MB
        assert path.read_bytes() == before and os.listdir(mount) == ["last.safetensors"]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_written_files_get_the_usual_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "shared.json", b"{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_stale_temporaries_of_a_killed_write_are_removed(tmp_path):
    (tmp_path / ".last.pth.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "last.pth").write_bytes(b"whole")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".last.pth.abc123.tmp"]
    assert os.listdir(tmp_path) == ["last.pth"]


# ------------------------------------------------------------------------------- model weights
def test_model_weights_round_trip_with_config_and_metadata(tmp_path):
    model = _tiny_model()
    state = model.state_dict()
    config = {"model": {"backbone": "resnet18", "num_classes": 2}, "anchors": [32, 64]}
    path = tmp_path / "model.safetensors"
    save_model_weights(
        path, state, config=config, metadata={"class_names": ["a", "b"], "step": 7},
        config_json_path=tmp_path / "config.json",
    )  # fmt: skip

    loaded, loaded_config = load_model_weights(path)

    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
        assert loaded[name].dtype == tensor.dtype
    assert loaded["1.num_batches_tracked"].dtype == torch.int64
    assert loaded_config.pop("_metadata") == {"class_names": ["a", "b"], "step": 7}
    assert loaded_config == config
    assert json.loads((tmp_path / "config.json").read_text()) == config
    # The file is plain safetensors: the generic loader reads it too.
    assert set(load_state_dict_file(path)) == set(state)


def test_shared_and_non_contiguous_tensors_are_saved(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"weight": base, "tied": base, "transposed": base.t(), "row": base[1]}
    path = tmp_path / "model.safetensors"
    save_model_weights(path, state, config={})
    loaded, config = load_model_weights(path)
    assert config == {}
    assert torch.equal(loaded["tied"], base)
    assert torch.equal(loaded["transposed"], base.t())
    assert torch.equal(loaded["row"], torch.tensor([4.0, 5.0, 6.0, 7.0]))


def test_config_that_is_not_json_raises_type_error(tmp_path):
    with pytest.raises(TypeError):
        save_model_weights(tmp_path / "m.safetensors", {"w": torch.zeros(1)}, config={"bad": object()})
    assert not list(tmp_path.iterdir())


def test_truncated_safetensors_raises_input_error_naming_the_file(tmp_path):
    path = tmp_path / "truncated_model.safetensors"
    save_model_weights(path, _tiny_model().state_dict(), config={"a": 1})
    _truncate(path)
    with pytest.raises(InputError, match="truncated_model.safetensors.*truncated or corrupt"):
        load_model_weights(path)
    with pytest.raises(InputError, match="truncated_model.safetensors"):
        load_state_dict_file(path)


def test_missing_and_garbage_files_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="missing.safetensors.*does not exist"):
        load_model_weights(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(InputError, match="garbage.pth"):
        load_state_dict_file(garbage)
    with pytest.raises(InputError, match="garbage.pth"):
        load_training_state(garbage)


# ------------------------------------------------------------------------------- training state
def _train_a_step(model, optimizer, scheduler):
    loss = model(torch.randn(2, 3, 3, 3)).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


@pytest.mark.parametrize(
    "make_optimizer, make_scheduler",
    [
        (
            lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=1e-4),
            lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: min(1.0, (step + 1) / 10)),
        ),
        (
            lambda p: torch.optim.AdamW(p, lr=1e-3),
            lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=20),
        ),
        (
            lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.9, 0.99)),
            lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20, eta_min=1e-5),
        ),
    ],
    ids=["sgd-lambda", "adamw-onecycle", "adamw-cosine"],
)
def test_training_state_round_trip_under_weights_only(tmp_path, make_optimizer, make_scheduler):
    model = _tiny_model()
    optimizer = make_optimizer(model.parameters())
    scheduler = make_scheduler(optimizer)
    scaler = torch.amp.GradScaler("cpu", enabled=True) if hasattr(torch.amp, "GradScaler") else None
    for _ in range(3):
        _train_a_step(model, optimizer, scheduler)
    path = tmp_path / "last.pth"
    save_training_state(
        path,
        model_state=model.state_dict(),
        optimizer_state=optimizer.state_dict(),
        scheduler_state=scheduler.state_dict(),
        scaler_state=scaler.state_dict() if scaler is not None else None,
        step=3,
        epoch=1,
        rng_state=capture_rng_state(),
        extra={"best_ap": np.float64(0.25), "history": np.array([1.0, 2.0])},
    )

    raw = torch.load(path, map_location="cpu", weights_only=True)  # must not raise
    assert raw["step"] == 3 and raw["epoch"] == 1
    assert raw["extra"]["best_ap"] == 0.25 and isinstance(raw["extra"]["best_ap"], float)
    assert torch.equal(raw["extra"]["history"], torch.tensor([1.0, 2.0], dtype=torch.float64))

    state = load_training_state(path)
    resumed_model = _tiny_model()
    resumed_model.load_state_dict(state["model_state"])
    resumed_optimizer = make_optimizer(resumed_model.parameters())
    # Build the scheduler before loading the optimizer state: constructing a scheduler rewrites
    # the optimizer's learning rates.
    resumed_scheduler = make_scheduler(resumed_optimizer)
    resumed_optimizer.load_state_dict(state["optimizer_state"])
    resumed_scheduler.load_state_dict(state["scheduler_state"])
    # The resumed run continues exactly like the original one.
    torch.manual_seed(123)
    _train_a_step(model, optimizer, scheduler)
    torch.manual_seed(123)
    _train_a_step(resumed_model, resumed_optimizer, resumed_scheduler)
    for (name, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_training_state_rejects_unloadable_objects_at_save_time(tmp_path):
    with pytest.raises(TypeError, match=r"extra\['when'\]"):
        save_training_state(
            tmp_path / "s.pth", model_state={}, optimizer_state=None, scheduler_state=None,
            scaler_state=None, step=0, epoch=0, rng_state={}, extra={"when": object()},
        )  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_truncated_training_state_raises_input_error_naming_the_file(tmp_path):
    path = tmp_path / "truncated_state.pth"
    model = _tiny_model()
    save_training_state(
        path, model_state=model.state_dict(), optimizer_state=None, scheduler_state=None,
        scaler_state=None, step=1, epoch=0, rng_state=capture_rng_state(), extra={},
    )  # fmt: skip
    _truncate(path)
    with pytest.raises(InputError, match="truncated_state.pth.*truncated or corrupt"):
        load_training_state(path)
    with pytest.raises(InputError, match="truncated_state.pth"):
        load_state_dict_file(path)


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "callback": random.Random(0)}, path)
    with pytest.raises(InputError, match=r"unsafe.pth: not a plain state dict \(it holds a pickled random.Random\)"):
        load_state_dict_file(path)


def test_a_whole_pickled_model_is_refused_in_one_line_of_fpndets_words(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(InputError) as caught:
        load_state_dict_file(path)
    message = str(caught.value)
    assert message == (f"{path}: not a plain state dict (it holds a pickled torch.nn.modules.linear.Linear): fpndet "
                       "reads only tensors from .pth files and never runs code from them; save the weights with "
                       "torch.save(model.state_dict(), path) or use a .safetensors file")
    assert "\n" not in message and "weights_only=False" not in message


def test_other_fpndet_pth_is_not_a_training_state(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(InputError, match="weights.pth.*not an fpndet training state"):
        load_training_state(path)


# ------------------------------------------------------------------------------- RNG
def _draws():
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1)],
        np.random.rand(3).tolist() + [float(np.random.randn())],
        torch.rand(3).tolist(),
    )


def test_rng_state_round_trip_through_a_training_state_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached Gaussian (gauss_next) in the Python state
    np.random.randn()
    path = tmp_path / "rng.pth"
    save_training_state(
        path, model_state={}, optimizer_state=None, scheduler_state=None, scaler_state=None,
        step=0, epoch=0, rng_state=capture_rng_state(), extra={},
    )  # fmt: skip
    expected = _draws()
    _draws()  # move every generator on

    restore_rng_state(load_training_state(path)["rng_state"])
    assert _draws() == expected


# ------------------------------------------------------------------------------- generic loader
def test_load_state_dict_file_unwraps_common_wrappers(tmp_path):
    state = {"conv.weight": torch.randn(2, 3), "conv.bias": torch.randn(2)}
    for wrapper in ["model", "state_dict"]:
        path = tmp_path / f"{wrapper}.pt"
        torch.save({wrapper: state, "epoch": 3}, path)
        loaded = load_state_dict_file(path)
        assert set(loaded) == set(state) and torch.equal(loaded["conv.weight"], state["conv.weight"])
    plain = tmp_path / "plain.pth"
    torch.save(state, plain)
    assert torch.equal(load_state_dict_file(plain)["conv.bias"], state["conv.bias"])
    not_state = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_state)
    with pytest.raises(InputError, match="list.pth.*no state dict"):
        load_state_dict_file(not_state)
    # A training state written by save_training_state unwraps to its model weights.
    training = tmp_path / "last.pth"
    save_training_state(
        training, model_state=state, optimizer_state=None, scheduler_state=None, scaler_state=None,
        step=0, epoch=0, rng_state={}, extra={},
    )  # fmt: skip
    assert set(load_state_dict_file(training)) == set(state)

"""DistributedDataParallel on CPU with 2 gloo processes.

* Gradients: 2 processes x 2 images give the gradient of one process on the same 4 images, for
  "per_image" and "batch" loss normalisation (the latter divides by the *global* foreground
  count, all-reduced in the criterion).
* Trainer: a 2-process run (2 images each) ends with the weights of a 1-process run with
  batch 4; only rank 0 writes files; a crashed 2-process run resumes bit-identically (each rank
  with its own RNG state); a loss that becomes NaN on one rank stops both ranks.
"""
from __future__ import annotations

import os
import socket
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from fpndet.data.formats.shapes import ShapesDataset
from fpndet.data.loaders import collate_detection
from fpndet.engine.trainer import Trainer
from fpndet.errors import TrainingDiverged
from fpndet.modeling.build import build_model
from fpndet.modeling.config import ModelConfig
from tests.engine.test_trainer import TOTAL_STEPS, SimulatedCrash, tiny_config

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD_SIZE = 2
WORKER_TIMEOUT_S = 150
# float32 sums in a different order (2 + 2 images, then an all-reduce, vs 4 images): measured
# max |g_ddp - g_single| / max |g_single| is ~1.5e-6; without the global foreground count the
# "batch" normalisation is off by ~0.4.
GRADIENT_RTOL = 1e-5


# --------------------------------------------------------------------------------------------
# process helpers
# --------------------------------------------------------------------------------------------
def free_ports(count: int) -> list[int]:
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def spawn(worker, *args) -> None:
    """Run ``worker(rank, *args)`` in WORLD_SIZE fresh processes; fail (killing them) on a hang."""
    context = mp.start_processes(worker, args=args, nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish within {WORKER_TIMEOUT_S} s (a collective hang?)")


def _process_setup(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE))


# --------------------------------------------------------------------------------------------
# gradients: DDP over 2 x 2 images == one process over 4 images
# --------------------------------------------------------------------------------------------
def tiny_model(normalization: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(
        num_classes=4, backbone="resnet18", fpn_channels=32,
        min_size=[128], max_size=128, anchor_sizes=[16.0, 32.0, 64.0, 128.0, 256.0],
        retinanet={"head_channels": 32, "head_depth": 1, "loss_normalization": normalization},
    )
    return build_model(config).train()


def global_batch():
    """4 synthetic 128 px images with 6, 6, 2 and 5 objects: the halves (images 0-1 and 2-3) have
    96 and 49 foreground anchors with :func:`tiny_model`."""
    dataset = ShapesDataset(split="train", num_images=4, image_size=(128, 128), seed=0)
    return collate_detection([dataset[i] for i in range(4)])


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _gradient_worker(rank: int, port: int, out_dir: str) -> None:
    _process_setup(rank, port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        images, targets = global_batch()
        mine = slice(2 * rank, 2 * rank + 2)
        for normalization in ("per_image", "batch"):
            model = tiny_model(normalization)
            ddp = DistributedDataParallel(model)  # keep a reference: its reducer averages in backward
            losses = ddp(images[mine], targets[mine])
            sum(losses.values()).backward()
            result = {"grads": gradients(model), "losses": {k: float(v.detach()) for k, v in losses.items()}}
            torch.save(result, Path(out_dir) / f"{normalization}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_gradients(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp_gradients")
    spawn(_gradient_worker, free_ports(1)[0], str(out))
    return out


def single_process_gradients(normalization: str, images, targets):
    model = tiny_model(normalization)
    losses = model(images, targets)
    sum(losses.values()).backward()
    return gradients(model), {k: float(v.detach()) for k, v in losses.items()}


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of max|a - b| / max|b| (the worst tensor, relative to its own scale)."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-30)) for k in b)


@pytest.mark.parametrize("normalization", ["per_image", "batch"])
def test_ddp_gradient_equals_single_process_gradient_of_the_global_batch(ddp_gradients, normalization):
    images, targets = global_batch()
    assert [len(t["boxes"]) for t in targets] == [6, 6, 2, 5]
    reference, reference_losses = single_process_gradients(normalization, images, targets)
    ranks = [torch.load(ddp_gradients / f"{normalization}_rank{r}.pt") for r in range(WORLD_SIZE)]
    assert len(reference) > 20 and all(float(g.abs().max()) > 0 for g in reference.values())
    # DDP leaves the same averaged gradient on every rank ...
    for name, grad in ranks[0]["grads"].items():
        assert torch.equal(grad, ranks[1]["grads"][name]), name
    # ... and it is the gradient of the global batch
    difference = max_relative_difference(ranks[0]["grads"], reference)
    print(f"\n{normalization}: max relative gradient difference DDP vs single process = {difference:.3g}")
    assert difference < GRADIENT_RTOL
    # the mean of the per-process losses is the global-batch loss
    for key, value in reference_losses.items():
        mean = sum(r["losses"][key] for r in ranks) / WORLD_SIZE
        assert mean == pytest.approx(value, rel=1e-5), key


def test_batch_normalisation_needs_the_global_foreground_count(ddp_gradients):
    """Each half normalised by its own foreground count and then averaged (what DDP would do
    without the all-reduce of the count) is far from the global-batch gradient: this is the
    error the criterion's all-reduce removes, and it is far above GRADIENT_RTOL."""
    images, targets = global_batch()
    reference, _ = single_process_gradients("batch", images, targets)
    halves = [single_process_gradients("batch", images[i : i + 2], targets[i : i + 2])[0] for i in (0, 2)]
    naive = {name: (halves[0][name] + halves[1][name]) / 2 for name in reference}
    error = max_relative_difference(naive, reference)
    print(f"\nbatch normalisation with per-process counts: max relative gradient error = {error:.3g}")
    assert error > 1e3 * GRADIENT_RTOL
    ddp = torch.load(ddp_gradients / "batch_rank0.pt")["grads"]
    assert max_relative_difference(ddp, naive) > 1e3 * GRADIENT_RTOL


# --------------------------------------------------------------------------------------------
# the whole Trainer under 2 processes
# --------------------------------------------------------------------------------------------
def ddp_config(out_dir: Path, *overrides: str):
    return tiny_config(out_dir, "train.batch_size=2", "data.num_workers=0", *overrides)


def _trainer_worker(rank: int, ports: list[int], root: str) -> None:
    root = Path(root)
    result: dict = {}
    state = lambda trainer: {k: v.clone() for k, v in trainer.model.state_dict().items()}  # noqa: E731

    # 1. single scale, so that it matches a 1-process run; rank 1 gets its own output folder,
    #    which must stay absent (rank 1 writes nothing)
    _process_setup(rank, ports[0])
    out = root / ("single_scale" if rank == 0 else "single_scale_rank1")
    trainer = Trainer(ddp_config(out, "model.min_size=[128]"))
    result["steps_per_epoch"], result["lr"] = trainer.steps_per_epoch, trainer.lr
    trainer.fit()  # ends with destroy_process_group
    result["single_scale"] = state(trainer)

    # 2. multi-scale: uninterrupted, then crashed after 3 steps and resumed from step 2
    _process_setup(rank, ports[1])
    trainer = Trainer(ddp_config(root / "multi_uninterrupted"))
    trainer.fit()
    result["multi_uninterrupted"] = state(trainer)
    _process_setup(rank, ports[2])
    cfg = ddp_config(root / "multi_resumed", "train.checkpoint_every_iters=2")
    original_step = Trainer.train_step

    def crashing_step(self, images, targets):
        if self.progress.step == 3:
            raise SimulatedCrash("simulated crash")
        return original_step(self, images, targets)

    Trainer.train_step = crashing_step
    try:
        Trainer(cfg).fit()
    except SimulatedCrash:
        pass
    finally:
        Trainer.train_step = original_step
    resumed = Trainer(cfg, resume=True)  # the process group is still up: it is reused
    result["resumed_from"] = resumed.progress.step
    resumed.fit()
    result["multi_resumed"] = state(resumed)

    # 3. the loss of rank 1 becomes NaN at step 3: both ranks stop
    _process_setup(rank, ports[3])
    trainer = Trainer(ddp_config(root / "diverged", "train.checkpoint_every_iters=2"))
    if rank == 1:
        original_forward, calls = trainer.model.criterion.forward, []

        def poisoned_forward(*args, **kwargs):
            losses = original_forward(*args, **kwargs)
            calls.append(1)
            return {k: v * float("nan") for k, v in losses.items()} if len(calls) == 3 else losses

        trainer.model.criterion.forward = poisoned_forward
    try:
        trainer.fit()
    except TrainingDiverged as error:
        result["diverged"] = str(error)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, root / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ddp_trainer_runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("ddp_trainer")
    spawn(_trainer_worker, free_ports(4), str(root))
    return root, [torch.load(root / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def test_two_process_training_matches_one_process_with_the_same_global_batch(ddp_trainer_runs, tmp_path):
    root, ranks = ddp_trainer_runs
    assert [r["steps_per_epoch"] for r in ranks] == [4, 4]  # 16 images / (2 ranks x 2)
    assert [r["lr"] for r in ranks] == [pytest.approx(0.0025)] * 2  # scaled for the global batch of 4
    for name, tensor in ranks[0]["single_scale"].items():
        assert torch.equal(tensor, ranks[1]["single_scale"][name]), name  # replicas stay in sync

    single = Trainer(tiny_config(tmp_path, "model.min_size=[128]"))  # 1 process, batch 4
    assert single.steps_per_epoch == 4 and single.lr == ranks[0]["lr"]
    single.fit()
    reference, ddp = single.model.state_dict(), ranks[0]["single_scale"]
    initial = Trainer(tiny_config(tmp_path / "init", "model.min_size=[128]")).model.state_dict()
    # The updates are ~1e-5 on weights ~1e-2, so float32 rounding of the weights alone is ~1e-4
    # of an update: allow 1e-4 of the tensor's largest update plus 12 ulps of its largest weight.
    eps = torch.finfo(torch.float32).eps
    worst_update_fraction, worst_ulps, trained = 0.0, 0.0, 0
    for name, weight in reference.items():
        if not weight.is_floating_point():
            continue
        update = (weight - initial[name]).abs().max()
        difference = (ddp[name] - weight).abs().max()
        if update == 0:
            assert torch.equal(ddp[name], weight), name  # frozen parameters stay frozen
            continue
        trained += 1
        assert difference <= 1e-4 * update + 12 * eps * weight.abs().max(), name
        worst_update_fraction = max(worst_update_fraction, float(difference / update))
        worst_ulps = max(worst_ulps, float(difference / (eps * weight.abs().max())))
    assert trained > 20
    print(f"\nweights after {TOTAL_STEPS} steps, 2 processes x 2 images vs 1 process x 4 images: max difference "
          f"{worst_update_fraction:.2g} of a tensor's largest update, {worst_ulps:.2g} ulps of its largest weight")


def test_only_rank_0_writes_files(ddp_trainer_runs):
    root, _ = ddp_trainer_runs
    assert not (root / "single_scale_rank1").exists()
    written = {p.name for p in (root / "single_scale").iterdir()}
    assert {"config.yaml", "last.pth", "last.safetensors", "metrics.jsonl", "curves.png"} <= written
    records = [line for line in (root / "single_scale" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(records) == TOTAL_STEPS  # one record per step, not one per rank


def test_two_process_run_resumes_bit_identically(ddp_trainer_runs):
    root, ranks = ddp_trainer_runs
    for rank, result in enumerate(ranks):
        assert result["resumed_from"] == 2
        for name, tensor in result["multi_uninterrupted"].items():
            assert torch.equal(result["multi_resumed"][name], tensor), (rank, name)
    from fpndet.engine.checkpoints import load_training_state

    saved = load_training_state(root / "multi_resumed" / "last.pth")
    per_rank = saved["extra"]["rng_state_per_rank"]
    assert len(per_rank) == WORLD_SIZE
    assert not torch.equal(per_rank[0]["python"]["state"], per_rank[1]["python"]["state"])


def test_nan_on_one_rank_stops_every_rank(ddp_trainer_runs):
    root, ranks = ddp_trainer_runs
    assert "loss is not finite at step 3 (" in ranks[1]["diverged"] and "on rank 1" in ranks[1]["diverged"]
    assert "the loss of another process is not finite at step 3" in ranks[0]["diverged"]
    for result in ranks:
        assert str(root / "diverged" / "last.pth") in result["diverged"]
    from fpndet.engine.checkpoints import load_training_state

    assert load_training_state(root / "diverged" / "last.pth")["step"] == 2


# --------------------------------------------------------------------------------------------
# a process that dies or hangs is reported by the others, within train.ddp_timeout_s
# --------------------------------------------------------------------------------------------
DDP_TIMEOUT_S = 8


def _failing_worker(rank: int, port: int, root: str, failure: str) -> None:
    from fpndet.engine.distributed import PeerLost

    _process_setup(rank, port)
    trainer = Trainer(ddp_config(Path(root) / "run", f"train.ddp_timeout_s={DDP_TIMEOUT_S}",
                                 "train.checkpoint_every_iters=1"))
    if rank == 1:
        original_step = Trainer.train_step

        def failing_step(self, images, targets):
            if self.progress.step == 2:
                if failure == "dies":
                    os._exit(3)  # no clean-up, as a killed process
                time.sleep(10 * WORKER_TIMEOUT_S)  # alive but silent
            return original_step(self, images, targets)

        Trainer.train_step = failing_step
    start = time.monotonic()
    try:
        trainer.fit()
        outcome = "finished"
    except PeerLost as error:
        outcome = str(error)
    except Exception as error:  # anything else is the failure under test
        outcome = f"unexpected {type(error).__name__}: {error}"
    torch.save({"outcome": outcome, "seconds": time.monotonic() - start}, Path(root) / f"rank{rank}.pt")


@pytest.mark.parametrize("failure", ["dies", "hangs"])
def test_a_process_that_dies_or_hangs_is_reported_by_the_other(tmp_path, failure):
    context = mp.get_context("spawn")
    port = free_ports(1)[0]
    processes = [context.Process(target=_failing_worker, args=(rank, port, str(tmp_path), failure))
                 for rank in range(WORLD_SIZE)]
    for process in processes:
        process.start()
    processes[0].join(timeout=WORKER_TIMEOUT_S)
    rank0_alive = processes[0].is_alive()
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join()
    assert not rank0_alive, "rank 0 waited for the other process past the timeout"
    if failure == "dies":
        assert processes[1].exitcode == 3
    result = torch.load(tmp_path / "rank0.pt")
    assert result["outcome"].startswith(
        f"rank 0: another training process stopped or did not answer within {DDP_TIMEOUT_S} s"), result
    assert "at step 3" in result["outcome"] and str(tmp_path / "run" / "last.pth") in result["outcome"]
    if failure == "hangs":  # only the timeout can end the wait: it is the configured one
        assert DDP_TIMEOUT_S <= result["seconds"] < DDP_TIMEOUT_S + 30, result["seconds"]
    else:
        assert result["seconds"] < DDP_TIMEOUT_S + 30
    from fpndet.engine.checkpoints import load_training_state

    assert load_training_state(tmp_path / "run" / "last.pth")["step"] == 2

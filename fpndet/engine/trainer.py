"""The training loop: data -> model -> losses -> SGD, with warm-up and schedule, optional AMP
and DistributedDataParallel, atomic checkpoints (last and best-by-AP), exact resume, periodic
COCO evaluation, JSONL + TensorBoard logs and PNG curves.

Files in ``train.output_dir``: ``config.yaml`` (resolved config), ``last.pth`` (full training
state, for ``--resume``), ``last.safetensors`` / ``best.safetensors`` (model weights + model
config), ``metrics.jsonl``, ``tb/`` (TensorBoard), ``curves.png``, ``eval/`` (last evaluation).
"""
from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..config import model_config, save_config
from ..data.cache import CachedSamples
from ..data.checks import KeptImages, SkipUnreadable, check_images, format_problems
from ..data.detect import is_shapes_spec, open_dataset
from ..data.loaders import collate_detection
from ..data.transforms import build_train_transforms
from ..errors import InputError, InputWarning, TrainingDiverged
from ..modeling.build import build_model
from ..modeling.weights import load_matching_weights
from . import checkpoints as ckpt
from .anchor_fit import resolve_auto_anchors
from .model_io import read_weights
from .proposals import ProposalFile, WithProposals
from .distributed import (
    DistInfo, all_ranks_true, all_reduce_mean, barrier, cleanup, gather_objects, init_distributed, peer_failure,
)
from .inference import autocast_context, drop_unreadable, evaluate_detections, evaluate_proposals, run_inference
from .sampling import ResumableSampler, SeededAugmentation, aspect_ratio_groups
from .schedule import build_optimizer, build_scheduler, milestones_from, scaled_lr


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    best_ap: float = -1.0
    history: list = field(default_factory=list)
    skipped_images: int = 0  # training samples that failed to decode (another image served instead)
    stop_reason: Optional[str] = None  # set when early stopping ended the run


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def open_datasets(cfg: DictConfig):
    data = cfg.data
    kwargs = {}
    if data.class_names:  # VOC only: an explicit class list
        kwargs["class_names"] = list(data.class_names)
    shapes = dict(image_size=(data.shapes_image_size, data.shapes_image_size))
    train = open_dataset(data.train, split=data.train_split, format=data.format,
                         **_shapes_kwargs(data.train, data.format, shapes, data.shapes_train_images), **kwargs)
    val_spec = data.val or data.train
    val = open_dataset(val_spec, split=data.val_split, format=data.format,
                       **_shapes_kwargs(val_spec, data.format, shapes, data.shapes_val_images), **kwargs)
    return train, val


def _shapes_kwargs(spec: str, format: Optional[str], shapes: dict, num_images: int) -> dict:
    """The data.shapes_* options for a shapes spec ("shapes", "shapes:N": N images in each split
    instead of data.shapes_*_images), nothing for other datasets."""
    return {**shapes, "num_images": num_images} if is_shapes_spec(spec, format) else {}


def check_dataset_images(cfg: DictConfig, train_set, val_set, out: Path, *, verbose: bool = True):
    """The training and validation sets after the image check (:func:`~fpndet.data.checks.
    check_images`, cached in ``out/image_check_<train|val>.json``): unchanged when every image
    passes; with ``data.bad_images=skip`` without the images that fail (each named in a warning).

    Raises:
        InputError: ``data.bad_images=error`` and some image fails (all of them listed); the
        policy itself is checked by :func:`fpndet.config.load_config`.
    """
    policy = cfg.data.bad_images
    checked = []
    for name, dataset, spec in (("train", train_set, cfg.data.train), ("val", val_set, cfg.data.val or cfg.data.train)):
        start = time.perf_counter()
        problems = check_images(dataset, cache_file=out / f"image_check_{name}.json")
        if verbose:
            print(f"image check ({name}): {len(dataset)} images, {len(problems)} failed, "
                  f"{time.perf_counter() - start:.1f} s (data.bad_images={policy})", flush=True)
        if problems and policy == "error":
            raise InputError(spec, f"{format_problems(problems, len(dataset))}\nfix or remove them, or set "
                             "data.bad_images=skip to train without them")
        if problems:
            for problem in problems:
                warnings.warn(InputWarning(problem.file, f"{problem.problem}; left out ({name} set)",
                                           kind="images that failed the check left out"))
            bad = {problem.index for problem in problems}
            dataset = KeptImages(dataset, [i for i in range(len(dataset)) if i not in bad])
        checked.append(dataset)
    return checked[0], checked[1]


def open_proposal_files(cfg: DictConfig, train_set, val_set) -> tuple[Optional[ProposalFile], Optional[ProposalFile]]:
    """The training and validation proposal files of a ``model.arch=fast_rcnn`` run, checked
    against the datasets; ``(None, None)`` for the other architectures.

    Raises:
        InputError: fast_rcnn without both files, the files set for another architecture, or a
        file that does not match its dataset (named).
    """
    data = cfg.data
    if cfg.model.arch != "fast_rcnn":
        given = [key for key in ("train_proposals", "val_proposals") if data[key]]
        if given:
            raise InputError(data[given[0]], f"data.{given[0]} is read by model.arch=fast_rcnn only "
                             f"(this run trains model.arch={cfg.model.arch}, which makes its own proposals)")
        return None, None
    if not (data.train_proposals and data.val_proposals):
        raise InputError(None, "model.arch=fast_rcnn trains on fixed proposals: set data.train_proposals and "
                         "data.val_proposals to files written by `fpndet proposals --weights RPN_RUN --data ...` "
                         "(or train model.arch=faster_rcnn, which makes its own)")
    train_proposals, val_proposals = ProposalFile(data.train_proposals), ProposalFile(data.val_proposals)
    train_proposals.check_covers(train_set)
    val_proposals.check_covers(val_set, max_images=cfg.eval.max_images)
    return train_proposals, val_proposals


def make_train_loader(dataset, cfg: DictConfig, info: DistInfo, proposals: Optional[ProposalFile] = None,
                      ) -> tuple[DataLoader, ResumableSampler, SeededAugmentation]:
    """The training loader; with ``proposals`` each target carries its image's proposals, moved
    by the augmentation with the image."""
    data = cfg.data
    transforms = build_train_transforms(hflip_prob=data.hflip_prob, color_jitter=data.color_jitter)
    dataset.transforms = None
    source = SkipUnreadable(dataset)
    source = CachedSamples(source) if data.cache_images else source
    if proposals is not None:
        source = WithProposals(source, proposals)
    augmented = SeededAugmentation(source, transforms, seed=cfg.train.seed)
    groups = aspect_ratio_groups(dataset) if data.group_aspect_ratio else None
    sampler = ResumableSampler(num_items=len(dataset), batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                               rank=info.rank, world_size=info.world_size, groups=groups)
    if sampler.batches_per_epoch() == 0:
        raise InputError(data.train, f"{len(dataset)} images are fewer than one batch of {cfg.train.batch_size}")
    loader = DataLoader(augmented, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=data.num_workers,
                        collate_fn=collate_detection, drop_last=True,
                        pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_threads)
    return loader, sampler, augmented


def _worker_threads(_: int) -> None:
    torch.set_num_threads(1)


def build_ema(model: torch.nn.Module, cfg: DictConfig):
    """timm's ``ModelEmaV3`` of ``model`` with decay warm-up: at step t the decay is
    ``min(train.ema_decay, 1 - (1 + t) ** -train.ema_warmup_power)`` (0.981 after 200 steps,
    0.9968 after 2000 at power 0.75), so short fine-tuning runs average over their last tens
    of steps and long runs approach ``ema_decay``. Parameters and buffers are averaged (integer
    buffers copied)."""
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.train.ema_decay, use_warmup=True, warmup_power=cfg.train.ema_warmup_power)


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


class Trainer:
    """Args: cfg: the resolved experiment config; resume: continue from ``output_dir/last.pth``."""

    def __init__(self, cfg: DictConfig, *, resume: bool = False):
        self.cfg = cfg
        self.out = Path(cfg.train.output_dir)
        self.device = resolve_device(cfg.train.device)
        self.info = init_distributed(self.device.type, timeout_s=cfg.train.ddp_timeout_s)
        if self.device.type == "cuda" and self.info.enabled:
            self.device = torch.device("cuda", self.info.local_rank)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        if cfg.train.patience is not None and cfg.train.patience < 1:
            raise InputError(None, f"train.patience={cfg.train.patience}: expected a number of evaluations >= 1, "
                             "or null to never stop early")
        seed_everything(cfg.train.seed + self.info.rank)

        self.train_set, self.val_set = check_dataset_images(cfg, *open_datasets(cfg), self.out,
                                                            verbose=self.info.is_main)
        self.train_proposals, self.val_proposals = open_proposal_files(cfg, self.train_set, self.val_set)
        resolve_auto_anchors(cfg, self.train_set, verbose=self.info.is_main,
                             saved_config=(self.out / "config.yaml") if resume else None)
        cfg.model.num_classes = self.train_set.num_classes
        self.model_cfg = model_config(cfg)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.model = build_model(self.model_cfg).to(self.device)
        if cfg.train.init_weights and not resume:
            self._load_init_weights(cfg.train.init_weights)

        self.loader, self.sampler, self.augmented = make_train_loader(self.train_set, cfg, self.info,
                                                                          self.train_proposals)
        steps_per_epoch = self.sampler.batches_per_epoch()
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = cfg.train.max_iters or steps_per_epoch * cfg.train.epochs
        total_batch = cfg.train.batch_size * self.info.world_size
        self.lr = scaled_lr(cfg.train.base_lr, cfg.train.base_batch, total_batch)
        self.optimizer = build_optimizer(self.model, name=cfg.train.optimizer, lr=self.lr,
                                         momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)
        self.scheduler = build_scheduler(
            self.optimizer, total_steps=self.total_steps, warmup_steps=min(cfg.train.warmup_iters, self.total_steps // 2),
            warmup_factor=cfg.train.warmup_factor, schedule=cfg.train.schedule,
            milestones=milestones_from(cfg.train.lr_steps, self.total_steps), gamma=cfg.train.lr_gamma,
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp == "fp16" and self.device.type == "cuda")
        self.ddp = (DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
                    if self.info.enabled else self.model)
        self.ema = build_ema(self.model, cfg) if cfg.train.ema else None
        self.progress = Progress()
        if self.info.is_main and self.out.is_dir():
            ckpt.remove_stale_temporaries(self.out)  # of a process killed while writing a checkpoint
        if resume:
            self._resume()

    # ----------------------------------------------------------------------------- checkpoints
    def _load_init_weights(self, path: str) -> None:
        state = read_weights(path)
        report = load_matching_weights(self.model, state)
        if self.info.is_main:
            print(f"init weights {path}: {report.summary()}")

    def _resume(self) -> None:
        path = self.out / "last.pth"
        if not path.exists():
            raise InputError(path, "no checkpoint to resume from")
        state = ckpt.load_training_state(path)
        self.model.load_state_dict(state["model_state"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.scheduler.load_state_dict(state["scheduler_state"])
        if state.get("scaler_state"):
            self.scaler.load_state_dict(state["scaler_state"])
        extra = state.get("extra", {})
        self.progress = Progress(step=int(state["step"]), epoch=int(state["epoch"]),
                                 best_ap=float(extra.get("best_ap", -1.0)), history=list(extra.get("history", [])),
                                 skipped_images=int(extra.get("skipped_images", 0)),
                                 stop_reason=extra.get("stop_reason"))
        if self.ema is not None:
            if "ema_state" not in state:
                raise InputError(path, "this run was trained without train.ema; resume it with train.ema=false")
            self.ema.module.load_state_dict(state["ema_state"])
        per_rank = extra.get("rng_state_per_rank")
        same_world = isinstance(per_rank, list) and len(per_rank) == self.info.world_size
        ckpt.restore_rng_state(per_rank[self.info.rank] if same_world else state["rng_state"])
        if self.info.is_main:
            print(f"resumed from {path} at step {self.progress.step}")

    def save_checkpoint(self) -> None:
        """Write ``last.pth`` and ``last.safetensors`` (rank 0). Every process must call it: the
        RNG states of all processes are gathered so that each one resumes with its own."""
        rng_states = gather_objects(ckpt.capture_rng_state(), self.info)
        if not self.info.is_main:
            return
        extra = {"best_ap": self.progress.best_ap, "history": self.progress.history,
                 "skipped_images": self.progress.skipped_images, "stop_reason": self.progress.stop_reason}
        if self.info.enabled:
            extra["rng_state_per_rank"] = rng_states
        self.out.mkdir(parents=True, exist_ok=True)
        model_state = _cpu_state(self.model)
        ema_state = _cpu_state(self.ema.module) if self.ema is not None else None
        ckpt.save_training_state(
            self.out / "last.pth", model_state=model_state, optimizer_state=self.optimizer.state_dict(),
            scheduler_state=self.scheduler.state_dict(), scaler_state=self.scaler.state_dict(),
            step=self.progress.step, epoch=self.progress.epoch, rng_state=rng_states[0], extra=extra,
            **({"ema_state": ema_state} if ema_state is not None else {}),
        )
        ckpt.save_model_weights(self.out / "last.safetensors", ema_state or model_state, config=self.model_cfg.to_dict(),
                                metadata={"step": self.progress.step, "class_names": self.train_set.class_names,
                                          "ema": self.ema is not None})

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights evaluated and saved as ``*.safetensors``: the EMA when ``train.ema``."""
        return self.ema.module if self.ema is not None else self.model

    # ----------------------------------------------------------------------------- loop
    def train_step(self, images, targets) -> dict[str, float]:
        images = [img.to(self.device, non_blocking=True) for img in images]
        targets = [{k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        given = {"proposals": [t.pop("proposals") for t in targets]} if self.train_proposals is not None else {}
        self._report_skipped([problem for t in targets for problem in t.pop("skipped", [])])
        with autocast_context(self.device, self.cfg.train.amp):
            losses = self.ddp(images, targets, **given)
        loss = sum(losses.values())
        # Decided together: a process that stopped alone would leave the others waiting in backward.
        if not all_ranks_true(bool(torch.isfinite(loss)), self.info):
            raise TrainingDiverged(self._divergence_message(loss, losses))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.train.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.progress.step + 1)
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()}}

    def _report_skipped(self, problems: list[str]) -> None:
        """Warn about images that failed to decode in this batch (another image took their
        place) and count them: ``skipped_images`` in the training records of metrics.jsonl."""
        for problem in problems:
            warnings.warn(InputWarning(None, f"{problem}; skipped, the next image used in its place",
                                       kind="images that failed to decode skipped in training"))
        self.progress.skipped_images += len(problems)

    def _divergence_message(self, loss: torch.Tensor, losses: dict[str, torch.Tensor]) -> str:
        step, last = self.progress.step + 1, self.out / "last.pth"
        if math.isfinite(float(loss.detach())):
            what = f"the loss of another process is not finite at step {step}"
        else:
            where = f" on rank {self.info.rank}" if self.info.enabled else ""
            parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
            what = f"loss is not finite at step {step} ({parts}{where})"
        return f"{what}; " + (f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet")

    def evaluate(self, tag: str = "eval") -> dict:
        """Evaluate on the validation set: COCO metrics of the detections, or for an RPN the
        class-agnostic proposal recall (AR@100, AR@1000, ...)."""
        proposals_only = self.model_cfg.arch == "rpn"
        # The losses of a two-stage model sample anchors and RoIs: from a fixed seed, without
        # touching the training's random state.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.cfg.train.seed)
            found = run_inference(self.eval_model, self.val_set, batch_size=self.cfg.eval.batch_size,
                                  device=self.device, amp=self.cfg.train.amp, max_images=self.cfg.eval.max_images,
                                  score_thresh=None if proposals_only else self.cfg.eval.score_thresh,
                                  proposals=self.val_proposals, skip_unreadable=True, with_losses=self.cfg.eval.loss)
        detections, gts = found[:2]
        val_set, detections, gts = drop_unreadable(self.val_set, detections, gts)
        if proposals_only:
            report = evaluate_proposals(val_set, detections, out_dir=self.out / tag)
        else:
            report = evaluate_detections(val_set, detections, gts, out_dir=self.out / tag,
                                         model_class_names=self.train_set.class_names,
                                         diagnostics=self.cfg.eval.diagnostics,
                                         diagnostics_thresh=self.cfg.eval.diagnostics_thresh)
        if self.cfg.eval.loss:
            report["val_losses"] = {f"val_{k}": v for k, v in found[2].items()}
        return report

    def fit(self) -> dict:
        cfg, info = self.cfg, self.info
        logger = MetricLogger(self.out, enabled=info.is_main)
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        bar = _progress_bar(self.total_steps, self.progress.step, enabled=info.is_main)
        last_eval: dict = {}
        if self.progress.stop_reason and info.is_main:
            print(f"this run already stopped early: {self.progress.stop_reason}")
        try:
            while self.progress.step < self.total_steps and not self.progress.stop_reason:
                epoch = self.progress.step // self.steps_per_epoch
                start_batch = self.progress.step % self.steps_per_epoch
                self.progress.epoch = epoch
                self.sampler.set_epoch(epoch, start_batch)
                self.augmented.epoch = epoch
                self.model.train()
                tic = time.perf_counter()
                for images, targets in self.loader:
                    lr = self.optimizer.param_groups[0]["lr"]  # the lr this step uses
                    logs = self.train_step(images, targets)
                    self.progress.step += 1
                    elapsed, tic = time.perf_counter() - tic, time.perf_counter()
                    logs["lr"] = lr
                    logs["skipped_images"] = self.progress.skipped_images
                    logs["images_per_s"] = len(images) * info.world_size / max(elapsed, 1e-9)
                    if self.progress.step % cfg.train.log_every == 0 or self.progress.step == self.total_steps:
                        logger.log({"step": self.progress.step, "epoch": epoch, **all_reduce_mean(logs, info)})
                    bar.update(1)
                    bar.set_postfix(refresh=False, lr=f"{logs['lr']:.2e}", ips=f"{logs['images_per_s']:.1f}",
                                    **{k.removeprefix("loss_") or k: f"{v:.3f}" for k, v in logs.items()
                                       if k.startswith("loss")})
                    every = cfg.train.checkpoint_every_iters
                    if every and self.progress.step % every == 0:
                        self.save_checkpoint()
                    if self.progress.step >= self.total_steps:
                        break
                epoch_done = self.progress.step % self.steps_per_epoch == 0 or self.progress.step >= self.total_steps
                if epoch_done:
                    finished_epochs = -(-self.progress.step // self.steps_per_epoch)
                    if (finished_epochs % cfg.train.eval_every_epochs == 0 or self.progress.step >= self.total_steps):
                        last_eval = self._evaluate_and_keep_best(logger, finished_epochs)
                        self._check_patience(logger, finished_epochs)
                    self.save_checkpoint()
                    barrier(info)
        except RuntimeError as error:
            lost = peer_failure(error, info, step=self.progress.step + 1, timeout_s=cfg.train.ddp_timeout_s,
                                checkpoint=self.out / "last.pth")
            if lost is None:
                raise
            raise lost from error
        finally:
            bar.close()
            logger.close()
        if info.is_main:
            from .plots import plot_training_curves

            plot_training_curves(self.out / "metrics.jsonl", self.out / "curves.png")
        cleanup(info)
        return last_eval

    def _evaluate_and_keep_best(self, logger: "MetricLogger", epoch: int) -> dict:
        if not self.info.is_main:
            return {}
        report = self.evaluate()
        metrics = report["metrics"]
        val_losses = report.get("val_losses", {})
        logger.log({"step": self.progress.step, "epoch": epoch, **metrics, **val_losses})
        key, second = ("AR1000", "AR100") if self.model_cfg.arch == "rpn" else ("AP", "AP50")
        loss_text = f"  val loss {val_losses['val_loss']:.4f}" if "val_loss" in val_losses else ""
        print(f"\nepoch {epoch} step {self.progress.step}: {key} {metrics[key]:.4f}  {second} {metrics[second]:.4f}"
              f"{loss_text}", flush=True)
        self.progress.history.append({"step": self.progress.step, key: metrics[key], second: metrics[second],
                                      **val_losses})
        if metrics[key] > self.progress.best_ap:  # the best AP (AR@1000 for an RPN) so far
            self.progress.best_ap = metrics[key]
            ckpt.save_model_weights(self.out / "best.safetensors", _cpu_state(self.eval_model),
                                    config=self.model_cfg.to_dict(),
                                    metadata={"step": self.progress.step, key: metrics[key],
                                              "class_names": self.train_set.class_names, "ema": self.ema is not None})
        return report

    def _check_patience(self, logger: "MetricLogger", epoch: int) -> None:
        """Early stopping (``train.patience``): decided on rank 0 from the evaluation history,
        shared with every process; the reason is printed, logged and kept in the checkpoint."""
        patience = self.cfg.train.patience
        if patience is None:
            return
        reason = stale_evaluations_reason(self.progress.history, patience) if self.info.is_main else None
        if all_ranks_true(reason is None, self.info):
            return
        self.progress.stop_reason = reason or "early stopping on rank 0"
        if self.info.is_main:
            print(f"\nstopping early at epoch {epoch}: {reason}", flush=True)
            logger.log({"step": self.progress.step, "epoch": epoch, "stopped": reason})


def stale_evaluations_reason(history: list[dict], patience: int) -> Optional[str]:
    """Why to stop, or None: the last ``patience`` evaluations of ``history`` (records with the
    metric under "AP", or "AR1000" for an RPN) brought no new best value. The first evaluation
    always counts as an improvement."""
    key = "AR1000" if history and "AR1000" in history[0] else "AP"
    values = [record[key] for record in history]
    best_at = max(range(len(values)), key=lambda i: (values[i], -i)) if values else 0
    stale = len(values) - 1 - best_at
    if stale < patience:
        return None
    return (f"{key} has not improved for {stale} evaluations (train.patience={patience}); best {values[best_at]:.4f} "
            f"at step {history[best_at]['step']}")


def _progress_bar(total: int, initial: int, *, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="it", dynamic_ncols=True)


class MetricLogger:
    """Appends one JSON line per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, out: Path, *, enabled: bool):
        self.enabled = enabled
        self.start = time.perf_counter()
        self.writer = None
        if enabled:
            out.mkdir(parents=True, exist_ok=True)
            _drop_partial_last_line(out / "metrics.jsonl")
            self.file = open(out / "metrics.jsonl", "a")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tb"))
            except Exception:  # tensorboard missing: JSONL only
                self.writer = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        import json

        clean = {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in record.items()}
        clean["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in clean.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, clean["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def _drop_partial_last_line(path: Path) -> None:
    """Cut a line that a killed process left unfinished at the end of a JSONL file."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def train(cfg: DictConfig, *, resume: bool = False) -> dict:
    """Train as configured; returns the last evaluation report (rank 0)."""
    return Trainer(cfg, resume=resume).fit()


def draw_validation_predictions(cfg: DictConfig, out: Path, *, count: int = 8, score_thresh: float = 0.3) -> Path:
    """Annotated copies of the first ``count`` validation images (detections of the best model in
    colour, ground truth in white) in ``out/predictions/``, plus ``grid.png``. Returns the folder."""
    from .model_io import load_detector
    from .plots import draw_detections, save_image_grid

    model, class_names = load_detector(out, overrides={"score_thresh": score_thresh})
    _, val = open_datasets(cfg)
    proposals = ProposalFile(cfg.data.val_proposals) if cfg.model.arch == "fast_rcnn" else None
    folder = out / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    pictures = []
    with torch.no_grad():
        for index in range(min(count, len(val))):
            try:
                image, target = val[index]
            except InputError:  # an unreadable image was reported during training
                continue
            given = {} if proposals is None else {"proposals": [proposals.get(target["image_id"])]}
            det = model([image.float() / 255], **given)[0]
            pictures.append(draw_detections(
                image, det["boxes"], det["labels"], det["scores"], class_names,
                out_path=folder / f"{index:03d}.jpg",
                extra_boxes={"boxes": torch.as_tensor(target["boxes"]), "labels": target["labels"]},
            ))
    if pictures:
        save_image_grid(pictures, folder / "grid.png", columns=4)
    return folder

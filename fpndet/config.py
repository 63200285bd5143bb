"""Experiment configuration: OmegaConf structured configs over dataclasses.

An experiment is ``{model, data, train, eval}``. YAML files in ``fpndet/configs/`` (or any path)
are merged over these defaults, then dotted command-line overrides (``model.backbone=resnet18
train.batch_size=4``). Unknown keys and wrong types are rejected by OmegaConf with the key named.
The resolved config is saved as ``config.yaml`` beside the checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import InputError
from .modeling.config import NAMED_CONFIGS, ModelConfig, RetinaNetConfig, rpn_r50_fpn

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    """Where the images come from. ``train``/``val``: a dataset spec ("shapes", a COCO instances
    JSON, a VOC root, a YOLO data YAML); ``*_split``: split names for VOC/YOLO/shapes."""

    train: str = "shapes"
    val: Optional[str] = None  # defaults to ``train`` with ``val_split``
    train_split: str = "train"
    val_split: str = "val"
    format: Optional[str] = None  # force "shapes" | "coco" | "voc" | "yolo"
    class_names: Optional[List[str]] = None  # VOC: explicit class list
    # The synthetic shapes dataset ("shapes", or "shapes:N" for N images in each split).
    shapes_train_images: int = 2000
    shapes_val_images: int = 200
    shapes_image_size: int = 320
    num_workers: int = 2
    hflip_prob: float = 0.5
    # Multi-scale training is model.min_size with several short sides (the model draws one per
    # image where it resizes; evaluation uses the last), e.g. model.min_size=[640,672,704,736,768,800].
    color_jitter: bool = False
    cache_images: bool = False  # decode every training image once and keep it in memory (validation: not cached)
    # Batches of landscape images and batches of portrait images (where the counts allow), so the
    # two do not pad each other to squares (engine/sampling.py: aspect_ratio_groups).
    group_aspect_ratio: bool = True
    # Images whose header cannot be read, or whose size contradicts the annotation, found by the
    # check before training: "error" stops there listing them all, "skip" trains without them.
    # (An image that fails to decode later is always skipped, with a warning, and counted.)
    bad_images: str = "error"
    # model.arch=fast_rcnn only: proposal files written by `fpndet proposals` for the training and
    # validation images (the FPN paper's Table 2 setting: Fast R-CNN on a fixed set of RPN proposals).
    train_proposals: Optional[str] = None
    val_proposals: Optional[str] = None


@dataclass
class TrainConfig:
    """Optimisation. ``base_lr`` is for ``base_batch`` images; the lr is scaled linearly with the
    total batch (0.01 per 16 images, paper §4 "Optimization")."""

    output_dir: str = "runs/exp"
    epochs: Optional[int] = 12
    max_iters: Optional[int] = None  # overrides epochs when set
    batch_size: int = 8  # per process
    optimizer: str = "sgd"  # "sgd" | "adamw"
    base_lr: float = 0.01
    base_batch: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500  # linear warm-up steps, at most half of the run's steps
    warmup_factor: float = 0.001
    schedule: str = "cosine"  # "cosine" | "step"
    lr_steps: List[float] = field(default_factory=lambda: [2 / 3, 8 / 9])  # fractions of max_iters, or iterations when > 1
    lr_gamma: float = 0.1
    clip_grad_norm: Optional[float] = None
    amp: str = "none"  # "none" | "bf16" | "fp16" (autocast on CUDA; fp16 with loss scaling)
    device: str = "auto"
    seed: int = 0
    log_every: int = 20
    eval_every_epochs: int = 1
    checkpoint_every_iters: int = 0  # 0: once per epoch
    num_threads: Optional[int] = None  # torch CPU threads
    init_weights: Optional[str] = None  # a fpndet checkpoint / torchvision .pth to start from
    ddp_timeout_s: float = 600.0  # torchrun runs: a process dead or silent this long stops the others
    # Weight EMA (timm's ModelEmaV3 with decay warm-up: decay_t = min(ema_decay, 1 - (1 + t)^-ema_warmup_power)):
    # evaluated, and saved as last/best.safetensors, in place of the raw weights; last.pth keeps both.
    ema: bool = False
    ema_decay: float = 0.9998
    ema_warmup_power: float = 0.75
    # Early stopping: stop after this many evaluations in a row without a new best AP (AR@1000 for
    # an RPN); None: never.
    patience: Optional[int] = None


@dataclass
class EvalConfig:
    """The trainer's evaluations on the validation set (``fpndet eval`` has its own options).

    ``score_thresh``: the post-processor's minimum score while evaluating (the model keeps its
    own ``model.score_thresh`` for prediction and in its checkpoint); None: the model's. 0.05 as
    in the paper (§4.1), torchvision (``score_thresh``) and detectron2 (``SCORE_THRESH_TEST``):
    COCO AP integrates precision over all recall levels and wants low-scoring detections too.
    ``max_images``: evaluate on the first N validation images only.
    """

    batch_size: int = 8
    score_thresh: Optional[float] = 0.05
    max_images: Optional[int] = None
    loss: bool = True  # also compute the validation loss (same pass as the detections) and log it
    # eval/ diagnostics (confusion matrix, per-class PR curves and size table, worst errors) at
    # this score threshold (null: fpndet.engine.diagnostics.DEFAULT_SCORE_THRESH, 0.3 as predict);
    # false: none written.
    diagnostics: bool = True
    diagnostics_thresh: Optional[float] = None


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def named_config_path(name: str) -> Path:
    return CONFIG_DIR / f"{name}.yaml"


def load_config(path_or_name: Optional[str] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults <- YAML file (a path or the name of a config in ``fpndet/configs``) <- overrides.

    A YAML may set ``model.preset: <named model config>`` to start the model section from
    :data:`fpndet.modeling.config.NAMED_CONFIGS`. A layer (the YAML, or the overrides) that
    changes ``model.arch`` between RetinaNet and the two-stage family without a preset also takes
    that family's pyramid and anchors for the fields it does not set (:data:`PYRAMID_FIELDS`).
    Raises :class:`InputError` naming the file or the override at fault, also for a word option
    outside its choices (:data:`CHOICES`).
    """
    schema = OmegaConf.structured(ExperimentConfig)
    layers: list[Any] = []
    source = "command line"
    if path_or_name:
        path = Path(path_or_name)
        if not path.exists():
            path = named_config_path(path_or_name)
        if not path.exists():
            known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            raise InputError(path_or_name, f"no such config file or named config (named: {known})")
        source = str(path)
        try:
            layers.append(OmegaConf.load(path))
        except Exception as err:  # yaml errors come in several types
            raise InputError(path, f"cannot parse config: {err}") from None
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    except Exception as err:
        raise InputError(None, f"bad override {list(overrides)}: {err}") from None
    try:
        merged = schema
        for layer in layers:
            _reject_removed_keys(layer, source)
            auto = _pop_auto_anchors(layer)
            _apply_arch_pyramid(layer, merged.model.arch)
            layer = _apply_model_preset(layer)
            merged = OmegaConf.merge(merged, layer)
            for key in auto:  # the marker: a missing value (merging "???" would keep the old one)
                merged.model[key] = MISSING
    except OmegaConfBaseException as err:
        raise InputError(source, f"invalid config: {err}".splitlines()[0]) from None
    try:
        model_config(merged, reference_anchors=True)
    except ValueError as err:
        raise InputError(source, str(err)) from None
    _check_choices(merged, source)
    return merged


# Options of the train/data/eval sections that take one of a few words (the model's are checked
# by ModelConfig.validate).
CHOICES = {
    ("train", "amp"): ("none", "bf16", "fp16"),
    ("train", "optimizer"): ("sgd", "adamw"),
    ("train", "schedule"): ("cosine", "step"),
    ("data", "bad_images"): ("error", "skip"),
    ("data", "format"): (None, "shapes", "coco", "voc", "yolo"),
}


def _check_choices(cfg: DictConfig, source: str) -> None:
    """InputError naming the first option of :data:`CHOICES` set to something else."""
    for (section, key), allowed in CHOICES.items():
        value = cfg[section][key]
        if value not in allowed:
            raise InputError(source, f"{section}.{key}={value!r}: expected one of {', '.join(map(str, allowed))}")


REMOVED_KEYS = {
    "scale_range": "data.scale_range was removed (the model resized every image back to model.min_size, so it "
    "did nothing): list several short sides in model.min_size instead, e.g. model.min_size=[640,672,704,736,768,800]; "
    "the model draws one per training image and evaluates at the last",
}


def _reject_removed_keys(layer: DictConfig, source: str) -> None:
    """Removed and moved keys get a message saying what replaces them (OmegaConf would only say
    that the key is unknown)."""
    data = layer.get("data") if isinstance(layer, DictConfig) else None
    for key, message in REMOVED_KEYS.items():
        if data is not None and key in data:
            raise InputError(source, message)
    model = layer.get("model") if isinstance(layer, DictConfig) else None
    moved = sorted(set(model or ()) & set(RetinaNetConfig.__dataclass_fields__))
    if moved:
        raise InputError(source, f"model.{moved[0]} moved to model.retinanet.{moved[0]} (the RetinaNet section; "
                         "two-stage settings are in model.rpn and model.roi_heads)")


# The pyramid and anchors each family of architectures is defined with: RetinaNet P3-P7 with a
# conv top block and 3 scales x 3 ratios of 32-512 px (Focal Loss paper §4); the two-stage
# detectors P2-P6 with P6 = P5 subsampled and one size x 3 ratios (FPN paper §4.1).
PYRAMID_FIELDS = ("min_level", "max_level", "fpn_top_block", "anchor_sizes", "anchor_scales")


def _pyramid_of(arch: str) -> dict[str, Any]:
    reference = ModelConfig() if arch == "retinanet" else rpn_r50_fpn()
    return {key: getattr(reference, key) for key in PYRAMID_FIELDS}


def _apply_arch_pyramid(layer: DictConfig, current_arch: str) -> None:
    """A layer that switches ``model.arch`` between RetinaNet and the two-stage family without a
    ``model.preset`` also switches the pyramid and anchors (:data:`PYRAMID_FIELDS`) to the new
    family's paper values, unless the layer sets them itself (in place): ``model.arch=faster_rcnn``
    alone builds the FPN paper's Faster R-CNN on P2-P6, not a two-stage model on RetinaNet's P3-P7."""
    model = layer.get("model") if isinstance(layer, DictConfig) else None
    if not isinstance(model, DictConfig) or "arch" not in model or "preset" in model:
        return
    if (model.arch == "retinanet") == (current_arch == "retinanet"):
        return
    for key, value in _pyramid_of(model.arch).items():
        if key not in model:
            model[key] = value


def _apply_model_preset(layer: DictConfig) -> DictConfig:
    model = layer.get("model") if isinstance(layer, DictConfig) else None
    if model is None or "preset" not in model:
        return layer
    preset = model.pop("preset")
    if preset not in NAMED_CONFIGS:
        raise InputError(None, f"unknown model preset {preset!r}; known: {sorted(NAMED_CONFIGS)}")
    base = OmegaConf.structured(NAMED_CONFIGS[preset]())
    layer.model = OmegaConf.merge(base, model)
    return layer


# ``model.anchor_sizes=auto`` / ``model.anchor_ratios=auto`` (on the command line or in a YAML):
# fitted to the training boxes when training starts (fpndet.engine.anchor_fit.resolve_auto_anchors),
# which writes the numbers into the config, hence into the run's config.yaml. Until then the field
# is missing ("???" in OmegaConf), so nothing can build a model from it by mistake.
AUTO = "auto"
AUTO_ANCHOR_FIELDS = ("anchor_sizes", "anchor_ratios")


def _pop_auto_anchors(layer: Any) -> list[str]:
    """Remove the ``auto`` anchor fields from a config layer; returns their names."""
    model = layer.get("model") if isinstance(layer, DictConfig) else None
    if not isinstance(model, DictConfig):
        return []
    auto = [key for key in AUTO_ANCHOR_FIELDS
            if key in model and isinstance(model[key], str) and model[key].strip().lower() == AUTO]
    for key in auto:
        model.pop(key)
    return auto


def auto_anchor_fields(cfg: DictConfig) -> list[str]:
    """The fields of ``cfg.model`` still ``auto`` (of ``anchor_sizes``, ``anchor_ratios``)."""
    return [key for key in AUTO_ANCHOR_FIELDS if OmegaConf.is_missing(cfg.model, key)]


def set_fitted_anchors(cfg: DictConfig, *, anchor_sizes: Optional[Sequence[float]] = None,
                       anchor_ratios: Optional[Sequence[float]] = None) -> None:
    """Write fitted anchor numbers into ``cfg.model`` (in place), replacing ``auto``."""
    if anchor_sizes is not None:
        cfg.model.anchor_sizes = [float(v) for v in anchor_sizes]
    if anchor_ratios is not None:
        cfg.model.anchor_ratios = [float(v) for v in anchor_ratios]


def reference_anchor_values(cfg: DictConfig) -> dict[str, list[float]]:
    """What the ``auto`` fields of ``cfg.model`` start from: the papers' anchors on levels
    min_level..max_level, sizes 32 * 2^(l-3) for RetinaNet (32 px on P3, Focal Loss paper §4) and
    32 * 2^(l-2) for the two-stage detectors (32 px on P2, FPN paper §4.1); ratios 1/2, 1, 2."""
    from .modeling.anchors import default_anchor_sizes

    base_level = 3 if cfg.model.arch == "retinanet" else 2
    values = {"anchor_sizes": default_anchor_sizes(cfg.model.min_level, cfg.model.max_level, base_level=base_level),
              "anchor_ratios": list(ModelConfig().anchor_ratios)}
    return {key: values[key] for key in auto_anchor_fields(cfg)}


def model_config(cfg: DictConfig, *, reference_anchors: bool = False) -> ModelConfig:
    """The :class:`ModelConfig` of ``cfg.model``.

    Fields still ``auto`` take the paper's anchors with ``reference_anchors=True``
    (:func:`reference_anchor_values`); otherwise they raise :class:`InputError` (they are
    fitted by ``fpndet train`` before the model is built, or printed by ``fpndet inspect
    --suggest-anchors``).
    """
    values = OmegaConf.to_container(cfg.model, resolve=True)
    auto = auto_anchor_fields(cfg)
    if auto and not reference_anchors:
        raise InputError(None, " and ".join(f"model.{key}=auto" for key in auto) + " is fitted to the training "
                         "boxes when `fpndet train` starts; here give numbers (`fpndet inspect --data ... "
                         "--suggest-anchors` prints them)")
    if auto:
        values.update(reference_anchor_values(cfg))
    return ModelConfig.from_dict(values)


def save_config(cfg: DictConfig, path: Path) -> None:
    path.write_text(OmegaConf.to_yaml(cfg))

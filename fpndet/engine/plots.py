"""Plots and annotated images: training curves, precision-recall curves, drawn detections.

Figures are drawn with matplotlib's object API on the Agg canvas (no display, no pyplot global
state, safe in worker threads). Images are drawn with Pillow. Every PNG is written atomically.
Boxes are ``(x1, y1, x2, y2)`` in absolute pixels.
"""
from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from fpndet.engine.checkpoints import atomic_write_bytes
from fpndet.errors import InputError

# Distinct colours for classes (class index modulo the palette length).
PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
]  # fmt: skip
EXTRA_BOX_COLOR = (255, 255, 255)
_EVAL_KEYS = ("AP", "AP50", "AP75", "mAP50", "AR100", "AR1000")
_FIGURE_DPI = 100


def _save_figure(figure: Figure, out_png: str | os.PathLike) -> None:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_FIGURE_DPI)
    atomic_write_bytes(out_png, buffer.getvalue())


def _save_image(image: Image.Image, out_png: str | os.PathLike) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(out_png, buffer.getvalue())


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------
def read_metrics_jsonl(jsonl_path: str | os.PathLike) -> list[dict]:
    """Read a metrics JSONL file: one JSON object per line; blank lines skipped.

    A malformed *last* line (a write cut short by a crash) is skipped.

    Raises:
        InputError: the file is missing, or a line before the last is not a JSON object.
    """
    path = Path(jsonl_path)
    if not path.is_file():
        raise InputError(path, "metrics file does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    last_content = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == last_content:
                break
            raise InputError(path, f"line {number + 1} is not valid JSON") from None
        if not isinstance(record, dict):
            raise InputError(path, f"line {number + 1} is not a JSON object")
        records.append(record)
    return records


def plot_training_curves(jsonl_path: str | os.PathLike, out_png: str | os.PathLike) -> None:
    """Plot losses, learning rate and evaluation AP from a metrics JSONL file into one PNG.

    Training lines look like ``{"step": int, "loss": float, "loss_cls": ..., "loss_box": ...,
    "lr": float}`` (every key starting with ``loss`` is plotted); evaluation lines hold ``"AP"``,
    ``"AP50"``, ``"AP75"``, ``"mAP50"`` or an RPN's ``"AR100"`` / ``"AR1000"`` with a ``"step"`` (preferred) or ``"epoch"`` x value,
    and the validation loss ``"val_loss"`` (drawn dashed on the loss panel).
    The PNG (1500 x 450 px) has three panels: losses (log scale when all positive), learning rate,
    and AP in percent. Panels without data say so.

    Raises:
        InputError: see :func:`read_metrics_jsonl`.
    """
    records = read_metrics_jsonl(jsonl_path)
    train = [r for r in records if "step" in r and any(k.startswith("loss") for k in r)]
    evals = [r for r in records if any(k in r for k in _EVAL_KEYS) and ("step" in r or "epoch" in r)]

    figure = Figure(figsize=(15, 4.5))
    loss_axes, lr_axes, ap_axes = figure.subplots(1, 3)

    loss_keys = sorted({k for r in train for k in r if k.startswith("loss")}, key=lambda k: (k != "loss", k))
    for key in loss_keys:
        steps, values = _series(train, "step", key)
        if steps:
            loss_axes.plot(steps, values, label=key, linewidth=1.5 if key == "loss" else 1.0)
    val_steps, val_values = _series(evals, "step", "val_loss")
    if val_steps:  # the validation loss of each evaluation (trainer, eval.loss)
        loss_axes.plot(val_steps, val_values, label="val_loss", linestyle="--", marker="o", markersize=3, color="black")
    if loss_keys and all(v > 0 for r in train for k, v in r.items() if k in loss_keys and _is_number(v)):
        loss_axes.set_yscale("log")
    _finish_axes(loss_axes, "training and validation loss", "step", has_data=bool(loss_keys))

    steps, values = _series(train, "step", "lr")
    if steps:
        lr_axes.plot(steps, values, color="tab:purple")
    _finish_axes(lr_axes, "learning rate", "step", has_data=bool(steps), legend=False)

    x_key = "step" if evals and all("step" in r for r in evals) else "epoch"
    plotted = False
    for key in _EVAL_KEYS:
        xs, values = _series(evals, x_key, key)
        if xs:
            ap_axes.plot(xs, [100 * v for v in values], marker="o", markersize=3, label=key)
            plotted = True
    _finish_axes(ap_axes, "evaluation (%)", x_key, has_data=plotted)

    figure.tight_layout()
    _save_figure(figure, out_png)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _series(records: Sequence[Mapping], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    pairs = [(r[x_key], r[y_key]) for r in records if _is_number(r.get(x_key)) and _is_number(r.get(y_key))]
    return [x for x, _ in pairs], [y for _, y in pairs]


def _finish_axes(axes, title: str, xlabel: str, *, has_data: bool, legend: bool = True) -> None:
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.grid(True, alpha=0.3)
    if not has_data:
        axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes, color="gray")
    elif legend:
        axes.legend(fontsize="small")


# --------------------------------------------------------------------------------------------
# Precision-recall curves
# --------------------------------------------------------------------------------------------
def plot_precision_recall(
    precision: np.ndarray,
    class_names: Sequence[str],
    out_png: str | os.PathLike,
    *,
    iou_thresholds: Sequence[float] | None = None,
) -> None:
    """Plot COCO precision-recall curves: at IoU 0.5 and averaged over IoU 0.5:0.95.

    Args:
        precision: ``COCOeval.eval["precision"]``, float array[T, R, K, A, M] (IoU thresholds x
            recall thresholds ``linspace(0, 1, R)`` x classes x area ranges x maxDets), -1 where
            undefined. Area index 0 ("all") and the last maxDets (100) are plotted.
        class_names: K names.
        out_png: destination (1400 x 600 px).
        iou_thresholds: the T IoU thresholds; default COCO's 0.50:0.05:0.95.

    Per-class curves are thin (labelled in the legend when K <= 20), the mean over classes with
    ground truth is thick and labelled with its AP.

    Raises:
        ValueError: shape and ``class_names`` disagree, or no threshold is 0.5.
    """
    precision = np.asarray(precision, dtype=np.float64)
    if precision.ndim != 5 or precision.shape[2] != len(class_names):
        raise ValueError(f"precision of shape {precision.shape} does not match {len(class_names)} class names")
    thresholds = np.linspace(0.5, 0.95, 10) if iou_thresholds is None else np.asarray(iou_thresholds)
    if len(thresholds) != precision.shape[0]:
        raise ValueError(f"{len(thresholds)} IoU thresholds for precision with T={precision.shape[0]}")
    matches = np.flatnonzero(np.isclose(thresholds, 0.5))
    if matches.size == 0:
        raise ValueError("no IoU threshold equals 0.5")
    curves = precision[:, :, :, 0, -1]  # [T, R, K]
    recall = np.linspace(0.0, 1.0, precision.shape[1])
    panels = [
        ("IoU = 0.50", _masked(curves[matches[0]])),
        ("IoU = 0.50:0.95 (mean)", _mean_over_iou(curves)),
    ]

    figure = Figure(figsize=(14, 6))
    for axes, (title, per_class) in zip(figure.subplots(1, 2), panels):  # per_class: [R, K]
        defined = ~np.isnan(per_class).all(axis=0)
        label_classes = defined.sum() <= 20
        for k in np.flatnonzero(defined):
            axes.plot(
                recall, per_class[:, k], linewidth=0.8, alpha=0.6,
                label=class_names[k] if label_classes else None,
            )  # fmt: skip
        if defined.any():
            mean_curve = np.nanmean(per_class[:, defined], axis=1)
            axes.plot(recall, mean_curve, color="black", linewidth=2.5, label=f"mean (AP {mean_curve.mean():.3f})")
            axes.legend(fontsize="x-small", loc="lower left")
        else:
            axes.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=axes.transAxes)
        axes.set(title=title, xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        axes.grid(True, alpha=0.3)
    figure.tight_layout()
    _save_figure(figure, out_png)


def plot_precision_recall_per_class(
    precision: np.ndarray,
    class_names: Sequence[str],
    out_png: str | os.PathLike,
    *,
    operating_points: Mapping[str, tuple[float, float]] | None = None,
    operating_label: str = "operating point",
) -> None:
    """One small panel per class: COCO precision-recall at IoU 0.50, 0.75 and the mean over
    0.50:0.95 (area "all", maxDets 100), titled with the class's AP50 and AP.

    The panels are drawn into one matplotlib axes (one line collection per curve kind), which
    keeps 80 classes well under a second; recall 0..1 runs along each panel, precision 0..1 up.

    Args:
        precision: ``COCOeval.eval["precision"]`` [T=10, R, K, A, M] (COCO's IoU thresholds).
        class_names: K names.
        out_png: destination; ``ceil(sqrt(K))`` panels a row, 230 x 200 px each (larger for up
            to 4 classes).
        operating_points: optional ``{class: (recall, precision)}`` drawn as a red dot (e.g. the
            confusion matrix's, at its score threshold); negative values are not drawn.
        operating_label: the dot's legend entry.

    Raises:
        ValueError: the shape and ``class_names`` disagree.
    """
    from matplotlib.collections import LineCollection

    precision = np.asarray(precision, dtype=np.float64)
    if precision.ndim != 5 or precision.shape[2] != len(class_names) or precision.shape[0] != 10:
        raise ValueError(f"precision of shape {precision.shape} does not match {len(class_names)} class names")
    curves = _masked(precision[:, :, :, 0, -1])  # [T, R, K]
    mean = _mean_over_iou(curves)  # [R, K]
    recall = np.linspace(0.0, 1.0, precision.shape[1])
    count = len(class_names)
    columns = max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / columns))
    panel_w, panel_h = 0.8, 0.68  # of a 1 x 1 cell; the rest holds the title and the tick labels
    kinds = {"IoU 0.50": ("tab:blue", 1.2, []), "IoU 0.75": ("tab:orange", 0.9, []),
             "IoU 0.50:0.95": ("black", 1.2, [])}
    frames, grid, points = [], [], []
    cell_w, cell_h = {1: (4.6, 3.6), 2: (3.4, 2.8)}.get(columns, (2.3, 2.0))  # inches
    legend_columns = 4 if cell_w * columns >= 7 else 2
    legend_h = 0.5 if legend_columns == 4 else 0.75
    figure = Figure(figsize=(cell_w * columns, cell_h * rows + legend_h))
    axes = figure.add_axes((0.0, legend_h / (cell_h * rows + legend_h), 1.0, cell_h * rows / (cell_h * rows + legend_h)))
    axes.set_axis_off()
    font = "small" if count <= 16 else "x-small"
    for k, name in enumerate(map(str, class_names)):
        row, column = divmod(k, columns)
        x0, y0 = column + 0.15, rows - 1 - row + 0.12
        frames.append([(x0, y0), (x0 + panel_w, y0), (x0 + panel_w, y0 + panel_h), (x0, y0 + panel_h), (x0, y0)])
        grid += [[(x0 + panel_w * f, y0), (x0 + panel_w * f, y0 + panel_h)] for f in (0.25, 0.5, 0.75)]
        grid += [[(x0, y0 + panel_h * f), (x0 + panel_w, y0 + panel_h * f)] for f in (0.25, 0.5, 0.75)]
        if column == 0:
            for f in (0.0, 0.5, 1.0):
                axes.text(x0 - 0.02, y0 + panel_h * f, f"{f:g}", ha="right", va="center", fontsize="xx-small")
        if row == rows - 1 or k + columns >= count:
            for f in (0.0, 0.5, 1.0):
                axes.text(x0 + panel_w * f, y0 - 0.02, f"{f:g}", ha="center", va="top", fontsize="xx-small")
        at_50 = curves[0, :, k]
        if np.isnan(at_50).all():
            axes.text(x0 + panel_w / 2, y0 + panel_h / 2, "no ground truth", ha="center", va="center",
                      color="gray", fontsize=font)
            axes.text(x0, y0 + panel_h + 0.03, name, ha="left", va="bottom", fontsize=font)
            continue
        for (_, _, lines), values in zip(kinds.values(), (at_50, curves[5, :, k], mean[:, k])):
            defined = ~np.isnan(values)
            lines.append(np.column_stack([x0 + panel_w * recall[defined], y0 + panel_h * values[defined]]))
        point = (operating_points or {}).get(name)
        if point is not None and point[0] >= 0 and point[1] >= 0:
            points.append((x0 + panel_w * point[0], y0 + panel_h * point[1]))
        axes.text(x0, y0 + panel_h + 0.03, f"{name}\nAP50 {np.nanmean(at_50):.3f}  AP {np.nanmean(mean[:, k]):.3f}",
                  ha="left", va="bottom", fontsize=font, linespacing=1.1)
    axes.add_collection(LineCollection(grid, colors=(0.85, 0.85, 0.85), linewidths=0.5))
    axes.add_collection(LineCollection(frames, colors="gray", linewidths=0.8))
    handles = []
    for label, (color, width, lines) in kinds.items():
        handles.append(axes.add_collection(LineCollection(lines, colors=color, linewidths=width, label=label)))
    if points:
        xs, ys = zip(*points)
        handles.append(axes.scatter(xs, ys, s=14, color="tab:red", zorder=3, label=operating_label))
    axes.set_xlim(0, columns)
    axes.set_ylim(0, rows)
    figure.legend(handles=handles, loc="lower center", ncol=legend_columns, fontsize="x-small", frameon=False,
                  title="each panel: precision (up) against recall (across)", title_fontsize="x-small")
    _save_figure(figure, out_png)


def plot_confusion_matrix(
    matrix: np.ndarray,
    class_names: Sequence[str],
    out_png: str | os.PathLike,
    *,
    title: str = "confusion matrix",
) -> None:
    """Draw a detection confusion matrix (rows: true class + background, columns: predicted class
    + background; :mod:`fpndet.engine.diagnostics`) as a heat map: each cell coloured by its
    share of its row (the row normalised: how the objects of a true class end up; for the
    background row, which classes the false positives claim), and labelled with its count when
    K + 1 <= 30 (zero cells blank; the counts of larger matrices are in the CSV).

    Args:
        matrix: int [K + 1, K + 1] counts.
        class_names: K names (the last row and column are labelled "background").
        out_png: destination (0.22 inch a class plus margins for the names, at least 3 inches).
        title: the figure's title.

    Raises:
        ValueError: the matrix is not square of side K + 1.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape != (len(class_names) + 1, len(class_names) + 1):
        raise ValueError(f"matrix of shape {matrix.shape} for {len(class_names)} classes")
    names = [*map(str, class_names), "background"]
    counts = matrix.astype(np.float64)
    sums = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, sums, out=np.zeros_like(counts), where=sums > 0)
    n = len(names)
    # Fixed margins (inches) and names as plain texts: tight_layout and n ticks cost seconds at 80 classes.
    points = 9 if n <= 12 else (7 if n <= 30 else 6)
    margin = 0.15 + max(len(name) for name in names) * points * 0.6 / 72
    side = max(3.0, 0.22 * n)
    bottom, left = margin + 0.35, margin + 0.35
    width, height = left + side + 1.2, bottom + side + 0.5
    figure = Figure(figsize=(width, height))
    axes = figure.add_axes((left / width, bottom / height, side / width, side / height))
    colorbar_axes = figure.add_axes(((left + side + 0.2) / width, bottom / height, 0.18 / width, side / height))
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, cax=colorbar_axes, label="share of the row")
    axes.set_xticks([])
    axes.set_yticks([])
    gap = 0.15  # of a cell
    for index, name in enumerate(names):
        axes.text(index, n - 0.5 + gap, name, rotation=90, ha="center", va="top", fontsize=points, clip_on=False)
        axes.text(-0.5 - gap, index, name, ha="right", va="center", fontsize=points, clip_on=False)
    figure.text((left + side / 2) / width, 0.12 / height, "predicted class", ha="center", va="bottom")
    figure.text(0.12 / width, (bottom + side / 2) / height, "true class", rotation=90, ha="left", va="center")
    axes.set_title(title, fontsize="medium")
    if n <= 30:
        for row, col in zip(*np.nonzero(matrix)):
            axes.text(col, row, str(int(matrix[row, col])), ha="center", va="center", fontsize=points,
                      color="white" if shares[row, col] > 0.5 else "black")
    _save_figure(figure, out_png)


def _masked(values: np.ndarray) -> np.ndarray:
    return np.where(values > -1, values, np.nan)


def _mean_over_iou(curves: np.ndarray) -> np.ndarray:
    """[T, R, K] -> [R, K] mean over thresholds with -1 excluded (NaN where all undefined)."""
    masked = _masked(curves)
    defined = ~np.isnan(masked)
    counts = defined.sum(axis=0)
    sums = np.where(defined, masked, 0.0).sum(axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


# --------------------------------------------------------------------------------------------
# Detections on images
# --------------------------------------------------------------------------------------------
def _to_pil(image: torch.Tensor | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3:
        raise ValueError("image must be a PIL image or a uint8 Tensor[3, H, W]")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return Image.fromarray(image.detach().cpu().permute(1, 2, 0).contiguous().numpy())


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font, fixed size
        return ImageFont.load_default()


def _box_list(boxes) -> list[list[float]]:
    if boxes is None:
        return []
    return torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4).tolist()


def _draw_labelled_box(draw, box, color, text, font, width: int, image_size) -> None:
    w, h = image_size
    x1, y1, x2, y2 = (min(max(v, 0.0), limit - 1.0) for v, limit in zip(box, (w, h, w, h)))
    if x2 < x1 or y2 < y1:
        return
    draw.rectangle([x1, y1, x2, y2], outline=color, width=width)
    if not text:
        return
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    text_w, text_h = right - left + 4, bottom - top + 4
    text_y = y1 - text_h if y1 - text_h >= 0 else y1
    draw.rectangle([x1, text_y, x1 + text_w, text_y + text_h], fill=color)
    brightness = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    text_color = (0, 0, 0) if brightness > 128 else (255, 255, 255)
    draw.text((x1 + 2 - left, text_y + 2 - top), text, fill=text_color, font=font)


def draw_detections(
    image: torch.Tensor | Image.Image,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor | None,
    class_names: Sequence[str],
    *,
    out_path: str | os.PathLike | None = None,
    extra_boxes: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    line_width: int = 2,
    font_size: int = 12,
) -> Image.Image:
    """Annotated copy of an image: one coloured box per detection with ``"name score"``.

    Args:
        image: uint8 Tensor[3, H, W] (RGB) or a PIL image; not modified.
        boxes: Tensor[N, 4] xyxy pixels (clipped to the image for drawing).
        labels: int Tensor[N] of contiguous class indices into ``class_names``.
        scores: Tensor[N] in [0, 1], or None to draw names only (e.g. ground truth).
        class_names: names by class index (an index outside it is drawn as its number).
        out_path: if given, the annotated image is also saved there (format from the suffix).
        extra_boxes: boxes drawn first in white, 1 px, e.g. the ground truth: Tensor[M, 4], or
            ``{"boxes": Tensor[M, 4], "labels": Tensor[M]}`` to name them.
        line_width: box outline width in pixels; font_size: label text height in pixels.

    Returns:
        The annotated RGB PIL image.
    """
    canvas = _to_pil(image).copy()
    draw = ImageDraw.Draw(canvas)
    font = _font(font_size)

    def name(label: int) -> str:
        return class_names[label] if 0 <= label < len(class_names) else str(label)

    if extra_boxes is not None:
        extra = extra_boxes if isinstance(extra_boxes, Mapping) else {"boxes": extra_boxes}
        extra_labels = extra.get("labels")
        extra_names = None
        if extra_labels is not None:
            extra_names = [name(int(v)) for v in torch.as_tensor(extra_labels).reshape(-1).tolist()]
        for index, box in enumerate(_box_list(extra["boxes"])):
            text = extra_names[index] if extra_names else ""
            _draw_labelled_box(draw, box, EXTRA_BOX_COLOR, text, font, 1, canvas.size)

    label_list = [int(v) for v in torch.as_tensor(labels).reshape(-1).tolist()]
    score_list = None if scores is None else torch.as_tensor(scores).reshape(-1).tolist()
    for index, box in enumerate(_box_list(boxes)):
        label = label_list[index]
        text = name(label) if score_list is None else f"{name(label)} {score_list[index]:.2f}"
        _draw_labelled_box(draw, box, PALETTE[label % len(PALETTE)], text, font, line_width, canvas.size)

    if out_path is not None:
        suffix = Path(out_path).suffix.lower().lstrip(".") or "png"
        buffer = io.BytesIO()
        canvas.save(buffer, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(suffix, suffix.upper()))
        atomic_write_bytes(out_path, buffer.getvalue())
    return canvas


def caption_image(
    image: Image.Image,
    lines: Sequence[str],
    *,
    font_size: int = 11,
    background: tuple[int, int, int] = (0, 0, 0),
    color: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """A copy of ``image`` (RGB) with the text ``lines`` in a strip below it, one line each; a
    line too long for the width is cut at its start (``...`` then the end, e.g. of a file path)."""
    font = _font(font_size)
    probe = ImageDraw.Draw(image)
    line_h = font_size + 3

    def fit(text: str) -> str:
        if probe.textlength(text, font=font) <= image.width - 4:
            return text
        while text and probe.textlength("..." + text, font=font) > image.width - 4:
            text = text[1:]
        return "..." + text

    out = Image.new("RGB", (image.width, image.height + line_h * len(lines) + 4), background)
    out.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    for number, text in enumerate(lines):
        draw.text((2, image.height + 2 + number * line_h), fit(text), fill=color, font=font)
    return out


def save_image_grid(
    images: Sequence[Image.Image],
    out_png: str | os.PathLike,
    *,
    columns: int = 4,
    background: tuple[int, int, int] = (0, 0, 0),
) -> Image.Image:
    """Paste images row by row into a grid of equal cells and save it as PNG.

    Each cell is as large as the largest image (width and height separately); images sit at the
    top-left of their cell. The grid is ``min(columns, n)`` cells wide and ``ceil(n / columns)``
    cells high.

    Returns:
        The grid image.

    Raises:
        ValueError: ``images`` is empty or ``columns < 1``.
    """
    if not images:
        raise ValueError("no images to put in a grid")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images)
    grid_columns = min(columns, len(images))
    rows = math.ceil(len(images) / grid_columns)
    grid = Image.new("RGB", (grid_columns * cell_w, rows * cell_h), background)
    for index, image in enumerate(images):
        row, column = divmod(index, grid_columns)
        grid.paste(image.convert("RGB"), (column * cell_w, row * cell_h))
    _save_image(grid, out_png)
    return grid

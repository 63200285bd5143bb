"""Datasets (COCO, Pascal VOC, YOLO, synthetic shapes), image reading, transforms and loaders."""

from __future__ import annotations

from fpndet.data.dataset import DetectionDataset
from fpndet.data.detect import open_dataset
from fpndet.data.formats import SHAPE_CLASSES, CocoDetection, ShapesDataset, VOCDetection, YOLODetection
from fpndet.data.images import image_size, load_image
from fpndet.data.loaders import collate_detection
from fpndet.data.transforms import SanitizeDetectionBoxes, build_eval_transforms, build_train_transforms

__all__ = [
    "DetectionDataset",
    "open_dataset",
    "CocoDetection",
    "VOCDetection",
    "YOLODetection",
    "ShapesDataset",
    "SHAPE_CLASSES",
    "load_image",
    "image_size",
    "collate_detection",
    "build_train_transforms",
    "build_eval_transforms",
    "SanitizeDetectionBoxes",
]

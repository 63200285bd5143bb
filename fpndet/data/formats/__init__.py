"""Dataset formats: COCO JSON, Pascal VOC, YOLO, and the embedded synthetic shapes."""

from __future__ import annotations

from fpndet.data.formats.coco import CocoDetection
from fpndet.data.formats.shapes import SHAPE_CLASSES, ShapesDataset
from fpndet.data.formats.voc import VOCDetection
from fpndet.data.formats.yolo import YOLODetection

__all__ = ["CocoDetection", "VOCDetection", "YOLODetection", "ShapesDataset", "SHAPE_CLASSES"]

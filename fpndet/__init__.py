"""fpndet: feature-pyramid object detection (RetinaNet, Faster R-CNN and RPN on FPN) in PyTorch.

Main entry points: :func:`build_model` with a :class:`ModelConfig` (or :func:`named_config`;
``arch`` chooses RetinaNet, Faster R-CNN, an RPN or Fast R-CNN), :func:`from_torchvision` for
torchvision checkpoints, :func:`load_detector` for fpndet run folders and checkpoints, and the
``fpndet`` command (:mod:`fpndet.cli`).
"""
from .modeling.build import build_model
from .modeling.config import ModelConfig, named_config
from .modeling.faster_rcnn import FasterRCNN
from .modeling.retinanet import RetinaNet
from .modeling.torchvision_compat import from_torchvision

__version__ = "0.1.0"


def load_detector(path, **kwargs):
    """See :func:`fpndet.engine.model_io.load_detector`."""
    from .engine.model_io import load_detector as _load

    return _load(path, **kwargs)


__all__ = ["FasterRCNN", "ModelConfig", "RetinaNet", "build_model", "from_torchvision", "load_detector",
           "named_config"]

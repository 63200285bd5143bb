"""fpndet: feature-pyramid object detection (RetinaNet on FPN) in PyTorch.

Main entry points: :func:`build_model` with a :class:`RetinaNetConfig` (or :func:`named_config`),
:func:`from_torchvision` for torchvision checkpoints, :func:`load_detector` for fpndet run
folders and checkpoints, and the ``fpndet`` command (:mod:`fpndet.cli`).
"""
from .modeling.build import build_model
from .modeling.config import RetinaNetConfig, named_config
from .modeling.retinanet import RetinaNet
from .modeling.torchvision_compat import from_torchvision

__version__ = "0.1.0"


def load_detector(path, **kwargs):
    """See :func:`fpndet.engine.model_io.load_detector`."""
    from .engine.model_io import load_detector as _load

    return _load(path, **kwargs)


__all__ = ["RetinaNet", "RetinaNetConfig", "build_model", "from_torchvision", "load_detector", "named_config"]

"""fpndet: feature-pyramid object detection (RetinaNet on FPN) in PyTorch."""
__version__ = "0.1.0"

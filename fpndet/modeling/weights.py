"""Loading weights into a model whose head may differ (fine-tuning on another class count)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from torch import Tensor, nn


@dataclass
class LoadReport:
    """Which tensors were loaded, skipped for a shape mismatch, missing or unexpected."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors"]
        if self.skipped:
            parts.append(f"skipped (shape differs): {', '.join(self.skipped)}")
        if self.missing:
            parts.append(f"missing from the checkpoint: {', '.join(self.missing[:10])}")
        if self.unexpected:
            parts.append(f"not used: {', '.join(self.unexpected[:10])}")
        return "; ".join(parts)


def load_matching_weights(model: nn.Module, state_dict: Mapping[str, Tensor]) -> LoadReport:
    """Load every tensor whose name and shape match; report the rest.

    A COCO checkpoint loaded into a model with another ``num_classes`` loads everything but the
    final classification conv (``head.cls_logits``), which keeps its prior-π initialisation.
    """
    own = model.state_dict()
    report = LoadReport()
    usable = {}
    for key, value in state_dict.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            report.skipped.append(key)
        else:
            usable[key] = value
            report.loaded.append(key)
    report.missing = [k for k in own if k not in state_dict]
    model.load_state_dict(usable, strict=False)
    return report

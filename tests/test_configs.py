"""Every config shipped in ``fpndet/configs`` loads, names a known architecture and builds."""
from __future__ import annotations

import pytest

from fpndet.config import CONFIG_DIR, load_config, model_config
from fpndet.modeling.build import build_model

SHIPPED = sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads_and_builds(name):
    cfg = load_config(name, ["model.backbone_weights=null"])
    config = model_config(cfg)
    model = build_model(config.replace(num_classes=3))
    assert model.config.num_classes == 3
    assert (getattr(model, "rpn", "absent") is None) == (config.arch == "fast_rcnn")
    if config.arch == "fast_rcnn":
        assert cfg.data.train_proposals and cfg.data.val_proposals


def test_the_configs_cover_every_architecture():
    assert {model_config(load_config(name)).arch for name in SHIPPED} >= {"retinanet", "faster_rcnn", "fast_rcnn"}

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


def test_switching_arch_switches_the_pyramid_and_anchors():
    """`model.arch=faster_rcnn` alone builds the FPN paper's two-stage model (P2-P6, P6 by
    subsampling, one anchor size of 32..512 px per level), not a two-stage model on RetinaNet's
    P3-P7 with 9 anchors; fields set in the same layer win; a change within a family keeps the
    YAML's pyramid; switching back to RetinaNet restores its pyramid."""
    config = model_config(load_config(None, ["model.arch=faster_rcnn"]))
    assert (config.min_level, config.max_level, config.fpn_top_block) == (2, 6, "max_pool")
    assert config.anchor_sizes == [32.0, 64.0, 128.0, 256.0, 512.0] and config.num_anchors_per_location == 3
    own = model_config(load_config(None, ["model.arch=rpn", "model.min_level=3", "model.max_level=7",
                                          "model.anchor_sizes=[16,32,64,128,256]"]))
    assert (own.min_level, own.max_level, own.anchor_sizes[0]) == (3, 7, 16.0)
    same_family = model_config(load_config("raccoon_faster_rcnn", ["model.arch=rpn"]))
    yaml = model_config(load_config("raccoon_faster_rcnn"))
    assert same_family.replace(arch=yaml.arch) == yaml
    back = model_config(load_config("raccoon_faster_rcnn", ["model.arch=retinanet"]))
    assert (back.min_level, back.max_level, back.fpn_top_block, back.num_anchors_per_location) == (3, 7, "conv", 9)
    assert back.backbone == yaml.backbone and back.fpn_channels == yaml.fpn_channels


def test_auto_anchors_start_from_each_papers_sizes():
    """`model.anchor_sizes=auto` starts from 32 px on P3 for RetinaNet and 32 px on P2 for the
    two-stage detectors (what the anchor fit compares against and falls back to)."""
    two_stage = model_config(load_config("raccoon_faster_rcnn", ["model.anchor_sizes=auto"]), reference_anchors=True)
    assert two_stage.min_level == 2 and two_stage.anchor_sizes == [32.0, 64.0, 128.0, 256.0, 512.0]
    retinanet = model_config(load_config("raccoon", ["model.anchor_sizes=auto"]), reference_anchors=True)
    assert retinanet.min_level == 3 and retinanet.anchor_sizes == [32.0, 64.0, 128.0, 256.0, 512.0]
    p2 = model_config(load_config("raccoon", ["model.anchor_sizes=auto", "model.min_level=2",
                                              "model.max_level=6"]), reference_anchors=True)
    assert p2.anchor_sizes == [16.0, 32.0, 64.0, 128.0, 256.0]


@pytest.mark.parametrize("override", ["train.amp=fp32", "train.optimizer=adam", "train.schedule=linear",
                                      "data.bad_images=warn", "data.format=pascal"])
def test_word_options_outside_their_choices_are_refused(override):
    from fpndet.errors import InputError

    key = override.split("=")[0]
    with pytest.raises(InputError, match=f"{key}="):
        load_config(None, [override])

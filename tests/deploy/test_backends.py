"""The fast eager path (BatchNorm folded, channels_last), backend choice and `fpndet benchmark`."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from fpndet.cli import main
from fpndet.deploy.backends import open_detector, resolve_backend
from fpndet.deploy.benchmark import benchmark_backends, compare, format_benchmark
from fpndet.deploy.tuning import fold_batch_norms, tune_for_cpu
from fpndet.engine.checkpoints import save_model_weights
from fpndet.modeling.build import build_model
from fpndet.modeling.config import ModelConfig


def model_with_real_statistics() -> nn.Module:
    """A ResNet-18 RetinaNet whose frozen BatchNorms are far from identity (so folding matters)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=3, backbone="resnet18", fpn_channels=32, min_size=[192], max_size=256,
                                    retinanet={"head_channels": 32, "head_depth": 1})).eval()
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, (FrozenBatchNorm2d, nn.BatchNorm2d)):
            n = module.weight.numel()
            module.weight.data = 0.5 + torch.rand(n, generator=generator)
            module.bias.data = 0.2 * torch.randn(n, generator=generator)
            module.running_mean.data = 0.3 * torch.randn(n, generator=generator)
            module.running_var.data = 0.5 + torch.rand(n, generator=generator)
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(-2.0)
    return model


def test_folding_removes_every_batch_norm_of_a_resnet_and_keeps_the_outputs():
    model = model_with_real_statistics()
    x = torch.rand(2, 3, 192, 256)
    with torch.no_grad():
        expected = model.backbone(x)
        tuned = tune_for_cpu(model)
        found = tuned.backbone(x)
    assert fold_batch_norms(model_with_real_statistics().backbone) == 20  # stem + 16 block convs + 3 downsamples
    assert not any(isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)) for m in tuned.modules())
    assert any(isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)) for m in model.modules())  # original untouched
    assert len(found) == len(expected) == 3  # C3-C5
    for a, b in zip(expected, found):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    images = [torch.rand(3, 180, 240), torch.rand(3, 200, 150)]
    with torch.no_grad():
        ref, out = model(images), tuned(images)
    assert all(len(r["boxes"]) > 0 for r in ref)
    # one to one (near-tied scores may swap places with the thread count): label, box within 0.05 px, score 1e-4
    assert compare(ref, out, box_tol=0.05, score_tol=1e-4)["equal"]


def test_auto_backend_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", onnx_file=False, device=cpu) == "fast"
    assert resolve_backend("auto", onnx_file=False, device=cuda) == "eager"
    assert resolve_backend(None, onnx_file=False, device=cpu) == "eager"
    assert resolve_backend(None, onnx_file=True, device=cpu) in ("openvino", "onnxruntime")
    assert resolve_backend("onnxruntime", onnx_file=False, device=cpu) == "onnxruntime"


def test_benchmark_times_backends_after_checking_them(tmp_path, capsys):
    model = model_with_real_statistics()
    save_model_weights(tmp_path / "best.safetensors", model.state_dict(), config=model.config.to_dict(),
                       metadata={"class_names": ["a", "b", "c"]})
    rows = benchmark_backends(tmp_path, batch=2, repeats=2, backends=["eager", "fast"])
    assert [r["backend"] for r in rows] == ["eager", "fast"]
    assert all(r["equal"] and r["ms_per_image"] > 0 and r["peak_mib"] > 0 for r in rows)
    assert rows[0]["vs_eager"] == 1.0
    assert "fast" in format_benchmark(rows)
    detector, names, backend = open_detector(tmp_path, backend="auto")
    assert backend == "fast" and names == ["a", "b", "c"]
    assert main(["benchmark", "--weights", str(tmp_path), "--backends", "eager,fast", "--repeats", "1",
                 "--output", str(tmp_path / "bench.json")]) == 0
    assert "ms/image" in capsys.readouterr().out and (tmp_path / "bench.json").is_file()
    assert main(["benchmark", "--weights", str(tmp_path), "--backends", "warp"]) == 2


def test_compare_ignores_the_order_of_tied_scores_but_not_a_moved_box():
    from fpndet.deploy.benchmark import compare

    ref = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 30, 30]]), "scores": torch.tensor([0.5, 0.5]),
            "labels": torch.tensor([1, 2])}]
    swapped = [{k: v.flip(0) for k, v in ref[0].items()}]
    assert compare(ref, swapped)["equal"]
    moved = [{**ref[0], "boxes": ref[0]["boxes"] + torch.tensor([[0.0, 0, 0, 0], [0.0, 0, 0.6, 0]])}]
    result = compare(ref, moved)
    assert not result["equal"] and result["unmatched"] == 1
    assert not compare(ref, [{k: v[:1] for k, v in ref[0].items()}])["equal"]

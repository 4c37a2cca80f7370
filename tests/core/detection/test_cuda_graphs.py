"""Backbones replayed from CUDA graphs compute what the eager backbones compute (mammo_core.detection.cuda_graphs).

The CPU cases check the fallbacks every machine runs; the CUDA cases (skipped without a GPU) check the
replay itself, on the two real detectors' inference copies: same maps and detections as eager, a new
input really read on replay, one graph per shape, outputs that survive the next call.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from mammo_core.detection import builders, inference
from mammo_core.detection.cuda_graphs import GraphedBackbone, graph_backbone, graphable

CLASSES = ["MASS_BENIGN", "MASS_MALIGNANT", "CALC_BENIGN", "CALC_MALIGNANT"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class _Doubling(nn.Module):
    """A backbone-shaped module (ordered dict of maps, ``out_channels``) that counts its eager calls."""

    out_channels = 3

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        self.calls += 1
        return OrderedDict([("0", 2 * x), ("pool", x[..., ::2, ::2] + 1)])


def _detector(model: str) -> nn.Module:
    config = builders.DetectorConfig(model=model, classes=CLASSES, input_size=128, anchor_sizes=[8, 16, 32, 64],
                                     hash_bits=8, representation=32, fpn_channels=16, proposals_train=50,
                                     proposals_test=30, roi_samples=16, score_threshold=0.0)
    built, _ = builders.build_detector(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in built.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    if model != "frcnn_r50":
        builders.freeze_feature_extractor(built)
    return built.eval()


def _image(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    image = 0.4 + 0.2 * torch.rand(1, 128, 80, generator=g)
    image[:, 50:70, 30:50] += 0.3
    return image.clamp(0, 1).expand(3, -1, -1).contiguous()


def test_cpu_calls_run_the_wrapped_module_eagerly_and_capture_nothing():
    inner = _Doubling()
    graphed = GraphedBackbone(inner)
    x = torch.rand(1, 3, 8, 6)
    out = graphed(x)
    assert inner.calls == 1 and graphed.captured_shapes == []
    torch.testing.assert_close(out["0"], 2 * x)
    assert graphed.out_channels == 3


def test_graphable_only_for_cuda_tensors_outside_autograd():
    assert not graphable(torch.rand(2))
    assert not graphable(torch.rand(2, requires_grad=True))


def test_graph_backbone_wraps_once():
    model = _detector("frcnn_r50")
    original = model.backbone
    assert graph_backbone(model) == 1 and isinstance(model.backbone, GraphedBackbone)
    assert model.backbone.backbone is original
    assert graph_backbone(model) == 0 and model.backbone.backbone is original


def test_cpu_detector_with_graph_wrapper_detects_as_before():
    model = inference.inference_copy(_detector("ours"))
    image = _image(1)
    with torch.inference_mode():
        before = model([image])[0]
        graph_backbone(model)
        after = model([image])[0]
    assert len(before["boxes"]) > 0
    torch.testing.assert_close(after["scores"], before["scores"])


@needs_cuda
@pytest.mark.parametrize("name", ["ours", "frcnn_r50"])
def test_replayed_backbone_matches_eager_and_reads_each_new_input(name):
    eager = inference.inference_copy(_detector(name)).cuda()
    graphed = inference.inference_copy(_detector(name)).cuda()
    graph_backbone(graphed)
    first, second = _image(1).cuda(), _image(2).cuda()
    with torch.inference_mode():
        batch = torch.stack([first])
        maps_first = graphed.backbone(batch)  # captures
        maps_second = graphed.backbone(torch.stack([second]))  # replays on a new input
        for key, value in eager.backbone(batch).items():
            torch.testing.assert_close(maps_first[key], value, rtol=1e-4, atol=1e-4)
        for key, value in eager.backbone(torch.stack([second])).items():
            torch.testing.assert_close(maps_second[key], value, rtol=1e-4, atol=1e-4)
        assert not torch.equal(maps_first["0"], maps_second["0"])  # the first call's outputs were copies
        assert graphed.backbone.captured_shapes == [tuple(batch.shape)]
        a, b = eager([second])[0], graphed([second])[0]
    assert a["labels"].tolist() == b["labels"].tolist()  # the random R50 may keep no box: the maps are the check
    torch.testing.assert_close(b["scores"], a["scores"], rtol=1e-4, atol=1e-4)


@needs_cuda
def test_shapes_beyond_the_limit_run_eagerly():
    inner = _Doubling().cuda()
    graphed = GraphedBackbone(inner, max_shapes=1)
    with torch.inference_mode():
        small = torch.rand(1, 3, 8, 6, device="cuda")
        graphed(small)
        calls = inner.calls
        out = graphed(small + 1)
        assert inner.calls == calls  # replayed, not called
        torch.testing.assert_close(out["0"], 2 * (small + 1))
        big = torch.rand(1, 3, 16, 6, device="cuda")
        torch.testing.assert_close(graphed(big)["0"], 2 * big)
        assert inner.calls == calls + 1 and len(graphed.captured_shapes) == 1

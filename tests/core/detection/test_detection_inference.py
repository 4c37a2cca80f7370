"""The inference copies compute what the trained detectors compute (mammo_core.detection.inference)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from mammo_core.detection import builders, inference
from mammo_core.detection.strided_pools import StridedMaxPool2d
from mammo_core.models.densenet_parts import AttentionBlock, DenseLayers

CLASSES = ["MASS_BENIGN", "MASS_MALIGNANT", "CALC_BENIGN", "CALC_MALIGNANT"]


def _config(model: str) -> builders.DetectorConfig:
    return builders.DetectorConfig(model=model, classes=CLASSES, input_size=128, anchor_sizes=[8, 16, 32, 64],
                                   hash_bits=8, representation=32, fpn_channels=16, proposals_train=50,
                                   proposals_test=30, roi_samples=16, score_threshold=0.0)


def _as_trained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and move every trainable weight, as training does.

    Random init leaves BN as the identity (mean 0, var 1, weight 1, bias 0) and every attention gamma at 0,
    under which a wrong fold or a wrongly removed attention block would go unnoticed.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                c = module.running_mean.numel()
                module.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                module.running_var.copy_(0.5 + torch.rand(c, generator=g))
                module.weight.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
                module.bias.copy_(0.1 * torch.randn(c, generator=g))
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _image() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    image = 0.4 + 0.2 * torch.rand(1, 128, 80, generator=g)
    image[:, 50:70, 30:50] += 0.3
    return image.clamp(0, 1).expand(3, -1, -1)


def _assert_same_detections(a: dict, b: dict) -> None:
    assert len(a["boxes"]) > 0 and a["labels"].tolist() == b["labels"].tolist()
    torch.testing.assert_close(b["boxes"], a["boxes"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(b["scores"], a["scores"], rtol=1e-4, atol=1e-5)


def test_inference_copy_of_ours_computes_the_same_maps_and_detections():
    model, _ = builders.build_detector(_config("ours"))
    _as_trained(model)
    builders.freeze_feature_extractor(model)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = inference.inference_copy(model)
    # the trained model is untouched, and every rewrite really happened in the copy
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert any(isinstance(m, DenseLayers) for m in model.modules())
    assert not any(isinstance(m, DenseLayers) for m in fast.modules())
    kept = [m for m in fast.modules() if isinstance(m, AttentionBlock)]
    assert kept and all(float(m.gamma) != 0 for m in kept)  # trained ones stay (Freeze3's and the tails')
    assert sum(isinstance(m, AttentionBlock) for m in model.modules()) > len(kept)  # frozen identities gone
    counts = inference.rewrite_for_inference(copy.deepcopy(model))
    assert counts["batchnorms_folded"] >= 1 + 6 + 12 + 24  # stem + every dense layer's bottleneck
    assert counts["dense_blocks_buffered"] >= 3 and counts["transitions_pooled_first"] >= 2
    # stem and three closing transitions (max), the trunk's and each branch's pretrained transition (average)
    assert counts["pools_strided"] == 4 + 4 and counts["hash_decoders_folded"] == 1
    # the backbone and the RPN head's levels in one task graph (concurrent_pyramid), the extractor inside it
    assert counts["pyramids_concurrent"] == 1 and counts["branch_maps_concurrent"] == 0
    # every dense layer (6 + 12 in the trunk, 24 in each of three branches) and transition (1 + 3 + 3 closing)
    assert counts["batchnorm_relus_folded"] == 6 + 12 + 3 * 24 + 7
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in fast.modules())
    image = _image()
    with torch.inference_mode():
        x = model.transform([image])[0].tensors
        for name, (a, b) in zip(("trunk", "middle", "final"),
                                zip(model.backbone.body(x).values(), fast.backbone.body(x).values(), strict=True),
                                strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()), msg=name)
        _assert_same_detections(model([image])[0], fast([image])[0])


def test_inference_copy_of_the_resnet50_baseline_folds_its_frozen_batchnorms():
    model, _ = builders.build_detector(_config("frcnn_r50"))
    _as_trained(model, seed=1)
    model.eval()
    fast = inference.inference_copy(model)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fast.modules())
    assert sum(isinstance(m, StridedMaxPool2d) for m in fast.modules()) == 1  # the stem's, as in ours
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == 53  # all of ResNet-50's
    with torch.inference_mode():  # a random ResNet-50 finds no box here: its feature pyramid is compared
        x = model.transform([_image()])[0].tensors
        for name, a in model.backbone(x).items():
            b = fast.backbone(x)[name]
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()), msg=name)


def test_buffered_dense_block_equals_concatenation():
    from mammo_core.models.fused import FusedDenseNet

    block = _as_trained(FusedDenseNet(2, seed=0)).trunk.denseblock2.eval()
    x = torch.rand(2, 128, 12, 10)  # a batch of two: the buffer's channel prefix is then a strided view
    with torch.no_grad():
        torch.testing.assert_close(inference.BufferedDenseLayers(block)(x), block(x), rtol=1e-5, atol=1e-5)


def test_a_batchnorm_in_training_mode_is_not_folded():
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).train()
    try:
        inference.folded_conv(conv, bn)
    except ValueError as exc:
        assert "eval" in str(exc)
    else:
        raise AssertionError("a BatchNorm using batch statistics was folded")


def test_folded_hash_decoder_gives_the_decoders_relaxed_codes():
    from mammo_core.models.hashing import HashDecoder

    g = torch.Generator().manual_seed(4)
    decoder = HashDecoder(24, 6, beta=2.0, eps=0.2, seed=3)
    decoder.fit_input_scaling(3.0 + 2.0 * torch.randn(64, 24, generator=g))
    with torch.no_grad():  # trained-looking statistics and slice weights, so that no fold can hide
        norm = decoder.projection_norm
        norm.running_mean.copy_(0.3 * torch.randn(norm.num_features, generator=g))
        norm.running_var.copy_(0.5 + torch.rand(norm.num_features, generator=g))
        norm.weight.copy_(0.8 + 0.4 * torch.rand(norm.num_features, generator=g))
        norm.bias.copy_(0.1 * torch.randn(norm.num_features, generator=g))
        decoder.slice_weight.mul_(40.0)
    decoder.eval()
    x = 3.0 + 2.0 * torch.randn(40, 24, generator=g)
    with torch.no_grad():
        expected, got = decoder.relaxed(x), inference.FoldedHashDecoder(decoder)(x)
    assert 0 < int(((expected > 0) & (expected < 1)).sum()) < expected.numel()  # codes inside and outside the band
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    try:
        inference.FoldedHashDecoder(decoder.train())
    except ValueError as exc:
        assert "eval" in str(exc)
    else:
        raise AssertionError("a decoder whose BatchNorm uses batch statistics was folded")


def _bn(channels: int, seed: int, negative: int | None = None) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(channels, generator=g))
        bn.weight.copy_(0.5 + torch.rand(channels, generator=g))
        bn.bias.copy_(torch.randn(channels, generator=g))
        if negative is not None:
            bn.weight[negative] = -0.7
    return bn


def test_batchnorm_relu_before_a_1x1_convolution_becomes_a_floor_and_the_same_function():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 9, 8, generator=g)
    conv = nn.Conv2d(6, 5, 1, stride=2, bias=True)
    plain = nn.Sequential(_bn(6, 1), nn.ReLU(), nn.AvgPool2d(2), conv).eval()
    fast = copy.deepcopy(plain)
    assert inference.fold_batchnorm_relus(fast) == 1
    assert isinstance(fast[0], inference.ReluFloor) and isinstance(fast[1], nn.Identity)
    with torch.no_grad():
        expected = plain(x)
        assert float((plain[1](plain[0](x)) == 0).float().mean()) > 0.2  # the ReLU really cuts
        torch.testing.assert_close(fast(x), expected, rtol=1e-5, atol=1e-5)
        floor, folded = inference.relu_floor_and_conv(plain[0], conv)
        torch.testing.assert_close(folded(floor(x)), conv(plain[1](plain[0](x))), rtol=1e-5, atol=1e-5)


def test_no_floor_where_the_identity_does_not_hold():
    conv1x1 = nn.Conv2d(4, 3, 1)
    assert inference.relu_floor_and_conv(_bn(4, 2, negative=1), conv1x1) is None  # relu(s x + t) with s < 0
    assert inference.relu_floor_and_conv(_bn(4, 2), nn.Conv2d(4, 3, 3, padding=1)) is None  # padding sees 0, not t
    assert inference.relu_floor_and_conv(_bn(4, 2).train(), conv1x1) is None  # batch statistics
    untouched = nn.Sequential(_bn(4, 3, negative=0), nn.ReLU(), nn.Conv2d(4, 3, 1))
    assert inference.fold_batchnorm_relus(untouched) == 0 and isinstance(untouched[0], nn.BatchNorm2d)

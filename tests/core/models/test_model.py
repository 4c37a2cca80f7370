"""The fused Freeze1-3 DenseNet: shapes, freezing, exact trunk sharing, counts, weight loading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision

from mammo_core.models import fused as M
from tests.helpers.torch_threads import one_torch_thread  # noqa: F401 (autouse: one torch thread here)

SMALL = {"freeze1": "denseblock3", "freeze2": "denseblock3.denselayer19", "freeze3": "denseblock2"}




@pytest.fixture(scope="module")
def fused_eval() -> M.FusedDenseNet:
    return M.FusedDenseNet(num_classes=3, seed=0).eval()


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [64, 224])
def test_shapes_at_both_patch_sizes(fused_eval: M.FusedDenseNet, size: int) -> None:
    x = _images(2, size)
    with torch.inference_mode():
        logits = fused_eval(x)
        feats = fused_eval.features(x)
        maps = fused_eval.maps_from_trunk(fused_eval.trunk_output(x))
    assert list(logits) == ["freeze1", "freeze2", "freeze3"]
    assert {b: tuple(v.shape) for b, v in logits.items()} == {b: (2, 3) for b in M.BRANCHES}
    assert {b: tuple(v.shape) for b, v in feats.items()} == {b: (2, M.FEATURE_DIM) for b in M.BRANCHES}
    side = {64: 2, 224: 7}[size]  # /4 stem, /2 per transition (2), /2 closing max pooling (ceil)
    assert tuple(maps["freeze3"].shape) == (2, M.FEATURE_DIM, side, side)


def test_trunk_is_the_common_prefix_and_branches_share_structure(fused_eval: M.FusedDenseNet) -> None:
    assert list(fused_eval.trunk._modules) == ["stem", "denseblock1", "transition1", "denseblock2"]
    for branch in M.BRANCHES:
        assert list(fused_eval.branches[branch]._modules) == [
            "transition2",
            "denseblock3_1to19",
            "denseblock3_20to24",
            "tail",
        ]
    assert all(not p.requires_grad for p in fused_eval.trunk.parameters())
    # freeze1 freezes all of its continuation's DenseNet part, freeze3 none of it
    assert not any(p.requires_grad for p in fused_eval.branches["freeze1"].denseblock3_20to24.parameters())
    assert all(p.requires_grad for p in fused_eval.branches["freeze2"].denseblock3_20to24.parameters())
    assert not any(p.requires_grad for p in fused_eval.branches["freeze2"].denseblock3_1to19.parameters())
    assert all(p.requires_grad for p in fused_eval.branches["freeze3"].transition2.parameters())


def test_fused_branches_equal_separately_built_single_models(fused_eval: M.FusedDenseNet) -> None:
    x = _images(3, 32, seed=1)
    with torch.inference_mode():
        fused = fused_eval(x)
        for branch, point in M.DEFAULT_FREEZE_UPTO.items():
            single = M.build_single(point, num_classes=3, seed=0, name=branch).eval()
            torch.testing.assert_close(single(x), fused[branch], rtol=0, atol=1e-6)
        other_seed = M.build_single("denseblock2", num_classes=3, seed=1).eval()
        assert not torch.allclose(other_seed(x), fused["freeze3"], atol=1e-3)


def test_forward_from_trunk_and_fused_features(fused_eval: M.FusedDenseNet) -> None:
    x = _images(2, 64, seed=2)
    with torch.inference_mode():
        t = fused_eval.trunk_output(x)
        assert tuple(t.shape) == (2, 512, 8, 8)  # denseblock2's output at 64 px
        direct = fused_eval(x)
        via = fused_eval.forward_from_trunk(t)
        feats = fused_eval.features(x)
        fused = fused_eval.fused_features(x, (0.4, 0.4, 0.3))
    for b in M.BRANCHES:
        assert torch.equal(direct[b], via[b])
    expected = 0.4 * feats["freeze1"] + 0.4 * feats["freeze2"] + 0.3 * feats["freeze3"]
    torch.testing.assert_close(fused, expected)
    with pytest.raises(ValueError, match="2 fusion weights for 3 branches"):
        fused_eval.fused_features(x, (0.5, 0.5))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_frozen_prefix_and_bn_stats_never_move_under_training() -> None:
    model = M.FusedDenseNet(num_classes=2, seed=0)
    model.train()
    assert not model.trunk.training and not model.trunk.stem.norm0.training
    assert not model.branches["freeze1"].denseblock3_20to24.training
    assert model.branches["freeze3"].transition2.training and model.heads["freeze1"].training
    frozen_names = {n for n, p in model.named_parameters() if not p.requires_grad}
    before = _snapshot(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    y = torch.tensor([0, 1, 0, 1])
    for step in range(3):
        logits = model(_images(4, 32, seed=10 + step))
        loss = sum(torch.nn.functional.cross_entropy(v, y) for v in logits.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    frozen_keys = [
        k for k in before if k.startswith("trunk.") or (".denseblock3_1to19." in k and "freeze3" not in k)
    ]
    for key in frozen_keys:  # parameters and BN running stats of everything frozen: bit-identical
        assert torch.equal(before[key], after[key]), key
    for name in frozen_names:
        assert torch.equal(before[name], after[name]), name
    # ... while the trainable parts did move (so the checks above can fail)
    assert not torch.equal(before["heads.freeze1.weight"], after["heads.freeze1.weight"])
    key = "branches.freeze3.transition2.transition.norm.running_mean"
    assert not torch.equal(before[key], after[key])
    gamma = "branches.freeze3.tail.attention.gamma"
    assert not torch.equal(before[gamma], after[gamma])


def test_trained_branch_moves_exactly_between_fused_and_single() -> None:
    model = M.FusedDenseNet(num_classes=2, seed=0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):
        logits = model(_images(4, 32, seed=step))
        loss = sum(torch.nn.functional.cross_entropy(v, torch.tensor([0, 1, 1, 0])) for v in logits.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = _images(2, 32, seed=5)
    singles = {b: M.single_from_fused(model, b).eval() for b in M.BRANCHES}
    with torch.inference_mode():
        fused = model(x)
        for b, single in singles.items():
            assert single.freeze_upto == M.DEFAULT_FREEZE_UPTO[b]
            assert torch.equal(single(x), fused[b])
        refused = M.fused_from_singles(singles).eval()
        for b, logits in refused(x).items():
            assert torch.equal(logits, fused[b])
    with torch.no_grad():
        next(singles["freeze2"].trunk.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="shared trunk entry 'stem.conv0.weight' differs"):
        M.fused_from_singles(singles)


def test_parameter_counts_match_table_7_shape(fused_eval: M.FusedDenseNet) -> None:
    counts = M.parameter_counts(fused_eval)
    total = (
        sum(p.numel() for p in fused_eval.trunk.parameters())
        + sum(p.numel() for p in fused_eval.branches["freeze1"].parameters())
        + sum(p.numel() for p in fused_eval.heads["freeze1"].parameters())
    )
    for b in M.BRANCHES:
        assert counts[b]["frozen"] + counts[b]["trainable"] == total
    assert counts["freeze1"]["frozen"] > counts["freeze2"]["frozen"] > counts["freeze3"]["frozen"]
    # DenseNet-121 up to denseblock2 / denselayer19 of block 3 / all of block 3 (paper: 0.95M, 3.50M, 4.76M)
    assert counts["freeze3"]["frozen"] == 1_306_099
    assert counts["freeze2"]["frozen"] == 3_520_566
    assert counts["freeze1"]["frozen"] == 4_309_366
    single = M.build_single("denseblock2", num_classes=3, name="freeze3")
    assert M.parameter_counts(single) == {"freeze3": counts["freeze3"]}


def test_freeze_points_by_stage_layer_or_none() -> None:
    assert M.freeze_point("none") == -1
    assert M.freeze_point("stem") == 0
    assert M.freeze_point("denseblock1") == 6
    assert M.freeze_point("denseblock1.denselayer6") == 6
    assert M.freeze_point("transition1") == 7
    assert M.freeze_point("denseblock3") == len(M._ATOMS) - 1
    with pytest.raises(ValueError, match="unknown freeze point 'denseblock4'"):
        M.freeze_point("denseblock4")
    model = M.FusedDenseNet(2, {"a": "none", "b": "stem"})
    assert len(model.trunk) == 0
    assert M.parameter_counts(model)["a"]["frozen"] == 0
    assert M.parameter_counts(model)["b"]["frozen"] == 9408 + 2 * 64  # conv0 + norm0


# ---------------------------------------------------------------------------------------------
# Weight files


def _old_style(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename dense-layer keys the way torchvision's published file spells them ("norm.1").

    That file predates BN's ``num_batches_tracked``, so those entries are absent, as in the real one.
    """
    return {
        re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    }


def test_loads_a_torchvision_state_dict_file_with_old_keys(tmp_path: Path) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        reference = torchvision.models.densenet121(weights=None).state_dict()
    old = _old_style(reference)
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    path = tmp_path / "densenet121.pth"
    torch.save(old, path)
    state = M.load_backbone_weights(path)
    assert state is not None and "classifier.weight" not in state
    assert "features.denseblock4.denselayer1.conv1.weight" not in state
    key = "features.denseblock1.denselayer1.norm1.weight"
    assert torch.equal(state[key], reference[key])
    single = M.build_single("transition1", backbone_state=state)
    assert torch.equal(single.trunk.stem.conv0.weight, reference["features.conv0.weight"])
    last = reference["features.denseblock3.denselayer24.conv2.weight"]
    assert torch.equal(single.continuation.denseblock3.denselayer24.conv2.weight, last)
    assert M.load_backbone_weights("none") is None


def test_missing_imagenet_file_says_where_to_put_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "densenet121-a639ec97.pth"
    with pytest.raises(FileNotFoundError) as err:
        M.load_backbone_weights("imagenet")
    assert str(expected) in str(err.value)
    assert torchvision.models.DenseNet121_Weights.IMAGENET1K_V1.url in str(err.value)
    assert not expected.exists()  # nothing was downloaded
    expected.parent.mkdir(parents=True)
    torch.save(torchvision.models.densenet121(weights=None).state_dict(), expected)
    assert "features.conv0.weight" in M.load_backbone_weights("imagenet")


def test_wrong_architecture_names_file_and_first_mismatched_key(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    expected = r"resnet18\.pth.*first mismatched key 'features\.conv0\.weight' is missing"
    with pytest.raises(ValueError, match=expected):
        M.load_backbone_weights(path)
    state = torchvision.models.densenet121(weights=None).state_dict()
    state["features.denseblock2.denselayer3.conv1.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "bad_shape.pth")
    expected = r"'features\.denseblock2\.denselayer3\.conv1\.weight' has shape \(3, 3\)"
    with pytest.raises(ValueError, match=expected):
        M.load_backbone_weights(tmp_path / "bad_shape.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        M.load_backbone_weights(tmp_path / "nope.pth")


class _Payload:
    """Unpickling this would create a marker file: what an attacker's code execution stands for."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_crafted_pickle_payload_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"features.conv0.weight": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"evil\.pth: not a plain tensor state dict, refused"):
        M.load_backbone_weights(path)
    assert not marker.exists()

"""The paper's feature extractor: DenseNet-121 truncated after its third dense block, three ways frozen.

Freeze1..3 are one network trained three times with different prefixes frozen (Freeze1 freezes the
most). All three start from the same weights and a frozen prefix never changes, so the prefix frozen
in *all* branches is the same function in each of them: ``FusedDenseNet`` computes it once per batch
(the ``trunk``) and runs only the three continuations (``branches``). Sharing is exact, not an
approximation: every branch's output equals the one of a separately built single-branch model with the
same weights (tested).

Where the network can be cut ("freeze points"): after a stage of ``STAGES`` or after any dense layer
(``"denseblock3.denselayer12"``); ``"none"`` freezes nothing. A stage name means "up to and including
that stage". Attention blocks belong to the transition stage they precede, so freezing ``transition1``
freezes attention 1 too (it starts as the identity, so a frozen prefix is exactly the pretrained
DenseNet). The closing attention + transition + pooling ("tail") and the heads are always trained.

Default freeze points (``DEFAULT_FREEZE_UPTO``) follow the paper's Table 7 proportions (frozen 0.95M /
3.50M / 4.76M: Freeze3 ends inside denseblock2, Freeze2 inside denseblock3, Freeze1 freezes the whole
pretrained DenseNet) with one deliberate change: Freeze3 freezes the whole of denseblock2 instead of
stopping at about its 8th layer. On CPU the high-resolution early blocks dominate the cost (at 224 px
the stem..denseblock2 prefix is ~85% of the truncated DenseNet's time), so a trunk ending there makes
the fused three-branch model cost ~1.4x one branch instead of ~1.6x (``bench/trunk.py`` measures it).

Weights: ``load_backbone_weights("imagenet" | "none" | path)``. ImageNet weights come only from the
local torch hub cache or an explicit path; nothing is downloaded at run time, and files are always read
with ``torch.load(..., weights_only=True)`` so a crafted pickle cannot execute code.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from mammo_core.models.densenet_parts import AttentionBlock, ClosingTransition, DenseLayers
from mammo_core.sources import weight_sources

STAGES = ("stem", "denseblock1", "transition1", "denseblock2", "transition2", "denseblock3")
BRANCHES = ("freeze1", "freeze2", "freeze3")
DEFAULT_FREEZE_UPTO: Mapping[str, str] = {
    "freeze1": "denseblock3",
    "freeze2": "denseblock3.denselayer19",
    "freeze3": "denseblock2",
}
FEATURE_DIM = 512  # channels out of the closing transition (DenseNet's 0.5 compression of 1024)
DENSE_LAYERS = {"denseblock1": 6, "denseblock2": 12, "denseblock3": 24}
BLOCK_OUT_CHANNELS = {"denseblock1": 256, "denseblock2": 512, "denseblock3": 1024}
_TORCHVISION_KEY_PREFIXES = ("features.conv0.", "features.norm0.") + tuple(
    f"features.{name}." for name in STAGES[1:]
)
# torchvision's own fix for pre-0.4 checkpoints whose dense layers have "norm.1"-style keys.
OLD_DENSELAYER_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


# ----------------------------------------------------------------------------------------------
# Weights


def imagenet_weights_path() -> Path:
    """Where torchvision keeps its DenseNet-121 ImageNet file in the local torch hub cache."""
    return weight_sources.hub_file("densenet121")


def load_backbone_weights(source: str | os.PathLike[str]) -> dict[str, Tensor] | None:
    """Read DenseNet-121 weights for the truncated backbone; ``None`` for ``"none"`` (random init).

    Returns the torchvision-named entries (``features.*`` up to denseblock3) after checking every one
    against DenseNet-121's shapes. Raises FileNotFoundError (saying where to put the file and where to
    fetch it) when absent, ValueError naming the file and the first mismatched key for another
    architecture, and ValueError for anything that is not a plain tensor state dict.
    """
    if str(source) == "none":
        return None
    if str(source) == "imagenet":
        path = imagenet_weights_path()
        if not path.is_file():
            url = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1.url
            raise FileNotFoundError(
                f"ImageNet DenseNet-121 weights not found at {path}. Nothing is downloaded at run time: "
                f"run `mammo weights fetch densenet121` (or fetch {url} and save it as {path}), or give the "
                f"file's path as the weight source, or use weights 'none'."
            )
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"DenseNet-121 weights file not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for crafted payloads, RuntimeError for non-torch files
        reason = f"{type(exc).__name__}: {exc}"
        raise ValueError(f"{path}: not a plain tensor state dict, refused ({reason})") from exc
    return _check_densenet121_state(raw, str(path))


@functools.cache
def _densenet121_shapes() -> dict[str, tuple[int, ...]]:
    """Every DenseNet-121 state entry's shape, in order (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        reference = torchvision.models.densenet121(weights=None)
    return {k: tuple(v.shape) for k, v in reference.state_dict().items()}


def _check_densenet121_state(raw: object, origin: str) -> dict[str, Tensor]:
    """Fix old key names, keep the truncated backbone's entries, and check them all against the shapes."""
    if not isinstance(raw, Mapping) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise ValueError(f"{origin}: not a state dict of tensors")
    state = {}
    for key, value in raw.items():
        match = OLD_DENSELAYER_KEY.match(key)
        state[match.group(1) + match.group(2) if match else key] = value
    reference = _densenet121_shapes()
    for key, ref in reference.items():
        if not key.startswith(_TORCHVISION_KEY_PREFIXES) or key.endswith("num_batches_tracked"):
            continue
        if key not in state:
            raise ValueError(
                f"{origin}: not a DenseNet-121 state dict; first mismatched key {key!r} is missing"
            )
        if tuple(state[key].shape) != ref:
            raise ValueError(
                f"{origin}: not a DenseNet-121 state dict; first mismatched key {key!r} has shape "
                f"{tuple(state[key].shape)}, expected {ref}"
            )
    for key in state:
        if key not in reference:
            raise ValueError(
                f"{origin}: not a DenseNet-121 state dict; first mismatched key {key!r} is unexpected"
            )
    return {k: v for k, v in state.items() if k.startswith(_TORCHVISION_KEY_PREFIXES)}


# ----------------------------------------------------------------------------------------------
# Freeze points and segments


def _atoms() -> list[tuple[str, str]]:
    """The finest cut units in order, as (atom name, stage name)."""
    atoms = []
    for stage in STAGES:
        if stage in DENSE_LAYERS:
            atoms += [(f"{stage}.denselayer{k}", stage) for k in range(1, DENSE_LAYERS[stage] + 1)]
        else:
            atoms.append((stage, stage))
    return atoms


_ATOMS = _atoms()
_ATOM_INDEX = {name: i for i, (name, _) in enumerate(_ATOMS)}
_STAGE_LAST_ATOM = {stage: i for i, (_, stage) in enumerate(_ATOMS)}  # later entries overwrite


def freeze_point(name: str) -> int:
    """Index of the last frozen atom for a freeze-point name (-1 for ``"none"``); ValueError if unknown."""
    if name == "none":
        return -1
    if name in _STAGE_LAST_ATOM:
        return _STAGE_LAST_ATOM[name]
    if name in _ATOM_INDEX:
        return _ATOM_INDEX[name]
    raise ValueError(
        f"unknown freeze point {name!r}: use 'none', one of {', '.join(STAGES)}, "
        f"or a dense layer such as 'denseblock3.denselayer12'"
    )


@dataclass(frozen=True)
class _Segment:
    name: str  # the stage name, or "denseblock3_1to12" for part of a dense block
    module: nn.Module
    last_atom: int


def _stage_of(segment_name: str) -> str:
    return segment_name.split("_", 1)[0]


class _Template:
    """The one initial state every branch starts from: backbone stages, tail and head."""

    def __init__(self, num_classes: int, backbone_state: Mapping[str, Tensor] | None, seed: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # DenseNet-121's first three blocks only: same modules and key names as densenet121's,
            # without paying to initialise the dropped fourth block.
            densenet = torchvision.models.DenseNet(32, (6, 12, 24), 64)
            attention1 = AttentionBlock(BLOCK_OUT_CHANNELS["denseblock1"])
            attention2 = AttentionBlock(BLOCK_OUT_CHANNELS["denseblock2"])
            attention3 = AttentionBlock(BLOCK_OUT_CHANNELS["denseblock3"])
            closing = ClosingTransition(BLOCK_OUT_CHANNELS["denseblock3"], FEATURE_DIM)
            self.head = nn.Linear(FEATURE_DIM, num_classes)
        if backbone_state is not None:
            state = _check_densenet121_state(backbone_state, "backbone state")
            densenet.load_state_dict(state, strict=False)  # the check guarantees every kept key is there
        f = densenet.features
        self.stages: dict[str, nn.Module] = {
            "stem": nn.Sequential(OrderedDict(conv0=f.conv0, norm0=f.norm0, relu0=f.relu0, pool0=f.pool0)),
            "denseblock1": DenseLayers(f.denseblock1.items()),
            "transition1": nn.Sequential(OrderedDict(attention=attention1, transition=f.transition1)),
            "denseblock2": DenseLayers(f.denseblock2.items()),
            "transition2": nn.Sequential(OrderedDict(attention=attention2, transition=f.transition2)),
            "denseblock3": DenseLayers(f.denseblock3.items()),
        }
        self.tail = nn.Sequential(OrderedDict(attention=attention3, transition=closing))

    def segments(self, cuts: set[int]) -> list[_Segment]:
        """The backbone split after every atom index in ``cuts`` (fresh deep copies)."""
        out = []
        for stage, module in self.stages.items():
            first = min(i for i, (_, s) in enumerate(_ATOMS) if s == stage)
            last = _STAGE_LAST_ATOM[stage]
            ends = sorted({c for c in cuts if first <= c < last} | {last})
            if len(ends) == 1:
                out.append(_Segment(stage, copy.deepcopy(module), last))
                continue
            layers = list(module.items())
            start = first
            for end in ends:
                lo, hi = start - first + 1, end - first + 1  # 1-based dense layer numbers
                part = DenseLayers(copy.deepcopy(layers[lo - 1 : hi]))
                out.append(_Segment(f"{stage}_{lo}to{hi}", part, end))
                start = end + 1
        return out


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


class _FrozenAware(nn.Module):
    """Keeps the frozen segments (listed by submodule path) in eval mode whatever ``train()`` says."""

    _frozen_paths: list[str]

    def train(self, mode: bool = True):  # type: ignore[override]
        super().train(mode)
        for path in self._frozen_paths:
            self.get_submodule(path).eval()
        return self

    def _run_trunk(self, x: Tensor) -> Tensor:
        with torch.no_grad():  # frozen in every branch: no graph, no gradients, computed once
            return self.trunk(x)


def global_average_pool(maps: Tensor) -> Tensor:
    """(N, C, H, W) feature maps -> (N, C) features: the mean over space, as DenseNet's classifier input."""
    return torch.flatten(torch.mean(maps, dim=(2, 3)), 1)


# ----------------------------------------------------------------------------------------------
# Models


class FusedDenseNet(_FrozenAware):
    """Freeze1..3 sharing one trunk: ``trunk`` (frozen in all), ``branches`` (continuations), ``heads``."""

    def __init__(
        self,
        num_classes: int,
        freeze_upto: Mapping[str, str] = DEFAULT_FREEZE_UPTO,
        backbone_state: Mapping[str, Tensor] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if not freeze_upto:
            raise ValueError("freeze_upto names no branch")
        self.num_classes = num_classes
        self.freeze_upto = dict(freeze_upto)
        points = {branch: freeze_point(name) for branch, name in self.freeze_upto.items()}
        common = min(points.values())
        template = _Template(num_classes, backbone_state, seed)
        segments = template.segments({p for p in points.values() if p >= 0})
        self.trunk = nn.Sequential(OrderedDict((s.name, s.module) for s in segments if s.last_atom <= common))
        self.branches = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        self._frozen_paths = ["trunk"]
        _freeze(self.trunk)
        for branch, point in points.items():
            rest = [(s.name, copy.deepcopy(s.module)) for s in segments if s.last_atom > common]
            rest.append(("tail", copy.deepcopy(template.tail)))
            self.branches[branch] = nn.Sequential(OrderedDict(rest))
            for s in segments:
                if common < s.last_atom <= point:
                    _freeze(self.branches[branch].get_submodule(s.name))
                    self._frozen_paths.append(f"branches.{branch}.{s.name}")
            self.heads[branch] = copy.deepcopy(template.head)
        self.train()

    def trunk_output(self, x: Tensor) -> Tensor:
        """The shared frozen prefix's output (no gradient); cacheable since it never changes."""
        return self._run_trunk(x)

    def maps_from_trunk(self, t: Tensor) -> dict[str, Tensor]:
        """Each branch's final feature maps (N, FEATURE_DIM, h, w), before global pooling."""
        return {branch: module(t) for branch, module in self.branches.items()}

    def features_from_trunk(self, t: Tensor) -> dict[str, Tensor]:
        return {branch: global_average_pool(maps) for branch, maps in self.maps_from_trunk(t).items()}

    def forward_from_trunk(self, t: Tensor) -> dict[str, Tensor]:
        """Logits per branch from a (possibly cached) trunk output: how training skips the trunk."""
        return {branch: self.heads[branch](f) for branch, f in self.features_from_trunk(t).items()}

    def features(self, x: Tensor) -> dict[str, Tensor]:
        """Feature vectors (N, FEATURE_DIM) per branch."""
        return self.features_from_trunk(self.trunk_output(x))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.forward_from_trunk(self.trunk_output(x))

    def fused_features(self, x: Tensor, weights: tuple[float, ...]) -> Tensor:
        """The paper's fusion: weighted sum of the branch feature vectors, weights in branch order."""
        if len(weights) != len(self.branches):
            raise ValueError(f"{len(weights)} fusion weights for {len(self.branches)} branches")
        feats = self.features(x)
        return sum(w * feats[b] for w, b in zip(weights, self.branches, strict=True))  # type: ignore[return-value]


class SingleBranchDenseNet(_FrozenAware):
    """One FreezeN network on its own: ``trunk`` (its frozen prefix), ``continuation``, ``head``."""

    def __init__(
        self,
        num_classes: int,
        freeze_upto: str,
        backbone_state: Mapping[str, Tensor] | None = None,
        seed: int = 0,
        name: str = "single",
    ):
        super().__init__()
        self.num_classes = num_classes
        self.freeze_upto = freeze_upto
        self.name = name
        point = freeze_point(freeze_upto)
        template = _Template(num_classes, backbone_state, seed)
        segments = template.segments({point} if point >= 0 else set())
        self.trunk = nn.Sequential(OrderedDict((s.name, s.module) for s in segments if s.last_atom <= point))
        rest = [(s.name, s.module) for s in segments if s.last_atom > point]
        self.continuation = nn.Sequential(OrderedDict(rest + [("tail", template.tail)]))
        self.head = template.head
        self._frozen_paths = ["trunk"]
        _freeze(self.trunk)
        self.train()

    def trunk_output(self, x: Tensor) -> Tensor:
        return self._run_trunk(x)

    def features(self, x: Tensor) -> Tensor:
        return global_average_pool(self.continuation(self.trunk_output(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def build_single(
    freeze_upto: str,
    num_classes: int = 2,
    backbone_state: Mapping[str, Tensor] | None = None,
    seed: int = 0,
    name: str = "single",
) -> SingleBranchDenseNet:
    """A plain one-branch model (``separate`` training, latency baseline); same seed -> same weights."""
    return SingleBranchDenseNet(num_classes, freeze_upto, backbone_state, seed, name)


# ----------------------------------------------------------------------------------------------
# Counting and moving branches between fused and single models


def _parts(model: nn.Module, branch: str) -> Iterator[tuple[str | None, nn.Module]]:
    """(fixed prefix or None for segment-named children, module) making up one branch."""
    if isinstance(model, FusedDenseNet):
        yield None, model.trunk
        yield None, model.branches[branch]
        yield "head", model.heads[branch]
    elif isinstance(model, SingleBranchDenseNet):
        yield None, model.trunk
        yield None, model.continuation
        yield "head", model.head
    else:
        raise TypeError(f"not a DenseNet branch model: {type(model).__name__}")


def _branch_names(model: nn.Module) -> list[str]:
    return list(model.branches) if isinstance(model, FusedDenseNet) else [model.name]  # type: ignore[attr-defined]


def parameter_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per branch, frozen and trainable parameter counts (frozen includes the shared trunk; Table 7)."""
    counts = {}
    for branch in _branch_names(model):
        frozen = trainable = 0
        for _, part in _parts(model, branch):
            for p in part.parameters():
                if p.requires_grad:
                    trainable += p.numel()
                else:
                    frozen += p.numel()
        counts[branch] = {"frozen": frozen, "trainable": trainable}
    return counts


def branch_state_dict(model: nn.Module, branch: str) -> dict[str, Tensor]:
    """One branch's weights under names independent of how the backbone was cut (``stage.layer...``)."""
    state = {}
    for prefix, part in _parts(model, branch):
        for key, value in part.state_dict().items():
            if prefix is not None:
                state[f"{prefix}.{key}"] = value
            else:
                segment, rest = key.split(".", 1)
                state[f"{_stage_of(segment)}.{rest}"] = value
    return state


def _load_branch_state(model: nn.Module, branch: str, state: Mapping[str, Tensor], check_trunk: bool) -> None:
    targets = branch_state_dict(model, branch)  # same tensors as the model holds
    if set(targets) != set(state):
        missing = sorted(set(targets) ^ set(state))
        raise ValueError(f"branch {branch!r}: state keys differ from the model, first: {missing[0]!r}")
    trunk_keys = {f"{_stage_of(k.split('.', 1)[0])}.{k.split('.', 1)[1]}" for k in model.trunk.state_dict()}
    with torch.no_grad():
        for key, target in targets.items():
            if check_trunk and key in trunk_keys:
                if not torch.equal(target, state[key].to(target.device)):
                    raise ValueError(
                        f"branch {branch!r}: shared trunk entry {key!r} differs; cannot share it"
                    )
                continue
            target.copy_(state[key])


def single_from_fused(fused: FusedDenseNet, branch: str) -> SingleBranchDenseNet:
    """A stand-alone copy of one trained branch (export, per-branch evaluation)."""
    single = build_single(fused.freeze_upto[branch], fused.num_classes, name=branch)
    _load_branch_state(single, branch, branch_state_dict(fused, branch), check_trunk=False)
    return single


def fused_from_singles(singles: Mapping[str, SingleBranchDenseNet]) -> FusedDenseNet:
    """Fuse separately trained branches; their common frozen prefix must be identical (it is shared)."""
    names = list(singles)
    classes = {s.num_classes for s in singles.values()}
    if len(classes) != 1:
        raise ValueError(f"branches disagree on the number of classes: {sorted(classes)}")
    fused = FusedDenseNet(classes.pop(), {b: s.freeze_upto for b, s in singles.items()})
    _load_branch_state(fused, names[0], branch_state_dict(singles[names[0]], names[0]), check_trunk=False)
    for b in names[1:]:
        _load_branch_state(fused, b, branch_state_dict(singles[b], b), check_trunk=True)
    return fused

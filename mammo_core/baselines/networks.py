"""Torchvision single-network classifiers for the paper's Table 6: VGG16, InceptionV3, ResNet50, DenseNet-121.

Each network is torchvision's own architecture with its ImageNet classifier replaced by a new linear
layer for the task's classes. VGG16 has two variants (``vgg_classifier``): ``full`` keeps its two
4096-wide layers and replaces only the last one, which is how it is usually transfer-learned and why
its 134M parameters dominate Table 6; ``pooled`` averages the last convolution's map and reads it with
one linear layer (14.7M parameters), the usual small-input variant, for CPU runs where moving 134M
parameters (and three copies of them in every checkpoint) would cost more than the rest together.

Input adaptation (:class:`SingleNetClassifier`): the grey patch arrives as the three equal,
ImageNet-normalised channels that :func:`mammo_core.training.loop.prepare_images` makes, and is resized
bilinearly to the network's input size, ``max(patch size, the network's minimum)``. The minimums are
torchvision's (``weights.meta["min_size"]``): InceptionV3 needs 75 px, VGG16 32 px (five 2x poolings),
DenseNet-121 29 px, ResNet50 1 px. Why upsample instead of changing the stem: the pretrained filters
then see the scale they were trained on, and the architecture stays the published one.

InceptionV3's auxiliary classifier needs a 17x17 ``Mixed_6e`` map, i.e. inputs of about 299 px; below
:data:`INCEPTION_AUX_MIN_INPUT` it is removed (and its pretrained weights skipped), at or above it it is
kept and trained with torchvision's reference weight (``loss + AUX_LOSS_WEIGHT * aux_loss``).

Frozen shallow layers (paper section 4.7: the networks are "initialized by the corresponding
pre-trained model on ImageNet and their shallow layers are frozen while training"): each network is cut
into a frozen ``prefix`` (input adaptation + early layers, eval mode, no gradients) and a trainable
``rest`` (:data:`FROZEN_PREFIX`, level ``baselines.freeze``). ``shallow``: VGG16 conv1-3, InceptionV3
up to ``Mixed_5b``, ResNet50 conv1 + layer1 + layer2, DenseNet-121 up to denseblock2 (the Freeze3
branch's point, :data:`mammo_core.models.fused.DEFAULT_FREEZE_UPTO`): the high-resolution, generic
edge/texture stages. ``deep``: every stage but the last (VGG16 conv1-4, InceptionV3 up to
``Mixed_6e``, ResNet50 up to layer3, DenseNet-121 up to denseblock3 as Freeze1), for CPU runs: under
the branches' budget (2160 rows x 10 epochs on the default) the ``shallow`` rests cost about 10.7
CPU-seconds per batch of 32 for the four networks together, the ``deep`` ones 0.66 (bench/
baselines_train.py), the difference between hours and minutes on two cores; the trained last stage
and head still hold most of the parameters of VGG16, InceptionV3 and ResNet50. Since the augmented
training set is fixed, the prefix outputs are the same every epoch, so training computes them once
(:mod:`mammo_core.baselines.train`) and runs only the rest per batch.

Weights: ``"imagenet"`` reads torchvision's file for the network from the local torch hub cache
(``torch.hub.get_dir()/checkpoints/<file>``) with ``weights_only=True``; nothing is downloaded. When the
file is absent the network is randomly initialised and :attr:`SingleNetClassifier.weights_tag` says so
("none (random init)"), so a table never passes random weights off as transfer learning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from mammo_core.models.fused import OLD_DENSELAYER_KEY
from mammo_core.sources import weight_sources

NETWORKS = ("vgg16", "inception_v3", "resnet50", "densenet121")
INCEPTION_AUX_MIN_INPUT = 299
AUX_LOSS_WEIGHT = 0.4
VGG_POOLED_WIDTH = 512  # channels of VGG16's last convolution
RANDOM_INIT_TAG = "none (random init)"
IMAGENET_TAG = "imagenet"


@dataclass(frozen=True)
class NetworkInfo:
    """What differs between the four networks: builder, ImageNet weights, minimum input, head location."""

    builder: object
    weights: torchvision.models.WeightsEnum
    feature_dim: int  # width of the pooled features the new head reads (AGNet fuses these)


_INFO: Mapping[str, NetworkInfo] = {
    "vgg16": NetworkInfo(torchvision.models.vgg16, torchvision.models.VGG16_Weights.IMAGENET1K_V1, 4096),
    "inception_v3": NetworkInfo(torchvision.models.inception_v3,
                                torchvision.models.Inception_V3_Weights.IMAGENET1K_V1, 2048),
    "resnet50": NetworkInfo(torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1, 2048),
    "densenet121": NetworkInfo(torchvision.models.densenet121,
                               torchvision.models.DenseNet121_Weights.IMAGENET1K_V1, 1024),
}


def _info(network: str) -> NetworkInfo:
    if network not in _INFO:
        raise ValueError(f"unknown baseline network {network!r}; expected one of {', '.join(NETWORKS)}")
    return _INFO[network]


def min_input_size(network: str) -> int:
    """torchvision's minimum input side for ``network`` (its weights' ``min_size`` metadata)."""
    return int(max(_info(network).weights.meta["min_size"]))


def input_size_for(network: str, patch_size: int) -> int:
    """The side the patch is resized to: the patch's own, or the network's minimum when larger."""
    return max(int(patch_size), min_input_size(network))


def imagenet_file(network: str) -> Path:
    """Where torchvision keeps ``network``'s ImageNet weights in the local torch hub cache."""
    _info(network)  # an unknown network is a ValueError naming the four
    return weight_sources.hub_file(network)


def _read_state(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for crafted payloads, RuntimeError for non-torch files
        raise ValueError(f"{path}: not a plain tensor state dict, refused ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return dict(state)


def _build_on_meta(network: str) -> nn.Module:
    """The torchvision architecture without allocating or initialising anything (see :func:`_initialise`)."""
    info = _info(network)
    with torch.device("meta"):
        if network == "inception_v3":
            # transform_input maps ImageNet-normalised inputs to the [-1, 1] scaling Google's weights expect.
            return info.builder(weights=None, aux_logits=True, init_weights=False, transform_input=True)
        if network == "vgg16":
            return info.builder(weights=None, init_weights=False)
        return info.builder(weights=None)


def _initialise(net: nn.Module) -> nn.Module:
    """Allocate on the CPU and initialise with one rule for all four networks.

    The rule is torchvision's for VGG, ResNet and DenseNet (convolutions He-normal on fan-out, linear
    layers N(0, 0.01) with zero bias, batch norm 1/0). Why not each builder's own: InceptionV3's
    truncated normals and VGG16's full-size classifier took about 3 s each to initialise on a CPU core,
    more than a smoke epoch, and the networks were built on the meta device so the replaced heads are
    never initialised at all.
    """
    net.to_empty(device="cpu")
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()  # weight 1, bias 0, running statistics reset
    return net


def _replace_head(net: nn.Module, network: str, num_classes: int, vgg_classifier: str) -> None:
    width = _info(network).feature_dim
    if network == "vgg16" and vgg_classifier == "pooled":  # on the meta device too: nothing allocated yet
        net.avgpool = nn.AdaptiveAvgPool2d(1)
        net.classifier = nn.Linear(VGG_POOLED_WIDTH, num_classes)
    elif network == "vgg16":
        net.classifier[6] = nn.Linear(width, num_classes)
    elif network == "densenet121":
        net.classifier = nn.Linear(width, num_classes)
    else:
        net.fc = nn.Linear(width, num_classes)
        if network == "inception_v3" and net.AuxLogits is not None:
            net.AuxLogits.fc = nn.Linear(net.AuxLogits.fc.in_features, num_classes)


@dataclass(frozen=True)
class FrozenPrefix:
    """A network's cut: the torchvision submodules (paths, in forward order) its frozen prefix runs, and
    those the trainable rest runs before the network's own pooling and head."""

    label: str  # what Table 6 prints
    paths: tuple[str, ...]
    rest: tuple[str, ...]


def _vgg_features(lo: int, hi: int) -> tuple[str, ...]:
    return tuple(f"features.{i}" for i in range(lo, hi))


def _dense(*names: str) -> tuple[str, ...]:
    return tuple(f"features.{n}" for n in names)


_INCEPTION_TO_5B = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                    "Conv2d_4a_3x3", "maxpool2", "Mixed_5b")
_INCEPTION_5C_TO_6E = ("Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e")
_INCEPTION_TOP = ("Mixed_7a", "Mixed_7b", "Mixed_7c")  # after the auxiliary head's tap
_DENSENET_TO_2 = ("conv0", "norm0", "relu0", "pool0", "denseblock1", "transition1", "denseblock2")
_RESNET_STEM = ("conv1", "bn1", "relu", "maxpool", "layer1")
FREEZE_LEVELS = ("shallow", "deep")
FROZEN_PREFIX: Mapping[str, Mapping[str, FrozenPrefix]] = {
    # The early, high-resolution stages only (the paper's wording; what paper.yaml uses on a GPU).
    "shallow": {
        "vgg16": FrozenPrefix("conv1-conv3 (features.0-16)", _vgg_features(0, 17), _vgg_features(17, 31)),
        "inception_v3": FrozenPrefix("Conv2d_1a..Mixed_5b", _INCEPTION_TO_5B, _INCEPTION_5C_TO_6E),
        "resnet50": FrozenPrefix("conv1+layer1+layer2", (*_RESNET_STEM, "layer2"), ("layer3", "layer4")),
        "densenet121": FrozenPrefix("conv0..denseblock2 (Freeze3's point)", _dense(*_DENSENET_TO_2),
                                    _dense("transition2", "denseblock3", "transition3", "denseblock4", "norm5")),
    },
    # Every stage but the last frozen (the last stage + head train: still most of the parameters of VGG16,
    # InceptionV3 and ResNet50); DenseNet-121 at Freeze1's point. CPU-sized: see the module docstring.
    "deep": {
        "vgg16": FrozenPrefix("conv1-conv4 (features.0-23)", _vgg_features(0, 24), _vgg_features(24, 31)),
        "inception_v3": FrozenPrefix("Conv2d_1a..Mixed_6e", _INCEPTION_TO_5B + _INCEPTION_5C_TO_6E, ()),
        "resnet50": FrozenPrefix("conv1+layer1..layer3", (*_RESNET_STEM, "layer2", "layer3"), ("layer4",)),
        "densenet121": FrozenPrefix("conv0..denseblock3 (Freeze1's point)",
                                    _dense(*_DENSENET_TO_2, "transition2", "denseblock3"),
                                    _dense("transition3", "denseblock4", "norm5")),
    },
}


_HEAD_PREFIX = {"vgg16": "classifier.6.", "inception_v3": "fc.", "resnet50": "fc.", "densenet121": "classifier."}


def _load_imagenet(net: nn.Module, network: str, path: Path, vgg_classifier: str) -> None:
    """Load every ImageNet weight except the classifier(s) the new head replaced; check the rest strictly."""
    state = _read_state(path)
    if network == "densenet121":  # pre-0.4 key names ("norm.1") in torchvision's published file
        state = {(m.group(1) + m.group(2)) if (m := OLD_DENSELAYER_KEY.match(k)) else k: v for k, v in state.items()}
    heads = ("classifier." if vgg_classifier == "pooled" else _HEAD_PREFIX[network], "AuxLogits.fc.")
    dropped = ("AuxLogits.",) if getattr(net, "AuxLogits", True) is None else ()
    body = {k: v for k, v in state.items() if not k.startswith(heads + dropped)}
    own = net.state_dict()
    for key, value in body.items():
        if key not in own or tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(f"{path}: not {network}'s ImageNet state dict; first mismatched key {key!r}")
    missing = [k for k in own if k not in body and not k.startswith(heads) and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{path}: not {network}'s ImageNet state dict; first missing key {missing[0]!r}")
    net.load_state_dict(body, strict=False)


class SingleNetClassifier(nn.Module):
    """A torchvision network with a new head, fed 3-channel normalised patches of any side.

    ``forward`` returns the class logits (the auxiliary ones never leave ``training_logits``);
    ``features`` returns the pooled penultimate features the head reads (AGNet fuses these). Every
    forward is ``prefix`` (frozen: no gradients, eval mode whatever ``train()`` says) then ``rest``, the
    same arithmetic as torchvision's own forward (tested), so outputs of :meth:`prefix` can be cached and
    fed to :meth:`features_and_logits_from_prefix` / :meth:`training_logits_from_prefix`.
    """

    def __init__(self, network: str, num_classes: int, *, input_size: int, weights: str = "none",
                 vgg_classifier: str = "full", freeze: str = "shallow", seed: int = 0):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if input_size < min_input_size(network):
            raise ValueError(f"{network} needs inputs of at least {min_input_size(network)} px, got {input_size}")
        if weights not in ("imagenet", "none"):
            raise ValueError(f"baselines.weights must be 'imagenet' or 'none', got {weights!r}")
        if freeze not in FREEZE_LEVELS:
            raise ValueError(f"baselines.freeze must be one of {', '.join(FREEZE_LEVELS)}, got {freeze!r}")
        if vgg_classifier not in ("full", "pooled"):
            raise ValueError(f"baselines.vgg_classifier must be 'full' or 'pooled', got {vgg_classifier!r}")
        self.vgg_classifier = vgg_classifier if network == "vgg16" else "full"
        self.network = network
        self.num_classes = num_classes
        self.input_size = int(input_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = _build_on_meta(network)
            if network == "inception_v3" and input_size < INCEPTION_AUX_MIN_INPUT:
                net.AuxLogits = None  # its 5x5 conv needs a 17x17 Mixed_6e map (~299 px inputs)
                net.aux_logits = False
            _replace_head(net, network, num_classes, self.vgg_classifier)
            _initialise(net)
        self.weights_tag = RANDOM_INIT_TAG
        if weights == "imagenet" and imagenet_file(network).is_file():
            _load_imagenet(net, network, imagenet_file(network), self.vgg_classifier)
            self.weights_tag = IMAGENET_TAG
        self.net = net
        self.frozen_prefix = FROZEN_PREFIX[freeze][network]
        for module in self._modules_at(self.frozen_prefix.paths):
            module.requires_grad_(False)
        self.train()

    def _modules_at(self, paths: tuple[str, ...]) -> list[nn.Module]:
        return [self.net.get_submodule(path) for path in paths]

    def train(self, mode: bool = True):  # type: ignore[override]
        super().train(mode)
        for module in self._modules_at(self.frozen_prefix.paths):
            module.eval()  # frozen batch-norm statistics too: the prefix is a fixed function
        return self

    def parameter_split(self) -> dict[str, int]:
        """Frozen and trainable parameter counts (Table 6)."""
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"frozen": frozen, "trainable": trainable}

    def prefix(self, x: Tensor) -> Tensor:
        """Input adaptation + the frozen shallow layers, without a graph (fixed for fixed inputs)."""
        with torch.no_grad():
            h = self.adapt(x)
            if self.network == "inception_v3" and self.net.transform_input:
                h = self.net._transform_input(h)
            for module in self._modules_at(self.frozen_prefix.paths):
                h = module(h)
        return h

    def prefix_to_channels_last(self) -> None:
        """Store the frozen prefix's weights channels-last (its convolutions' fast CPU layout); the prefix is
        never trained, so nothing else sees the change, and a state dict holds the same values."""
        for module in self._modules_at(self.frozen_prefix.paths):
            module.to(memory_format=torch.channels_last)

    def _rest(self, h: Tensor) -> tuple[Tensor, Tensor | None]:
        """(pooled features the head reads, auxiliary logits or None) from a prefix output."""
        aux = None
        for module in self._modules_at(self.frozen_prefix.rest):
            h = module(h)
        net = self.net
        if self.network == "inception_v3":
            if self.has_aux and self.training:
                aux = net.AuxLogits(h)
            for module in self._modules_at(_INCEPTION_TOP):
                h = module(h)
            return torch.flatten(net.dropout(net.avgpool(h)), 1), aux
        if self.network == "densenet121":
            return torch.flatten(F.adaptive_avg_pool2d(F.relu(h), (1, 1)), 1), aux
        h = torch.flatten(net.avgpool(h), 1)
        if self.network == "vgg16" and self.vgg_classifier == "full":
            for module in list(net.classifier)[:6]:
                h = module(h)
        return h, aux

    def training_logits_from_prefix(self, h: Tensor) -> tuple[Tensor, Tensor | None]:
        """(logits, auxiliary logits or None) from a :meth:`prefix` output: what the training loss needs."""
        features, aux = self._rest(h)
        return self.head(features), aux

    def features_and_logits_from_prefix(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(pooled penultimate features, logits) from a :meth:`prefix` output."""
        features, _ = self._rest(h)
        return features, self.head(features)

    @property
    def has_aux(self) -> bool:
        return self.network == "inception_v3" and self.net.AuxLogits is not None

    def adapt(self, x: Tensor) -> Tensor:
        """Resize (N, 3, S, S) to the network's input side; a no-op when the sides match."""
        if x.shape[-1] == self.input_size and x.shape[-2] == self.input_size:
            return x
        return F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                             antialias=x.shape[-1] > self.input_size)

    def training_logits(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(logits, auxiliary logits or None): what the training loss needs in train mode."""
        return self.training_logits_from_prefix(self.prefix(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.features_and_logits(x)[1]

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(pooled penultimate features (N, feature_dim), logits (N, C)) from one forward pass."""
        return self.features_and_logits_from_prefix(self.prefix(x))

    def features(self, x: Tensor) -> Tensor:
        """The pooled penultimate features (N, feature_dim): the input of the new head."""
        return self.features_and_logits(x)[0]

    @property
    def head(self) -> nn.Linear:
        if self.network == "vgg16":
            return self.net.classifier if self.vgg_classifier == "pooled" else self.net.classifier[6]
        if self.network == "densenet121":
            return self.net.classifier
        return self.net.fc

    @property
    def feature_dim(self) -> int:
        return self.head.in_features


def build_baseline(network: str, num_classes: int, patch_size: int, *, weights: str = "none",
                   vgg_classifier: str = "full", freeze: str = "shallow", seed: int = 0) -> SingleNetClassifier:
    """``network`` with a ``num_classes`` head, sized for ``patch_size`` patches (upsampled to its minimum)."""
    return SingleNetClassifier(network, num_classes, input_size=input_size_for(network, patch_size),
                               weights=weights, vgg_classifier=vgg_classifier, freeze=freeze, seed=seed)


def parameter_millions(model: nn.Module) -> float:
    """Parameter count in millions (Table 6's size column)."""
    return sum(p.numel() for p in model.parameters()) / 1e6

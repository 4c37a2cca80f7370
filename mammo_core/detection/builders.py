"""The three detectors compared on one split and budget: ours, ours without hash head, ResNet-50 FPN.

All three are torchvision ``FasterRCNN`` with the same transform (ImageNet normalisation, no resizing:
inputs arrive with long side ``input_size``), the same RPN and ROI settings, and differ only where the
comparison means them to: backbone (fused DenseNet + FPN vs ResNet-50 + FPN) and box predictor (hash head
vs linear). Ours uses a narrower FPN and box head (``fpn_channels``, ``representation``) than torchvision's
256 / 1024: it is part of the design whose latency is measured, and the report states it.

A detector is rebuilt from a :class:`DetectorConfig` (plain JSON) and a state dict, so serving needs neither
the train stage nor pickles. Weights are loaded with ``weights_only=True``; a file for another class list
or architecture is refused with the file and the difference named.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from mammo_core.detection.backbone import FusedBackbone, FusedFeatureMaps
from mammo_core.detection.heads import HashBoxPredictor, PlainBoxPredictor
from mammo_core.models.fused import DEFAULT_FREEZE_UPTO, FusedDenseNet
from mammo_core.sources import weight_sources
from mammo_core.training.loop import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from mammo_core.config import DetectParams

MODELS = ("ours", "ours_nohash", "frcnn_r50")


@dataclass
class DetectorConfig:
    """Everything needed to rebuild a detector (stored next to its weights as JSON)."""

    model: str
    classes: list[str]
    input_size: int
    anchor_sizes: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    hash_bits: int = 48
    representation: int = 256
    fpn_channels: int = 128
    freeze_upto: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_FREEZE_UPTO))
    fusion_weights: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.3])
    proposals_train: int = 2000
    proposals_test: int = 1000
    roi_samples: int = 512
    score_threshold: float = 0.001
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown detector {self.model!r}; use one of {MODELS}")
        if not self.classes:
            raise ValueError("a detector needs at least one class")

    @property
    def num_classes(self) -> int:
        """Classes plus background (torchvision's label 0)."""
        return len(self.classes) + 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> DetectorConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"detector config has unknown keys {unknown}")
        return cls(**dict(value))


def config_from_params(params: DetectParams, model: str, classes: Sequence[str], input_size: int | None = None,
                       freeze_upto: Mapping[str, str] | None = None) -> DetectorConfig:
    """The :class:`DetectorConfig` of ``model`` under the ``detect`` params section (stage and benches alike).

    ``input_size`` defaults to ``params.max_size``; ``freeze_upto`` to the train stage's default freeze points.
    """
    return DetectorConfig(
        model=model, classes=list(classes), input_size=input_size or params.max_size,
        anchor_sizes=list(params.anchor_sizes), aspect_ratios=list(params.aspect_ratios),
        hash_bits=params.hash_bits, representation=params.representation, fpn_channels=params.fpn_channels,
        freeze_upto=dict(freeze_upto or DEFAULT_FREEZE_UPTO), fusion_weights=list(params.fusion_weights),
        proposals_train=params.proposals_train, proposals_test=params.proposals_test,
        roi_samples=params.roi_samples, seed=params.seed)


def _anchors(sizes: Sequence[int], ratios: Sequence[float], levels: int) -> AnchorGenerator:
    """Every size and ratio on every feature level, for every detector alike.

    Why not FPN's one size per level: lesions here span 5-60 px, and with one size per level a lesion
    between two sizes meets anchors of a single, ill-fitting shape on a coarse grid. Measured: ours without
    hash head, trained to overfit six training mammograms (60 epochs of lesion windows), reached AP50 0.04
    with one size per level and 0.30 with every size on every level; torchvision's ResNet-50 FPN, which the
    old rule already gave every size on every level (five levels, four sizes), reached 0.52.
    """
    return AnchorGenerator((tuple(int(s) for s in sizes),) * levels, (tuple(float(r) for r in ratios),) * levels)


class InputSizedTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform without its resize: inputs arrive already sized.

    Why: the data layer already scales each breast crop to ``input_size`` (and the serving path does the
    same), and training windows (``detect.train_crop``) must reach the network at that same scale;
    torchvision's transform would blow a 256-px window up to ``min_size``.
    """

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None
               ) -> tuple[Tensor, dict[str, Tensor] | None]:
        return image, target


def _input_sized(model: FasterRCNN) -> FasterRCNN:
    t = model.transform
    model.transform = InputSizedTransform(t.min_size, t.max_size, t.image_mean, t.image_std,
                                          size_divisible=t.size_divisible)
    return model


def freeze_feature_extractor(model: FasterRCNN) -> int:
    """Freeze ours' fused extractor (trunk and branches) so that only FPN, RPN and box head train.

    Why: the branches were trained on lesion patches by the train stage; on a small detection budget
    the heads learn to use those features far sooner than the whole network re-learns them. Returns the
    number of parameters frozen. torchvision's ResNet-50 baseline keeps its own rule (see
    :func:`build_frcnn_r50`).
    """
    body = getattr(model.backbone, "body", None)
    if not isinstance(body, FusedFeatureMaps):
        raise TypeError("freeze_feature_extractor is for the fused detectors (ours, ours_nohash)")
    frozen = 0
    for p in body.parameters():
        if p.requires_grad:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def _common(config: DetectorConfig) -> dict[str, Any]:
    """Transform, RPN and ROI settings shared by every detector (the comparison's common budget).

    The score threshold is low (0.001, as COCO evaluations use) so that AP sees the whole ranking of an
    under-trained detector too; callers that want confident boxes filter by score (``mammo predict``).
    """
    return {"min_size": config.input_size, "max_size": config.input_size,
            "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
            "rpn_pre_nms_top_n_train": config.proposals_train, "rpn_post_nms_top_n_train": config.proposals_train,
            "rpn_pre_nms_top_n_test": config.proposals_test, "rpn_post_nms_top_n_test": config.proposals_test,
            "box_batch_size_per_image": config.roi_samples, "box_score_thresh": config.score_threshold}


def build_ours(config: DetectorConfig, fused: FusedDenseNet | None = None) -> FasterRCNN:
    """Faster R-CNN on the fused extractor; ``fused`` None builds a randomly initialised one (to load into).

    Every new layer is initialised under ``config.seed`` without touching the caller's random state.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if fused is None:
            fused = FusedDenseNet(1, config.freeze_upto, seed=config.seed)
        backbone = FusedBackbone(fused, config.fusion_weights, config.fpn_channels)
        levels = backbone.num_levels
        roi_pool = MultiScaleRoIAlign([str(i) for i in range(levels - 1)], output_size=7, sampling_ratio=2)
        box_head = TwoMLPHead(config.fpn_channels * 7 * 7, config.representation)
        if config.model == "ours":
            predictor: nn.Module = HashBoxPredictor(config.representation, config.num_classes, config.hash_bits,
                                                    seed=config.seed)
        else:
            predictor = PlainBoxPredictor(config.representation, config.num_classes)
        return _input_sized(FasterRCNN(backbone, num_classes=None, rpn_anchor_generator=_anchors(
            config.anchor_sizes, config.aspect_ratios, levels), box_roi_pool=roi_pool, box_head=box_head,
            box_predictor=predictor, **_common(config)))


def build_frcnn_r50(config: DetectorConfig, weights: str = "none") -> tuple[FasterRCNN, str]:
    """torchvision's ``fasterrcnn_resnet50_fpn`` architecture, and a tag saying which weights it starts from.

    ``weights``: ``coco`` (the detection checkpoint, predictor re-initialised for our classes), ``imagenet``
    (the ResNet-50 classification weights), ``none``, or a path to a ResNet-50 state dict. Files come from
    the local torch hub cache only; when absent the model starts from random init and the tag says so.

    Freezing follows what was loaded, not what was asked for: torchvision's rule (first ResNet stages frozen,
    3 trainable layers) only makes sense for pretrained stages; a network that starts from random values
    because no file was found trains all 5 layers, or the baseline would keep random frozen features.
    The tag ends with the trainable parameter count, so Table 8 states it.
    """
    path = weight_sources.r50_detector_file(weights)
    loaded = path is not None and path.is_file()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        backbone = _resnet_fpn_extractor(body, 3 if loaded else 5)
        model = FasterRCNN(backbone, num_classes=config.num_classes,
                           rpn_anchor_generator=_anchors(config.anchor_sizes, config.aspect_ratios, 5),
                           **_common(config))
        _input_sized(model)
    if weights == "none":
        tag = "none (random init)"
    elif not loaded:
        tag = f"none (random init; {weights} weights not in the local cache: {path.name})"
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if weights == "coco":
            state = {k: v for k, v in state.items() if not k.startswith("roi_heads.box_predictor.")}
            model.load_state_dict(state, strict=False)
        else:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            model.backbone.body.load_state_dict(state, strict=False)
        tag = weights if weights in ("coco", "imagenet") else f"file {path.name}"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, f"{tag}, {3 if loaded else 5} ResNet layers trainable ({trainable / 1e6:.1f}M trainable parameters)"


def build_detector(config: DetectorConfig, fused: FusedDenseNet | None = None, r50_weights: str = "none",
                   freeze_extractor: bool = False) -> tuple[FasterRCNN, str]:
    """(detector, weights tag) for ``config.model``.

    ``freeze_extractor`` freezes a fused detector's extractor (:func:`freeze_feature_extractor`) and says
    so in the tag; the ResNet-50 baseline ignores it and keeps its own rule.
    """
    if config.model == "frcnn_r50":
        return build_frcnn_r50(config, r50_weights)
    tag = "train-stage fused DenseNet" if fused is not None else "none (random init)"
    model = build_ours(config, fused)
    if freeze_extractor:
        tag += f", extractor frozen ({freeze_feature_extractor(model) / 1e6:.1f}M parameters)"
    return model, tag


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """{"trainable", "frozen"}: parameters the optimiser updates (``requires_grad``) and the rest (Table 8)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "frozen": sum(p.numel() for p in model.parameters()) - trainable}


def parameter_millions(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def load_detector(weights_path: str | os.PathLike, config: DetectorConfig,
                  expected_classes: Sequence[str] | None = None) -> FasterRCNN:
    """A detector built from ``config`` with the weights of ``weights_path`` (``weights_only=True``).

    ValueError naming the file when its classes differ from ``expected_classes`` or from the config's, or
    when it holds another architecture.
    """
    path = Path(weights_path)
    if expected_classes is not None and list(expected_classes) != list(config.classes):
        raise ValueError(f"{path}: detector weights for classes {config.classes}, expected {list(expected_classes)}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a plain detector state dict, refused ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: not a detector state dict")
    score = state.get("roi_heads.box_predictor.cls_score.weight")
    if score is not None and int(score.shape[0]) != config.num_classes:
        raise ValueError(f"{path}: detector weights for {int(score.shape[0]) - 1} classes, but the config lists "
                         f"{len(config.classes)} ({', '.join(config.classes)})")
    model, _ = build_detector(config)
    expected = model.state_dict()
    from mammo_core.training.checkpoint import check_same_architecture

    check_same_architecture(path, state, expected)
    model.load_state_dict(state)
    return model.eval()

"""Typed params: the only place where pipeline parameters are defined.

Params files (``params/*.yaml``) are validated against these models; an unknown key or a bad value is
rejected with a message naming the file and the dotted key, so a typo never silently falls back to a
default. ``--set section.key=value`` overrides are applied before validation and named the same way.
Each stage's cache key covers only its own section(s), which is why the sections are small and separate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from mammo_core.errors import ParamsError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunParams(_Section):
    """Settings of the run itself; not part of any stage key."""

    name: str = "mammo"
    experiment: str = "mammo-fusion"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    task_runner: Literal["thread", "process", "dask"] = "thread"
    dask_address: str | None = Field(default=None, description="scheduler of an existing Dask cluster; "
                                     "None starts a LocalCluster")
    gpus: int = Field(default=0, ge=0, le=64, description="GPUs per Dask worker (LocalCluster) / per host")
    dask_workers: int = Field(default=2, ge=1, le=256, description="LocalCluster worker processes (dask runner)")


class DataParams(_Section):
    """Where the raw dataset comes from (acquire)."""

    source: Literal["phantom", "cbis-tcia", "cbis-local", "cbis-jpeg"] = "phantom"
    root: str | None = Field(
        default=None, description="local dataset root (cbis-local, cbis-jpeg) or download target (cbis-tcia)"
    )
    # phantom
    n_patients: int = Field(default=120, gt=0, le=100_000)
    image_shape: tuple[int, int] = (1024, 640)
    seed: int = 0
    # cbis-tcia
    base_url: str = "https://services.cancerimagingarchive.net/nbia-api/services/v1"
    collection: str = "CBIS-DDSM"
    limit: int | None = Field(default=None, gt=0)
    download_workers: int = Field(default=4, ge=1, le=32)

    @model_validator(mode="after")
    def _root_for_real_data(self) -> DataParams:
        if self.source in ("cbis-local", "cbis-jpeg") and not self.root:
            raise ValueError(f"data.root is required when data.source is {self.source!r}")
        if min(self.image_shape) < 64:
            raise ValueError("data.image_shape must be at least 64 pixels on each side")
        return self


class TaskParams(_Section):
    """What is being predicted (DESIGN.md §6)."""

    classes: Literal["seven", "five", "binary"] = "seven"


class CurateParams(_Section):
    """Parsing, resolution, splitting and the preprocessed image cache."""

    max_side: int = Field(default=1024, ge=64, le=8192, description="long side of cached images, pixels")
    val_fraction: float = Field(default=0.15, gt=0.0, lt=0.5)
    split_seed: int = 0
    workers: int = Field(default=2, ge=1, le=64)
    min_box_area: int = Field(default=4, ge=1)
    mask_aspect_tolerance: float = Field(default=0.01, gt=0.0, lt=0.2)
    max_image_mb: int = Field(default=512, ge=1, le=65536, description="decoded size an image header may "
                              "declare, MiB (a 5000x4000 16-bit mammogram is 38); larger is quarantined undecoded")
    image_time_limit_s: float = Field(default=300.0, gt=0, le=86400, description="per image; a worker past it "
                                      "is killed, the image retried once alone, then quarantined")
    allow_burned_in_annotation: bool = Field(default=False, description="curate images whose DICOM says "
                                             "BurnedInAnnotation YES (text in the pixels); else quarantined")


class PatchesParams(_Section):
    """ROI-centred and NORMAL patches (mammo_core.data.patches)."""

    size: int = Field(default=64, ge=16, le=512)
    context: float = Field(default=0.25, ge=0.0, le=2.0, description="margin around the lesion box, fraction")
    min_size_px: int = Field(default=32, ge=4, description="minimum crop side at cache resolution")
    normals_per_image: int = Field(default=2, ge=0, le=50)
    seed: int = 0
    intensity: Literal["breast_window", "global"] = "breast_window"
    workers: int = Field(default=2, ge=1, le=64)


class AugmentParams(_Section):
    """The paper's augmentation policy, materialised as seeded copies (mammo_core.data.augment)."""

    copies: int = Field(default=4, ge=0, le=100)
    seed: int = 0
    batch: int = Field(default=256, ge=1)


class _Schedule(_Section):
    """The paper's training schedule (mammo_core.training.schedule), shared by the branches and the single-network
    baselines so that both train under the same protocol. Paper values in paper.yaml."""

    epochs: int = Field(default=100, ge=1, le=10_000)
    batch_size: int = Field(default=32, ge=1, le=4096)
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    lr_step: int = Field(default=20, ge=1)
    lr_gamma: float = Field(default=10.0, ge=1, description="divide the lr by this every lr_step epochs")
    warmup_epochs: int = Field(default=5, ge=0)
    warmup_lr: float = Field(default=1e-5, gt=0)
    rollback_every: int = Field(default=5, ge=0, description="0 disables the roll-back to the best checkpoint")


class TrainParams(_Schedule):
    """Freeze1..3 transfer learning (mammo_core.models.fused, mammo_core.training.loop). Paper values in paper.yaml."""

    weights: str = Field(default="none", description="imagenet | none | path to a DenseNet-121 state dict")
    freeze_upto: dict[str, str] | None = Field(
        default=None,
        description="branch -> last frozen stage or dense layer (Freeze1 freezes the most); "
        "None = mammo_core.models.fused.DEFAULT_FREEZE_UPTO",
    )
    mode: Literal["shared", "separate"] = "shared"
    cache_trunk: bool = Field(
        default=True,
        description="compute the frozen layers' outputs once, not every epoch (same weights): the shared "
        "trunk and each branch's own frozen segments, or in mode separate each network's frozen prefix",
    )
    num_workers: int = Field(default=0, ge=0, le=64)
    seed: int = 0

    @model_validator(mode="after")
    def _three_branches(self) -> TrainParams:
        if self.freeze_upto is not None and sorted(self.freeze_upto) != ["freeze1", "freeze2", "freeze3"]:
            named = sorted(self.freeze_upto)
            raise ValueError(f"train.freeze_upto must name freeze1, freeze2 and freeze3, got {named}")
        return self


class FeaturesParams(_Section):
    """Feature export and the fusion of the three branches (mammo_core.codes.features, mammo_core.codes.fusion)."""

    fusion_weights: tuple[float, float, float] | Literal["search"] = "search"
    grid_step: float = Field(default=0.1, gt=0.0, le=0.5)
    batch_size: int = Field(default=128, ge=1)
    probe_seed: int = 0

    @model_validator(mode="after")
    def _weights(self) -> FeaturesParams:
        if self.fusion_weights != "search" and (min(self.fusion_weights) < 0 or sum(self.fusion_weights) <= 0):
            raise ValueError("features.fusion_weights must be non-negative with a positive sum, or 'search'")
        return self


class HashingParams(_Section):
    """The divide-and-encode hash decoder and its FC ablation (models.hashing, codes.retrieval)."""

    bits: list[int] = Field(default_factory=lambda: [12, 24, 32, 48])
    beta: float = Field(default=1.0, gt=0)
    eps: float = Field(default=0.1, ge=0, lt=0.5)
    objective: Literal["triplet", "classification", "both"] = "both"
    epochs: int = Field(default=60, ge=1)
    batch_size: int = Field(default=128, ge=2)
    lr: float = Field(default=1e-3, gt=0)
    margin: float = Field(default=0.5, ge=0)
    quantization_weight: float = Field(default=0.01, ge=0)
    seed: int = 0
    seeds: int = Field(default=3, ge=1, le=50, description="train each decoder with seeds seed, seed+1, ... "
                       "(this many); Table 4 reports mean, spread and the paired hash - FC difference")

    @model_validator(mode="after")
    def _bits(self) -> HashingParams:
        if not self.bits or any(b < 1 or b > 512 for b in self.bits) or len(set(self.bits)) != len(self.bits):
            raise ValueError(f"hashing.bits must be distinct values in 1..512, got {self.bits}")
        return self


class ClassifyParams(_Section):
    """SVM + kNN + RF on the hash codes and their fusion (mammo_core.codes.classifiers)."""

    codes: str = Field(default="hash@48", pattern=r"^(hash|fc)@\d+$", description="decoder@bits from hashing")
    search: bool = False
    fusion_weights: dict[str, float] | Literal["search"] = "search"
    grid_step: float = Field(default=0.1, gt=0.0, le=0.5)
    n_boot: int = Field(default=1000, ge=0, le=100_000)
    seed: int = 0
    svm: dict[str, Any] = Field(default_factory=dict)
    knn: dict[str, Any] = Field(default_factory=dict)
    rf: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, dict[str, list[Any]]] = Field(default_factory=dict)
    latency_batch_sizes: list[PositiveInt] = Field(
        default_factory=lambda: [1, 32], min_length=1,
        description="batch sizes at which the trained chain and the single networks are timed (Table 6)")
    latency_repeats: int = Field(default=5, ge=1, le=1000)

    @property
    def decoder(self) -> str:
        return self.codes.split("@")[0]

    @property
    def bits(self) -> int:
        return int(self.codes.split("@")[1])


class DetectParams(_Section):
    """Faster R-CNN on the fused backbone with a hash classification head, and its baselines (mammo_core.detection)."""

    classes: Literal["four", "two"] = Field(
        default="four", description="four: mass/calc x benign/malignant (BWC counted benign); two: mass vs calc"
    )
    max_size: int = Field(default=512, ge=64, le=4096, description="long side of detector input, pixels")
    max_images: int | None = Field(default=None, ge=1, description="at most this many images per split (None: all)")
    epochs: int = Field(default=10, ge=1, le=10_000)
    batch_size: int = Field(default=2, ge=1, le=256)
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=1e-4, ge=0)
    max_rotation: float = Field(default=10.0, ge=0, le=180, description="augmentation rotation range, degrees")
    train_crop: int | None = Field(default=256, ge=32, le=4096,
                                   description="train on windows of this side (None: whole images)")
    positive_fraction: float = Field(default=0.75, ge=0, le=1,
                                     description="share of training windows placed on a lesion")
    train_backbone: bool = Field(default=False, description="also train ours' fused extractor (default: "
                                 "frozen, FPN/RPN/box head train; the ResNet-50 baseline keeps torchvision's rule)")
    cache_extractor: bool = Field(default=True, description="with the extractor frozen: run it once per image "
                                  "and cut ours' training windows from its cached maps (mammo_core.detection."
                                  "feature_cache); windows of every detector then lie on a 32-px grid")
    augment: bool = Field(default=False, description="flip/rotate training windows (every detector alike); "
                          "refused with cache_extractor on a frozen extractor: cached maps cannot be rotated")
    val_images: int | None = Field(default=None, ge=1, description="score each epoch on the first N validation "
                                   "images (fixed subset; None: all); picks the best epoch")
    anchor_sizes: list[int] = Field(default_factory=lambda: [16, 32, 64, 128])
    aspect_ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0])
    hash_bits: int = Field(default=48, ge=1, le=512)
    representation: int = Field(default=256, ge=8, le=4096, description="box head width of ours")
    fpn_channels: int = Field(default=128, ge=8, le=1024, description="FPN channels of ours")
    fusion_weights: list[float] = Field(default_factory=lambda: [0.4, 0.4, 0.3],
                                        description="branch weights of the fused maps (paper: 0.4/0.4/0.3)")
    proposals_train: int = Field(default=2000, ge=1, description="RPN proposals kept per image in training")
    proposals_test: int = Field(default=1000, ge=1, description="RPN proposals kept per image at inference")
    roi_samples: int = Field(default=512, ge=1, description="proposals sampled per image for the box head loss")
    baselines: list[Literal["ours_nohash", "frcnn_r50"]] = Field(
        default_factory=lambda: ["ours_nohash", "frcnn_r50"]
    )
    r50_weights: str = Field(default="imagenet", description="coco | imagenet | none | path to a state dict")
    latency_repeats: int = Field(default=10, ge=1)
    examples: int = Field(default=3, ge=0, le=50, description="example figures of predicted vs true boxes")
    n_boot: int = Field(default=1000, ge=10, description="bootstrap resamples of the test images for Table 8's CIs")
    seed: int = 0

    @model_validator(mode="after")
    def _cache_without_pixel_augmentation(self) -> DetectParams:
        if self.cache_extractor and not self.train_backbone and self.augment:
            raise ValueError("detect.augment true needs the extractor on every augmented window: set "
                             "detect.cache_extractor false, or detect.augment false")
        return self


BaselineNetwork = Literal["vgg16", "inception_v3", "resnet50", "densenet121"]


class BaselinesParams(_Section):
    """Single-network classifiers and classic baselines (mammo_core.baselines).

    No schedule or row budget of their own: every network trains on the train stage's rows under the
    ``train:`` section's schedule (epochs, batch, lr, warm-up, roll-back, seed), so a comparison with the
    branches cannot drift into an unequal budget (tasks.stages.baselines.baseline_schedule).
    """

    networks: list[BaselineNetwork] = Field(
        default_factory=lambda: ["vgg16", "inception_v3", "resnet50", "densenet121"]
    )
    classic: list[Literal["sift_bovw_svm", "agnet"]] = Field(default_factory=lambda: ["sift_bovw_svm", "agnet"])
    weights: Literal["imagenet", "none"] = Field(
        default="none", description="imagenet: torchvision weight files from the local torch hub cache "
        "(random init, tagged, when absent); none: random init"
    )
    vgg_classifier: Literal["full", "pooled"] = Field(
        default="full", description="full: torchvision's 25088-4096-4096 classifier (last layer replaced); "
        "pooled: global average pooling + one linear layer (CPU-sized, 14.7M instead of 134M parameters)"
    )
    keep_weights: bool = Field(default=True, description="store each network's best weights in its unit")
    freeze: Literal["shallow", "deep"] = Field(
        default="shallow", description="frozen prefix of each network (mammo_core.baselines.networks.FROZEN_PREFIX): "
        "shallow = the early stages (paper 4.7); deep = every stage but the last (CPU-sized)"
    )
    latency_repeats: int = Field(default=10, ge=1)
    n_boot: int = Field(default=1000, ge=0, le=100_000)
    sift_image_size: int = Field(default=128, ge=16, le=1024, description="patches are resized to this for SIFT")
    sift_max_keypoints: int = Field(default=64, ge=1)
    sift_vocabulary: int = Field(default=64, ge=2, le=10_000)
    sift_svm_c: float = Field(default=10.0, gt=0)
    agnet_pair: tuple[BaselineNetwork, BaselineNetwork] = ("vgg16", "inception_v3")
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> BaselinesParams:
        if len(set(self.networks)) != len(self.networks):
            raise ValueError(f"baselines.networks lists a network twice: {self.networks}")
        if "agnet" in self.classic:
            if self.agnet_pair[0] == self.agnet_pair[1]:
                raise ValueError(f"baselines.agnet_pair must name two different networks, got {list(self.agnet_pair)}")
            missing = [n for n in self.agnet_pair if n not in self.networks]
            if missing:
                raise ValueError(f"baselines.agnet_pair names {missing}, which baselines.networks does not train")
        return self


class Params(BaseModel):
    """The whole params file."""

    @model_validator(mode="after")
    def _classify_codes_exist(self) -> Params:
        if self.classify.bits not in self.hashing.bits:
            raise ValueError(f"classify.codes {self.classify.codes!r}: hashing.bits {self.hashing.bits} has no "
                             f"{self.classify.bits}")
        return self

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: RunParams = RunParams()
    data: DataParams = DataParams()
    task: TaskParams = TaskParams()
    curate: CurateParams = CurateParams()
    patches: PatchesParams = PatchesParams()
    augment: AugmentParams = AugmentParams()
    train: TrainParams = TrainParams()
    features: FeaturesParams = FeaturesParams()
    hashing: HashingParams = HashingParams()
    classify: ClassifyParams = ClassifyParams()
    detect: DetectParams = DetectParams()
    baselines: BaselinesParams = BaselinesParams()

    def section(self, name: str) -> dict[str, Any]:
        """One section as plain JSON-able data (what a stage key hashes)."""
        return getattr(self, name).model_dump(mode="json")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) < 2 or not all(parts):
        raise ParamsError(f"--set {dotted}: expected section.key=value")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ParamsError(f"--set {dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=v`` -> ("a.b", v) with v parsed as YAML (so 3 is an int, [1, 2] a list, null None)."""
    if "=" not in text:
        raise ParamsError(f"--set {text}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ParamsError(f"--set {key}: value {raw!r} is not valid YAML: {exc}") from exc
    return key.strip(), value


def _format_errors(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def load_params(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read, override and validate a params file; ``None`` means all defaults."""
    source = str(path) if path is not None else "<defaults>"
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ParamsError(f"{source}: params file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ParamsError(f"{source}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ParamsError(f"{source}: top level must be a mapping of sections")
        tree = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    if overrides:
        source = f"{source} (with --set {', '.join(overrides)})"
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        raise ParamsError(_format_errors(source, exc)) from None

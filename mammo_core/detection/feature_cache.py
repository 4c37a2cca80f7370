"""Ours' frozen extractor run once per image, its maps kept and cut into the training windows.

Why: with ``detect.train_backbone`` false the fused extractor (trunk + Freeze1..3 branches) of ours and of
ours-without-hash never changes, yet training ran it again on every window of every epoch, for both
detectors, and again on every validation image after every epoch: most of the detect stage's time, and
all of it spent recomputing the same numbers. Here each image goes through the extractor once (the
detector's own transform: normalisation, padding to a multiple of 32), the three maps are kept in half
precision (about 3 MB per 512 x 256 image), and both fused detectors read them for every epoch, for
validation and for the test predictions.

What a window is then: a training window placed on the grid of the coarsest map (``WINDOW_GRID`` = 32
input pixels) cuts the same cells out of every map, so the FPN, RPN and box head see the features of those
pixels *computed in the whole image*, i.e. what they see at inference on whole breasts, instead of the
features of the window alone (whose border cells saw zero padding). The pixel path (the ResNet-50 baseline,
whose backbone trains) is given the very same windows. Pixel augmentation (flips, rotation) would need the
extractor on every window again, so the cached path refuses it: the stage trains every detector without
it (``detect.augment`` false), which keeps their schedules equal.

The cache is tied to the extractor it was computed with: :meth:`FeatureCache.check` compares a
fingerprint of the extractor's weights, so a detector with another extractor is refused, never served
someone else's features.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection import FasterRCNN

from mammo_core.detection import inference
from mammo_core.detection.backbone import FusedBackbone, FusedFeatureMaps
from mammo_core.detection.data import DetectionImage

WINDOW_GRID = 32  # the detectors' size_divisible and the coarsest fused map's stride: whole cells of every map


def extractor_fingerprint(body: nn.Module) -> str:
    """sha256 over the extractor's parameters and buffers (names, shapes, values)."""
    digest = hashlib.sha256()
    for name, value in body.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
                      if value.numel() else b"")
    return digest.hexdigest()


def _fused_body(model: FasterRCNN) -> FusedFeatureMaps:
    backbone = model.backbone
    if not isinstance(backbone, FusedBackbone):
        raise TypeError("the feature cache is for the fused detectors (ours, ours_nohash)")
    if any(p.requires_grad for p in backbone.body.parameters()):
        raise ValueError("the fused extractor trains (detect.train_backbone): its maps change and cannot be cached")
    return backbone.body


class FeatureCache:
    """Full-image fused maps per image (keyed by ``DetectionImage.index``), in ``dtype``, on the CPU."""

    def __init__(self, model: FasterRCNN, dtype: torch.dtype = torch.float16):
        body = _fused_body(model)
        if max(body.strides) > WINDOW_GRID or WINDOW_GRID % max(body.strides):
            raise ValueError(f"fused maps of strides {body.strides} do not tile a {WINDOW_GRID}-pixel grid")
        self.fingerprint = extractor_fingerprint(body)
        self.strides = list(body.strides)
        self.dtype = dtype
        self.maps: dict[int, list[Tensor]] = {}

    def check(self, model: FasterRCNN) -> None:
        if extractor_fingerprint(_fused_body(model)) != self.fingerprint:
            raise ValueError("feature cache computed with another extractor: refused")

    @torch.inference_mode()
    def add(self, model: FasterRCNN, items: Iterable[DetectionImage], device: torch.device | str = "cpu") -> None:
        """Run ``model``'s extractor once on every item not cached yet.

        The maps come from the extractor's inference copy (:mod:`~mammo_core.detection.inference`: the same
        function with BatchNorm folded and no re-concatenation, equal within float rounding, far below the
        cache's half precision); the fingerprint is the trained extractor's.
        """
        self.check(model)
        missing = [item for item in items if item.index not in self.maps]
        if not missing:
            return
        with torch.inference_mode(False):  # callers may be in inference mode: the copy's weights stay normal tensors
            body = inference.inference_copy(model.backbone.body.eval()).to(device)  # eval(): as before
        for item in missing:
            images, _ = model.transform([item.image.to(device).expand(3, -1, -1)])
            maps = body(images.tensors)
            self.maps[item.index] = [m[0].to("cpu", self.dtype) for m in maps.values()]

    def __contains__(self, index: int) -> bool:
        return index in self.maps

    def full(self, index: int) -> list[Tensor]:
        return self.maps[index]

    def window(self, index: int, top: int, left: int, height: int, width: int) -> list[Tensor]:
        """The cells of every map under the input window (top, left, height, width); top/left on the grid.

        A window side that is not a multiple of the grid (an image smaller than the window) covers the
        padded cells as the detector's transform pads it.
        """
        if top % WINDOW_GRID or left % WINDOW_GRID:
            raise ValueError(f"window at ({top}, {left}) is off the {WINDOW_GRID}-pixel grid")
        out = []
        for stride, m in zip(self.strides, self.maps[index], strict=True):
            t, le = top // stride, left // stride
            h, w = -(-height // WINDOW_GRID) * WINDOW_GRID // stride, -(-width // WINDOW_GRID) * WINDOW_GRID // stride
            cut = m[:, t:t + h, le:le + w]
            if cut.shape[-2:] != (h, w):
                raise ValueError(f"window ({top}, {left}, {height}, {width}) leaves image {index}'s maps")
            out.append(cut)
        return out

    def release(self, indices: Iterable[int]) -> None:
        for index in indices:
            self.maps.pop(index, None)


def batch_maps(per_image: Sequence[Sequence[Tensor]], padded_hw: tuple[int, int], strides: Sequence[int],
               device: torch.device | str, names: Sequence[str] = ("trunk", "middle", "final")
               ) -> OrderedDict[str, Tensor]:
    """Stack per-image maps into the batch the transform made (padded to ``padded_hw`` input pixels).

    Cells beyond an image's own padded size (a batch of windows of unequal sizes) are zero.
    """
    out = OrderedDict()
    for level, (name, stride) in enumerate(zip(names, strides, strict=True)):
        h, w = padded_hw[0] // stride, padded_hw[1] // stride
        maps = [F.pad(m[level], (0, w - m[level].shape[-1], 0, h - m[level].shape[-2])) for m in per_image]
        out[name] = torch.stack(maps).to(device, torch.float32)
    return out


def forward_with_maps(model: FasterRCNN, images: list[Tensor], targets: list[Mapping[str, Tensor]] | None,
                      per_image_maps: Sequence[Sequence[Tensor]]):
    """torchvision's ``GeneralizedRCNN.forward`` with the extractor's maps given instead of computed.

    Losses in training mode, detections in eval mode, exactly as ``model(images, targets)`` returns them
    when ``per_image_maps`` are the extractor's output on those images (tested).
    """
    original_sizes = [tuple(img.shape[-2:]) for img in images]
    image_list, targets = model.transform(images, targets)
    device = image_list.tensors.device
    padded = tuple(image_list.tensors.shape[-2:])
    features = model.backbone.fpn_from_maps(batch_maps(per_image_maps, padded, model.backbone.body.strides, device))
    proposals, proposal_losses = model.rpn(image_list, features, targets)
    detections, detector_losses = model.roi_heads(features, proposals, image_list.image_sizes, targets)
    if model.training:
        return {**detector_losses, **proposal_losses}
    return model.transform.postprocess(detections, image_list.image_sizes, original_sizes)

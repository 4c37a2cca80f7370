"""Box predictors: the hash head (classification through the divide-and-encode decoder) and the plain one.

The paper puts the hash decoder into the detector's classification path: the box head's feature vector is
encoded into q relaxed bits (``HashDecoder.relaxed``: 50q projection, q separate 50->1 units, sigmoid,
piece-wise threshold) and the class logits are a linear function of those bits. Box regression stays a
linear map of the head features (the standard (tx, ty, tw, th) parameterisation per class), because a
q-bit code keeps what separates classes, not where a box's edges are.
"""

from __future__ import annotations

from torch import Tensor, nn

from mammo_core.models.hashing import HashDecoder


class HashBoxPredictor(nn.Module):
    """(N, in_channels) head features -> class logits via q-bit codes, and per-class box deltas."""

    def __init__(self, in_channels: int, num_classes: int, hash_bits: int = 48, beta: float = 1.0,
                 eps: float = 0.1, seed: int = 0):
        super().__init__()
        self.hash = HashDecoder(in_channels, hash_bits, beta=beta, eps=eps, seed=seed)
        self.cls_score = nn.Linear(hash_bits, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def codes(self, x: Tensor) -> Tensor:
        """Relaxed codes (N, q) in [0, 1]; binarise at 0.5 for retrieval."""
        return self.hash(x.flatten(start_dim=1))

    def centred_codes(self, x: Tensor) -> Tensor:
        """Relaxed codes mapped to ``(code - 0.5) / eps``: the band [0.5-eps, 0.5+eps] becomes [-1, 1].

        Why: inside the band (the only place a bit learns) codes span just 2*eps = 0.2, so a linear
        classifier on raw codes barely moves its logits and Faster R-CNN's class loss settles on
        "background" before any bit separates lesions; centring and scaling fixes that without adding
        parameters (binary codes map to -1/eps and +1/eps, the same ranking and Hamming distances).
        """
        return (self.codes(x) - 0.5) / self.hash.eps

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(self.centred_codes(x)), self.bbox_pred(x)


class PlainBoxPredictor(nn.Module):
    """The standard Fast R-CNN predictor (the ablation without hash head): two linear maps."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)

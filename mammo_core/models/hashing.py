"""The divide-and-encode hash decoder (Lai et al., CVPR 2015, as the paper uses it), its FC ablation, and
the supervised training both share (DESIGN.md section 7).

HashDecoder: a non-linear layer of 50q features (linear + batch norm + ReLU), a fixed seeded permutation, q
slices of 50, each slice through its own 50->1 linear unit (no bias, as the paper's ``fc_i(x) = W_i x``),
``sigmoid(beta * c)``, then the piece-wise threshold: 0 below ``0.5 - eps``, 1 above ``0.5 + eps``, the
identity between. Each bit sees only its own 50 features, which is what is meant to make the bits less
redundant than a dense layer. The q units are one batched einsum over a (q, 50) weight, not q modules.

Why the 50q layer is non-linear: in the paper (after DNNH) the 50q features are a network's own non-linear
outputs. Were they a plain linear map of the input, q slice units on top would again be an arbitrary linear
map of the input - exactly what the FC ablation computes - and Table 4 would compare a model with itself up
to initialisation and the threshold. With batch norm + ReLU in between, "each bit sees only its slice" is a
real restriction that a dense layer does not have.

Gradients of the threshold: it is a piece-wise function, so its derivative is 1 inside the band and 0
outside; an output already thresholded to 0 or 1 gives its unit no gradient for that example. That is the
paper's function taken literally (no straight-through estimator). Training therefore starts with the slice
units initialised small, so that most outputs begin inside the band and learn before they saturate.

FCDecoder (the ablation): the same non-linear 50q layer, then one dense layer 50q -> q and a plain sigmoid, no
threshold - the paper's "simple fully-connected layer followed by sigmoid". Both decoders standardise their
input with statistics fitted on the training features (stored as buffers, so ``encode`` of a new image
needs nothing else), and both are trained by :func:`train_decoder` with the identical objective and budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mammo_core.codes import retrieval
from mammo_core.runtime import stop_request

SLICE_WIDTH = 50  # the paper's 50 projected features per bit

Objective = Literal["triplet", "classification", "both"]
Mining = Literal["batch_hard", "random"]


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block under a fixed CPU seed without disturbing the caller's global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def piecewise_threshold(s: torch.Tensor, eps: float) -> torch.Tensor:
    """0 where ``s < 0.5 - eps``, 1 where ``s > 0.5 + eps``, ``s`` itself between (band edges inclusive).

    ``torch.where`` routes the gradient to ``s`` only where the identity branch is taken, so the derivative
    is exactly 1 inside the band and exactly 0 outside, as the piece-wise definition implies.
    """
    low, high = 0.5 - eps, 0.5 + eps
    return torch.where(s < low, torch.zeros_like(s), torch.where(s > high, torch.ones_like(s), s))


class _CodeDecoder(nn.Module):
    """Shared by both decoders: input standardisation, the non-linear 50q layer, relaxed codes, binarisation."""

    q: int

    def __init__(self, in_dim: int, q: int):
        super().__init__()
        if in_dim < 1 or q < 1:
            raise ValueError(f"a decoder needs in_dim >= 1 and q >= 1, got in_dim={in_dim}, q={q}")
        self.in_dim = in_dim
        self.q = q
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_scale", torch.ones(in_dim))
        self.projection = nn.Linear(in_dim, SLICE_WIDTH * q)
        self.projection_norm = nn.BatchNorm1d(SLICE_WIDTH * q)

    def fit_input_scaling(self, features: np.ndarray | torch.Tensor) -> None:
        """Standardise inputs with the training features' mean and std (constant features keep scale 1)."""
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        std = x.std(dim=0, unbiased=False)
        self.input_mean.copy_(x.mean(dim=0))
        self.input_scale.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def features_50q(self, x: torch.Tensor) -> torch.Tensor:
        """The 50q non-linear features ``relu(batchnorm(W x + b))`` of standardised inputs, (N, 50q)."""
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"expected features of shape (N, {self.in_dim}), got {tuple(x.shape)}")
        return F.relu(self.projection_norm(self.projection((x - self.input_mean) / self.input_scale)))

    def logits_from_features(self, h: torch.Tensor) -> torch.Tensor:
        """Pre-activations (N, q) of the bits from the 50q features (before sigmoid)."""
        raise NotImplementedError

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations (N, q) of the bits from input features."""
        return self.logits_from_features(self.features_50q(x))

    def relaxed(self, x: torch.Tensor) -> torch.Tensor:
        """Real-valued codes in [0, 1], (N, q): what training sees."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relaxed(x)

    @torch.inference_mode()
    def encode(self, x: torch.Tensor | np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """Binary codes (N, q) uint8: relaxed codes binarised at 0.5 (the prediction-time quantisation)."""
        was_training = self.training
        self.eval()
        try:
            x = torch.as_tensor(np.asarray(x, dtype=np.float32))
            parts = [(self.relaxed(x[i:i + batch_size]) >= 0.5).to(torch.uint8) for i in range(0, len(x), batch_size)]
            out = torch.cat(parts) if parts else torch.zeros((0, self.q), dtype=torch.uint8)
        finally:
            self.train(was_training)
        return out.numpy()

    @torch.inference_mode()
    def relaxed_numpy(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """Relaxed codes as a float32 array (for bit statistics), in eval mode like :meth:`encode`.

        Eval mode matters: batch norm in training mode would use (and update its running statistics with)
        the statistics of ``x`` itself.
        """
        was_training = self.training
        self.eval()
        try:
            return self.relaxed(torch.as_tensor(np.asarray(x, dtype=np.float32))).numpy()
        finally:
            self.train(was_training)


class HashDecoder(_CodeDecoder):
    """Divide-and-encode: non-linear 50q layer, fixed seeded permutation, q separate 50->1 units, sigmoid,
    piece-wise threshold."""

    def __init__(self, in_dim: int, q: int, beta: float = 1.0, eps: float = 0.1, seed: int = 0):
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps must lie in (0, 0.5), got {eps}")
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        with _seeded(seed):
            super().__init__(in_dim, q)
            # Small init scaled by 1/beta: beta * c starts well inside the band whatever beta is, so units
            # receive gradient before they saturate (outside the band they receive none).
            self.slice_weight = nn.Parameter(torch.randn(q, SLICE_WIDTH) * (0.1 / (beta * math.sqrt(SLICE_WIDTH))))
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("permutation", torch.randperm(SLICE_WIDTH * q, generator=generator))
        self.beta = float(beta)
        self.eps = float(eps)

    def logits_from_features(self, h: torch.Tensor) -> torch.Tensor:
        """c_i = W_i h^(i) for every slice i at once, h^(i) = h[:, permutation[50 i : 50 (i + 1)]]: (N, q)."""
        sliced = h[:, self.permutation].reshape(-1, self.q, SLICE_WIDTH)
        return torch.einsum("nqs,qs->nq", sliced, self.slice_weight)

    def slice_logits(self, x: torch.Tensor) -> torch.Tensor:
        """c_i for every bit from input features: (N, q)."""
        return self.logits(x)

    def relaxed(self, x: torch.Tensor) -> torch.Tensor:
        return piecewise_threshold(torch.sigmoid(self.beta * self.logits(x)), self.eps)


class FCDecoder(_CodeDecoder):
    """The ablation: the same non-linear 50q layer, then one dense 50q -> q layer and a sigmoid (no threshold)."""

    def __init__(self, in_dim: int, q: int, seed: int = 0):
        with _seeded(seed):
            super().__init__(in_dim, q)
            self.dense = nn.Linear(SLICE_WIDTH * q, q)

    def logits_from_features(self, h: torch.Tensor) -> torch.Tensor:
        """Every bit sees all 50q features through one dense layer: (N, q)."""
        return self.dense(h)

    def relaxed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


def build_decoder(kind: str, in_dim: int, q: int, beta: float, eps: float, seed: int) -> HashDecoder | FCDecoder:
    """The decoder named by ``kind`` (``hash``: divide-and-encode; anything else: the FC ablation).

    One builder for the hashing stage that trains decoders and the served classifier that reloads one, so the
    two cannot build different architectures from the same ``hashing.json``.
    """
    if kind == "hash":
        return HashDecoder(in_dim, q, beta=beta, eps=eps, seed=seed)
    return FCDecoder(in_dim, q, seed=seed)


def triplet_loss(codes: torch.Tensor, labels: torch.Tensor, margin: float, mining: Mining,
                 generator: torch.Generator) -> torch.Tensor:
    """Triplet ranking loss on relaxed codes: relu(d(a, p) - d(a, n) + margin), d = mean squared bit difference.

    ``batch_hard`` pairs each anchor with its farthest same-class and nearest other-class code in the batch;
    ``random`` draws one of each. Anchors lacking a positive or a negative in the batch are skipped.
    Distances are per bit (in [0, 1]), so ``margin`` means a fraction of the code length for every q.
    """
    # Squared differences directly (not cdist): identical binary codes are common and sqrt has no gradient at 0.
    dist = (codes[:, None, :] - codes[None, :, :]).pow(2).mean(dim=2)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool)
    positive = same & ~eye
    negative = ~same
    usable = positive.any(dim=1) & negative.any(dim=1)
    if not usable.any():
        return codes.sum() * 0.0
    if mining == "batch_hard":
        d_ap = torch.where(positive, dist, torch.full_like(dist, -1.0)).max(dim=1).values
        d_an = torch.where(negative, dist, torch.full_like(dist, math.inf)).min(dim=1).values
    elif mining == "random":
        noise = torch.rand(dist.shape, generator=generator)
        pick_p = torch.where(positive, noise, torch.full_like(noise, -1.0)).argmax(dim=1)
        pick_n = torch.where(negative, noise, torch.full_like(noise, -1.0)).argmax(dim=1)
        rows = torch.arange(len(labels))
        d_ap, d_an = dist[rows, pick_p], dist[rows, pick_n]
    else:
        raise ValueError(f"unknown triplet mining {mining!r}; use 'batch_hard' or 'random'")
    return F.relu(d_ap - d_an + margin)[usable].mean()


def quantization_penalty(codes: torch.Tensor) -> torch.Tensor:
    """4 s (1 - s), averaged: 1 at 0.5, 0 at {0, 1}; pushes relaxed codes towards binary values."""
    return (4.0 * codes * (1.0 - codes)).mean()


def train_decoder(
    decoder: HashDecoder | FCDecoder,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    objective: Objective = "both",
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 1e-3,
    margin: float = 0.25,
    quantization_weight: float = 0.1,
    seed: int = 0,
    mining: Mining = "batch_hard",
    weight_decay: float = 0.0,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    every_epoch_diagnostics: bool = True,
) -> list[dict[str, float]]:
    """Train ``decoder`` in place on (N, D) features and integer labels; returns one history row per epoch.

    Loss = triplet ranking loss on the relaxed codes and/or cross-entropy of a linear head on the relaxed
    codes (``objective``), plus ``quantization_weight`` x :func:`quantization_penalty`. Adam, shuffled
    mini-batches; input standardisation is fitted on ``features`` first. Deterministic by ``seed`` on CPU
    (own generator for shuffling, sampling and the head's init). With ``val=(features, labels)`` each epoch
    also records ``val_map``: MAP of the validation codes against the training codes (Hamming ranking).
    ``fraction_not_binary`` costs one more forward pass over all training features; with
    ``every_epoch_diagnostics=False`` only the last epoch's row has it (and ``val_map``): the pipeline
    reads no earlier row, and the pass was about a quarter of its training time. Training is unchanged.
    """
    if objective not in ("triplet", "classification", "both"):
        raise ValueError(f"unknown hashing objective {objective!r}; use 'triplet', 'classification' or 'both'")
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    y_np = np.asarray(labels)
    if x.ndim != 2 or x.shape[0] != y_np.shape[0] or x.shape[0] < 2:
        raise ValueError(f"need (N, D) features with N >= 2 and N labels, got {tuple(x.shape)} and {y_np.shape}")
    if x.shape[1] != decoder.in_dim:
        raise ValueError(f"features have {x.shape[1]} dims but the decoder expects {decoder.in_dim}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (batch norm needs batch statistics), got {batch_size}")
    classes, y_idx = np.unique(y_np, return_inverse=True)
    y = torch.as_tensor(y_idx, dtype=torch.long)
    decoder.fit_input_scaling(x)
    head = classification_head(decoder.q, len(classes), seed)
    use_triplet = objective in ("triplet", "both")
    use_classification = objective in ("classification", "both")
    params = list(decoder.parameters()) + (list(head.parameters()) if use_classification else [])
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    decoder.train()
    for epoch in range(1, epochs + 1):
        stop_request.check(f"hash decoder epoch {epoch}")
        totals = {"loss": 0.0, "triplet": 0.0, "classification": 0.0, "quantization": 0.0}
        n_seen = 0
        for batch in torch.randperm(len(x), generator=generator).split(batch_size):
            if len(batch) < 2:
                continue  # batch norm has no batch statistics for one example; it is seen again next epoch
            codes = decoder.relaxed(x[batch])
            terms = {"quantization": quantization_penalty(codes)}
            loss = quantization_weight * terms["quantization"]
            if use_triplet:
                terms["triplet"] = triplet_loss(codes, y[batch], margin, mining, generator)
                loss = loss + terms["triplet"]
            if use_classification:
                # Centre the codes so the head sees +-0.5 per bit, symmetric for both decoders.
                terms["classification"] = F.cross_entropy(head(codes - 0.5), y[batch])
                loss = loss + terms["classification"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            totals["loss"] += float(loss.detach()) * len(batch)
            for name, value in terms.items():
                totals[name] += float(value.detach()) * len(batch)
            n_seen += len(batch)
        row = {"epoch": float(epoch), **{name: value / n_seen for name, value in totals.items()}}
        if every_epoch_diagnostics or epoch == epochs:
            row["fraction_not_binary"] = fraction_not_binary(decoder, x)
            if val is not None:
                row["val_map"] = validation_map(decoder, x, y_np, val)
        history.append(row)
    decoder.eval()
    return history


def classification_head(q: int, n_classes: int, seed: int) -> nn.Linear:
    """The linear head of the classification objective (q codes -> classes), initialised under ``seed``."""
    with _seeded(seed):
        return nn.Linear(q, n_classes)


def fraction_not_binary(decoder: HashDecoder | FCDecoder, x: torch.Tensor) -> float:
    """Share of relaxed outputs strictly between 0 and 1 (for the hash decoder: still learning)."""
    codes = decoder.relaxed_numpy(x)
    return float(((codes > 0.0) & (codes < 1.0)).mean())


def validation_map(decoder, train_x: torch.Tensor, train_y: np.ndarray, val: tuple[np.ndarray, np.ndarray]) -> float:
    """MAP of the validation codes ranked against the training codes (Hamming distance)."""
    val_x, val_y = val
    db = retrieval.pack_codes(decoder.encode(train_x))
    queries = retrieval.pack_codes(decoder.encode(val_x))
    return retrieval.mean_average_precision(queries, np.asarray(val_y), db, train_y)

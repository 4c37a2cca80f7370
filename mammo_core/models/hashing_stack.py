"""Training many hash/FC decoders at once: the same training problems as
:func:`mammo_core.models.hashing.train_decoder`, stacked so one optimiser step serves them all (issue 18).

Why: the hashing stage trains 48 small decoders (hash and FC x 4 code lengths x 3 seeds x {fused, Freeze3});
one at a time, most of each step was Python and dispatch overhead around small matrices. Here decoders of
one shape (same class, code length q, input width; the hash ones also the same beta and eps) form a
*slot*: their parameters are stacked along a leading axis of G members and every layer runs as one batched
matrix product over the members (``baddbmm``/``einsum``). Slots of different shapes run one after the
other inside the same step; one Adam optimiser updates every stacked tensor.

Why it is the same training problem for every decoder (tested against independent trainings):

- Initialisation: each member's tensors are copied from a decoder built as usual (its own seed), and its
  classification head comes from :func:`~mammo_core.models.hashing.classification_head` under its seed.
- Data order: one ``torch.Generator`` per distinct seed, drawing exactly what ``train_decoder`` draws for
  that seed (the epoch permutation, and with ``random`` mining the per-batch noise); every member trains
  on its own seed's batches. Members of one seed draw the same numbers, so one generator serves them all.
- Loss: each member's loss is the one ``train_decoder`` computes (triplet on relaxed codes, classification
  head, quantisation penalty); the optimised quantity is their sum. A member's loss depends only on its own
  slice of the stacked tensors, so the gradient of the sum with respect to that slice is exactly the
  gradient of its own loss: the decoders stay independent.
- Optimiser: Adam is element-wise (moments, bias correction, weight decay per element, one step count for
  all), so one Adam over the stacked tensors makes the same update as one Adam per decoder.
- Batch norm: per member and channel, with the running statistics updated as ``nn.BatchNorm1d`` does
  (biased variance to normalise, unbiased variance into the running average, ``num_batches_tracked``).
- Budget: the same epochs, batch size, lr and skipped one-example batches; no early stopping (neither
  has any), the diagnostics of the last epoch (``fraction_not_binary``, ``val_map``) computed per decoder
  by the same functions.

Results agree with independent trainings up to floating-point summation order (a batched product sums in
another order than a single one), not bit for bit. At the end every decoder module holds its trained
weights and running statistics and is in eval mode, exactly as after ``train_decoder``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from mammo_core.models.hashing import (
    SLICE_WIDTH,
    FCDecoder,
    HashDecoder,
    Mining,
    Objective,
    classification_head,
    fraction_not_binary,
    piecewise_threshold,
    validation_map,
)
from mammo_core.runtime import stop_request

TERMS = ("loss", "triplet", "classification", "quantization")


@dataclass(frozen=True)
class DecoderJob:
    """One decoder to train: the module (trained in place), its training features (N, in_dim) and seed.

    ``val``: optional (features, labels) of the validation rows, for the last epoch's ``val_map``.
    """

    decoder: HashDecoder | FCDecoder
    features: np.ndarray
    seed: int
    val: tuple[np.ndarray, np.ndarray] | None = None


def _slot_signature(decoder: HashDecoder | FCDecoder) -> tuple:
    if isinstance(decoder, HashDecoder):
        return ("hash", decoder.q, decoder.in_dim, decoder.beta, decoder.eps)
    if isinstance(decoder, FCDecoder):
        return ("fc", decoder.q, decoder.in_dim)
    raise TypeError(f"cannot train a {type(decoder).__name__}: expected HashDecoder or FCDecoder")


def _stacked(tensors: Sequence[torch.Tensor], grad: bool) -> torch.Tensor:
    return torch.stack([t.detach().clone() for t in tensors]).requires_grad_(grad)


class _Slot:
    """G decoders of one shape, their tensors stacked on a leading member axis."""

    def __init__(self, jobs: Sequence[DecoderJob], seed_position: Sequence[int], n_classes: int):
        self.jobs = list(jobs)
        decoders = [j.decoder for j in jobs]
        first = decoders[0]
        self.is_hash = isinstance(first, HashDecoder)
        self.q = first.q
        self.seed_position = torch.as_tensor(list(seed_position), dtype=torch.long)
        # Standardised once: the same element-wise arithmetic features_50q applies to every batch.
        self.x = torch.stack([(torch.as_tensor(np.asarray(j.features, dtype=np.float32)) - d.input_mean)
                              / d.input_scale for j, d in zip(jobs, decoders, strict=True)])
        # The hash decoder reads its 50q features through a fixed permutation. Batch norm and ReLU act per
        # channel and Adam per element, so training with the channels stored in permuted order is the same
        # computation without a gather per step (and its scatter backward); write_back undoes the order.
        if self.is_hash:
            self.order = torch.stack([d.permutation for d in decoders])  # (G, 50q)
        else:
            self.order = torch.arange(SLICE_WIDTH * self.q).expand(len(decoders), -1)
        self.members = torch.arange(len(decoders))[:, None]

        def channels(tensors: Sequence[torch.Tensor], grad: bool) -> torch.Tensor:
            stacked = torch.stack([t.detach() for t in tensors])
            return stacked[self.members, self.order].clone().requires_grad_(grad)

        self.weight = channels([d.projection.weight for d in decoders], True)  # (G, 50q, in)
        self.bias = channels([d.projection.bias for d in decoders], True)  # (G, 50q)
        norm = first.projection_norm
        self.bn_eps, self.bn_momentum = float(norm.eps), float(norm.momentum)
        self.bn_weight = channels([d.projection_norm.weight for d in decoders], True)
        self.bn_bias = channels([d.projection_norm.bias for d in decoders], True)
        self.running_mean = channels([d.projection_norm.running_mean for d in decoders], False)
        self.running_var = channels([d.projection_norm.running_var for d in decoders], False)
        self.batches_tracked = [int(d.projection_norm.num_batches_tracked) for d in decoders]
        if self.is_hash:
            self.beta, self.eps = first.beta, first.eps
            self.slice_weight = _stacked([d.slice_weight for d in decoders], True)  # (G, q, 50)
            self.decoder_params = [self.weight, self.bias, self.bn_weight, self.bn_bias, self.slice_weight]
        else:
            self.dense_weight = _stacked([d.dense.weight for d in decoders], True)  # (G, q, 50q)
            self.dense_bias = _stacked([d.dense.bias for d in decoders], True)  # (G, q)
            self.decoder_params = [self.weight, self.bias, self.bn_weight, self.bn_bias, self.dense_weight,
                                   self.dense_bias]
        heads = [classification_head(first.q, n_classes, j.seed) for j in jobs]
        self.head_weight = _stacked([h.weight for h in heads], True)  # (G, C, q)
        self.head_bias = _stacked([h.bias for h in heads], True)  # (G, C)

    def rows(self, batch_by_seed: torch.Tensor) -> torch.Tensor:
        """Each member's batch (G, B) from the batches of the distinct seeds (S, B)."""
        return batch_by_seed[self.seed_position]

    def relaxed(self, rows: torch.Tensor) -> torch.Tensor:
        """Relaxed codes (G, B, q) of every member on its own rows, batch norm in training mode."""
        z = torch.baddbmm(self.bias[:, None, :], self.x[self.members, rows], self.weight.transpose(1, 2))
        mean = z.mean(dim=1)  # two passes: faster than var_mean's strided one-pass reduction here
        var = (z - mean[:, None, :]).pow(2).mean(dim=1)
        with torch.no_grad():  # nn.BatchNorm1d's running update: unbiased variance into the average
            n = z.shape[1]
            m = self.bn_momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
            self.batches_tracked = [b + 1 for b in self.batches_tracked]
        scale = self.bn_weight * torch.rsqrt(var + self.bn_eps)  # (x - mean) * scale + bias, folded
        h = F.relu(torch.addcmul((self.bn_bias - mean * scale)[:, None, :], z, scale[:, None, :]))
        if self.is_hash:  # channels already in permuted order: slice i is columns 50 i .. 50 (i + 1)
            # c_i = W_i . slice_i as a product and a sum (about half the time of einsum's tiny batched products)
            logits = (h.reshape(*h.shape[:2], self.q, SLICE_WIDTH) * self.slice_weight[:, None]).sum(dim=3)
            return piecewise_threshold(torch.sigmoid(self.beta * logits), self.eps)
        return torch.sigmoid(torch.baddbmm(self.dense_bias[:, None, :], h, self.dense_weight.transpose(1, 2)))

    def class_logits(self, codes: torch.Tensor) -> torch.Tensor:
        """The classification head on centred codes (``codes - 0.5``, as train_decoder): (G, B, C)."""
        return torch.baddbmm(self.head_bias[:, None, :], codes - 0.5, self.head_weight.transpose(1, 2))

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy every member's trained tensors and running statistics into its decoder module."""
        for g, job in enumerate(self.jobs):
            d, order = job.decoder, self.order[g]
            d.projection.weight[order] = self.weight[g]
            d.projection.bias[order] = self.bias[g]
            d.projection_norm.weight[order] = self.bn_weight[g]
            d.projection_norm.bias[order] = self.bn_bias[g]
            d.projection_norm.running_mean[order] = self.running_mean[g]
            d.projection_norm.running_var[order] = self.running_var[g]
            d.projection_norm.num_batches_tracked.fill_(self.batches_tracked[g])
            if self.is_hash:
                d.slice_weight.copy_(self.slice_weight[g])
            else:
                d.dense.weight.copy_(self.dense_weight[g])
                d.dense.bias.copy_(self.dense_bias[g])


def triplet_losses(codes: torch.Tensor, labels: torch.Tensor, margin: float, mining: Mining,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`mammo_core.models.hashing.triplet_loss` for G members at once: codes (G, B, q), labels (G, B) -> (G,).

    ``noise`` (G, B, B): each member's uniform draws for ``random`` mining (its seed's generator). A member
    whose batch has no usable anchor gets 0, as the single version does.
    """
    dist = (codes[:, :, None, :] - codes[:, None, :, :]).pow(2).mean(dim=3)
    same = labels[:, :, None] == labels[:, None, :]
    eye = torch.eye(labels.shape[1], dtype=torch.bool)
    positive = same & ~eye
    negative = ~same
    usable = positive.any(dim=2) & negative.any(dim=2)
    if mining == "batch_hard":
        d_ap = torch.where(positive, dist, torch.full_like(dist, -1.0)).max(dim=2).values
        d_an = torch.where(negative, dist, torch.full_like(dist, float("inf"))).min(dim=2).values
    elif mining == "random":
        if noise is None:
            raise ValueError("random mining needs each member's noise")
        pick_p = torch.where(positive, noise, torch.full_like(noise, -1.0)).argmax(dim=2, keepdim=True)
        pick_n = torch.where(negative, noise, torch.full_like(noise, -1.0)).argmax(dim=2, keepdim=True)
        d_ap, d_an = dist.gather(2, pick_p).squeeze(2), dist.gather(2, pick_n).squeeze(2)
    else:
        raise ValueError(f"unknown triplet mining {mining!r}; use 'batch_hard' or 'random'")
    per_anchor = torch.where(usable, F.relu(d_ap - d_an + margin), torch.zeros_like(d_ap))
    count = usable.sum(dim=1)
    return torch.where(count > 0, per_anchor.sum(dim=1) / count.clamp(min=1), codes.sum(dim=(1, 2)) * 0.0)


def train_decoders(
    jobs: Sequence[DecoderJob],
    labels: np.ndarray,
    *,
    objective: Objective = "both",
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 1e-3,
    margin: float = 0.25,
    quantization_weight: float = 0.1,
    mining: Mining = "batch_hard",
    weight_decay: float = 0.0,
    every_epoch_diagnostics: bool = True,
) -> list[list[dict[str, float]]]:
    """Train every job's decoder in place, all together; one history per job, as ``train_decoder`` returns.

    All jobs share the training ``labels`` (their features describe the same N rows); each has its own
    features, seed and optional validation set. Arguments mean what they mean for ``train_decoder``.
    """
    if objective not in ("triplet", "classification", "both"):
        raise ValueError(f"unknown hashing objective {objective!r}; use 'triplet', 'classification' or 'both'")
    if mining not in ("batch_hard", "random"):
        raise ValueError(f"unknown triplet mining {mining!r}; use 'batch_hard' or 'random'")
    if not jobs:
        return []
    y_np = np.asarray(labels)
    n = len(y_np)
    for job in jobs:
        shape = np.shape(job.features)
        if len(shape) != 2 or shape[0] != n or n < 2:
            raise ValueError(f"need (N, D) features with N >= 2 and N labels, got {shape} and {y_np.shape}")
        if shape[1] != job.decoder.in_dim:
            raise ValueError(f"features have {shape[1]} dims but the decoder expects {job.decoder.in_dim}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (batch norm needs batch statistics), got {batch_size}")
    classes, y_idx = np.unique(y_np, return_inverse=True)
    y = torch.as_tensor(y_idx, dtype=torch.long)
    for job in jobs:
        job.decoder.fit_input_scaling(job.features)
        job.decoder.train()
    seeds = sorted({job.seed for job in jobs})
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    by_shape: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        by_shape.setdefault(_slot_signature(job.decoder), []).append(i)
    slots = [(_Slot([jobs[i] for i in members], [seeds.index(jobs[i].seed) for i in members], len(classes)), members)
             for members in by_shape.values()]
    use_triplet = objective in ("triplet", "both")
    use_classification = objective in ("classification", "both")
    params = [p for slot, _ in slots for p in slot.decoder_params]
    if use_classification:
        params += [p for slot, _ in slots for p in (slot.head_weight, slot.head_bias)]
    # fused: one kernel per tensor instead of a dozen element-wise passes; the same Adam update rule.
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    histories: list[list[dict[str, float]]] = [[] for _ in jobs]
    features = [torch.as_tensor(np.asarray(j.features, dtype=np.float32)) for j in jobs]
    for epoch in range(1, epochs + 1):
        stop_request.check(f"hash decoder epoch {epoch} ({len(jobs)} decoders together)")
        totals = [{name: torch.zeros(len(members)) for name in TERMS} for _, members in slots]
        n_seen = 0
        for batch_by_seed in zip(*(torch.randperm(n, generator=g).split(batch_size) for g in generators),
                                 strict=True):
            if len(batch_by_seed[0]) < 2:
                continue  # batch norm has no batch statistics for one example (as train_decoder)
            batches = torch.stack(batch_by_seed)  # (S, B)
            noise = None
            if use_triplet and mining == "random":
                noise = _mining_noise(batches, y, generators)
            total = torch.zeros(())
            for (slot, _), slot_totals in zip(slots, totals, strict=True):
                rows = slot.rows(batches)
                codes = slot.relaxed(rows)
                terms = {"quantization": (4.0 * codes * (1.0 - codes)).mean(dim=(1, 2))}
                loss = quantization_weight * terms["quantization"]
                if use_triplet:
                    terms["triplet"] = triplet_losses(codes, y[rows], margin, mining,
                                                      None if noise is None else noise[slot.seed_position])
                    loss = loss + terms["triplet"]
                if use_classification:
                    logits = slot.class_logits(codes)
                    terms["classification"] = F.cross_entropy(logits.flatten(0, 1), y[rows].flatten(),
                                                              reduction="none").view(rows.shape).mean(dim=1)
                    loss = loss + terms["classification"]
                total = total + loss.sum()  # the members' gradients stay separate: each loss sees its own slice
                terms["loss"] = loss
                for name, value in terms.items():
                    slot_totals[name] += value.detach() * rows.shape[1]
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            n_seen += len(batch_by_seed[0])
        last = epoch == epochs
        if every_epoch_diagnostics or last:
            for slot, _ in slots:
                slot.write_back()
        for (_, members), slot_totals in zip(slots, totals, strict=True):
            for g, i in enumerate(members):
                row = {"epoch": float(epoch), **{name: float(slot_totals[name][g]) / n_seen for name in TERMS}}
                if every_epoch_diagnostics or last:
                    decoder = jobs[i].decoder
                    row["fraction_not_binary"] = fraction_not_binary(decoder, features[i])
                    if jobs[i].val is not None:
                        row["val_map"] = validation_map(decoder, features[i], y_np, jobs[i].val)
                    decoder.train()
                histories[i].append(row)
    for slot, _ in slots:
        slot.write_back()
    for job in jobs:
        job.decoder.eval()
    return histories


def _mining_noise(batches: torch.Tensor, y: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Per seed, the (B, B) uniform draws ``triplet_loss`` makes with ``random`` mining - drawn only when the
    seed's batch has a usable anchor, as it does - stacked (S, B, B); zeros where nothing was drawn."""
    b = batches.shape[1]
    noise = torch.zeros(len(generators), b, b)
    for s, (rows, generator) in enumerate(zip(batches, generators, strict=True)):
        labels = y[rows]
        same = labels[:, None] == labels[None, :]
        positive = same & ~torch.eye(b, dtype=torch.bool)
        if (positive.any(dim=1) & (~same).any(dim=1)).any():
            noise[s] = torch.rand((b, b), generator=generator)
    return noise

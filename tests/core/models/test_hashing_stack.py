"""Stacked decoder training (mammo_core.models.hashing_stack) against independent ``hashing.train_decoder`` runs.

Every decoder must face the same training problem as when trained alone: same init, same seed's batches,
same loss, same Adam update. Results agree up to floating-point summation order, except the projection's
bias: it sits right before batch norm, so its true gradient is exactly 0 and what autograd computes is
rounding noise, which Adam rescales to steps of up to ``lr`` in either version (a no-op for the training
outputs: batch norm subtracts it again). It is checked against that bound instead.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mammo_core.models import hashing, hashing_stack
from tests.helpers.torch_threads import one_torch_thread  # noqa: F401 (autouse: one torch thread here)

LR = 1e-2




def _problem(n: int = 48, dim: int = 20):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, n)
    centres = rng.normal(size=(3, dim))
    fused = (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32)
    other = (centres[labels] * 0.5 + rng.normal(size=(n, dim))).astype(np.float32)
    return fused, other, labels


# (kind, q, seed, which features): two slots with several members, two seeds, two feature sets
SPECS = [("hash", 3, 0, "fused"), ("fc", 3, 0, "fused"), ("hash", 3, 1, "other"), ("fc", 2, 1, "fused"),
         ("hash", 5, 0, "other"), ("hash", 3, 1, "fused")]


def _make(kind: str, q: int, seed: int, dim: int = 20):
    return hashing.HashDecoder(dim, q, seed=seed) if kind == "hash" else hashing.FCDecoder(dim, q, seed=seed)


def _train_both(epochs: int, batch_size: int, mining: str = "batch_hard", objective: str = "both"):
    fused, other, labels = _problem()
    data = {"fused": fused, "other": other}
    settings = {"objective": objective, "epochs": epochs, "batch_size": batch_size, "lr": LR, "margin": 0.25,
                "quantization_weight": 0.1, "mining": mining, "every_epoch_diagnostics": False}
    alone = [_make(k, q, s) for k, q, s, _ in SPECS]
    histories_alone = [hashing.train_decoder(d, data[f], labels, seed=s, **settings)
                       for d, (_, _, s, f) in zip(alone, SPECS, strict=True)]
    stacked = [_make(k, q, s) for k, q, s, _ in SPECS]
    jobs = [hashing_stack.DecoderJob(d, data[f], s) for d, (_, _, s, f) in zip(stacked, SPECS, strict=True)]
    histories_stacked = hashing_stack.train_decoders(jobs, labels, **settings)
    return alone, stacked, histories_alone, histories_stacked, data


LOGIT_ATOL = 5e-3


def _assert_same_decoders(alone, stacked, data, steps: int, atol: float):
    for a, b, (kind, _, _, f) in zip(alone, stacked, SPECS, strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for name in sa:
            if name in ("projection.bias", "projection_norm.running_mean"):
                continue
            torch.testing.assert_close(sb[name], sa[name], atol=atol, rtol=1e-4, msg=f"{kind} {name}")
        # the bias before batch norm: rounding-noise gradient, Adam steps of at most lr each (see docstring)
        assert (sb["projection.bias"] - sa["projection.bias"]).abs().max() <= 2 * LR * steps
        assert not b.training
        # what the decoders compute agrees (eval mode: running statistics, threshold, binarisation). The
        # pre-activations are continuous: within LOGIT_ATOL (the skipped bias and running mean drift together,
        # which leaves ~2e-3 after 9 steps). The relaxed codes jump at the threshold band's edges (0.5 +- eps):
        # a value closer to an edge than that drift can move it may land on either side (CI saw one of 144
        # flip 0.4 -> 0 on another CPU), so those few are left out of the relaxed comparison.
        x = torch.as_tensor(data[f])
        with torch.inference_mode():
            a.eval()
            logits_a, logits_b = a.logits(x), b.logits(x)
        torch.testing.assert_close(logits_b, logits_a, atol=LOGIT_ATOL, rtol=1e-4,
                                   msg=lambda m, kind=kind: f"{kind} logits: {m}")
        relaxed_a, relaxed_b = a.relaxed_numpy(data[f]), b.relaxed_numpy(data[f])
        away_from_edges = np.ones_like(relaxed_a, dtype=bool)
        if isinstance(a, hashing.HashDecoder):
            s = torch.sigmoid(a.beta * logits_a).numpy()
            reach = a.beta * LOGIT_ATOL / 4  # the sigmoid's slope is at most 1/4
            away_from_edges = np.minimum(np.abs(s - (0.5 - a.eps)), np.abs(s - (0.5 + a.eps))) > reach
        assert away_from_edges.mean() > 0.9, "the comparison must cover nearly every code"
        np.testing.assert_allclose(relaxed_b[away_from_edges], relaxed_a[away_from_edges], atol=max(atol, 1e-3))


def test_one_step_gives_every_decoder_the_parameters_it_gets_alone():
    # 48 rows, batch 64: one batch, one Adam step per decoder
    alone, stacked, h_alone, h_stacked, data = _train_both(epochs=1, batch_size=64)
    for a in alone:  # it really moved: the comparison is not between two untouched inits
        assert not torch.equal(a.projection.weight, _make("fc" if isinstance(a, hashing.FCDecoder) else "hash",
                                                          a.q, 0).projection.weight)
    _assert_same_decoders(alone, stacked, data, steps=1, atol=1e-6)
    for ha, hb in zip(h_alone, h_stacked, strict=True):
        assert ha[0].keys() == hb[0].keys()
        for key in ha[0]:
            assert hb[0][key] == pytest.approx(ha[0][key], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("mining,objective", [("batch_hard", "both"), ("random", "both"), ("random", "triplet"),
                                              ("batch_hard", "classification")])
def test_several_epochs_follow_each_seeds_own_batches(mining, objective):
    # 48 rows, batch 20: batches of 20, 20, 8 per epoch, each seed its own order (and its own mining draws)
    alone, stacked, h_alone, h_stacked, data = _train_both(epochs=3, batch_size=20, mining=mining,
                                                           objective=objective)
    _assert_same_decoders(alone, stacked, data, steps=9, atol=1e-4)
    n_rows = len(data["fused"])
    for ha, hb, (_, q, _, _) in zip(h_alone, h_stacked, SPECS, strict=True):
        assert [r.keys() for r in ha] == [r.keys() for r in hb]
        for ra, rb in zip(ha, hb, strict=True):
            for key in ra:
                # fraction_not_binary counts relaxed values inside the threshold band: up to two of them
                # within float noise of a band edge may fall on the other side (see _assert_same_decoders)
                tolerance = 2 / (n_rows * q) + 1e-9 if key == "fraction_not_binary" else 1e-5
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=tolerance), key


def test_stacked_hash_bits_still_see_only_their_own_fifty_features():
    """Training in permuted channel order must hand back the decoder's own order (slice i = permutation[50i:])."""
    _, stacked, _, _, _ = _train_both(epochs=1, batch_size=64)
    decoder = stacked[0]
    q = decoder.q
    h = torch.rand(1, 50 * q) + 0.1
    jac = torch.autograd.functional.jacobian(lambda f: decoder.logits_from_features(f)[0], h)[:, 0, :]
    for i in range(q):
        own = torch.zeros(50 * q, dtype=torch.bool)
        own[decoder.permutation[50 * i:50 * (i + 1)]] = True
        assert torch.count_nonzero(jac[i, ~own]) == 0 and torch.count_nonzero(jac[i, own]) == 50


def test_stacked_training_refuses_what_train_decoder_refuses():
    fused, _, labels = _problem()
    job = hashing_stack.DecoderJob(_make("hash", 3, 0), fused, 0)
    with pytest.raises(ValueError, match="N labels"):
        hashing_stack.train_decoders([job], labels[:-1])
    with pytest.raises(ValueError, match="expects 8"):
        hashing_stack.train_decoders([hashing_stack.DecoderJob(_make("hash", 3, 0, dim=8), fused, 0)], labels)
    with pytest.raises(ValueError, match="batch_size"):
        hashing_stack.train_decoders([job], labels, batch_size=1)
    with pytest.raises(ValueError, match="objective"):
        hashing_stack.train_decoders([job], labels, objective="nope")
    assert hashing_stack.train_decoders([], labels) == []

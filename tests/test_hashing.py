"""The divide-and-encode hash decoder, its FC ablation, and their shared supervised training."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from mammo_core import hashing, retrieval


def _clusters(n: int, seed: int, dim: int = 64, n_classes: int = 3, separation: float = 0.5):
    """Gaussian clusters in ``dim``-D around fixed centres; close enough that random codes rank poorly."""
    centres = np.random.default_rng(123).normal(size=(n_classes, dim)) * separation
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


def _map(decoder, queries, query_labels, db, db_labels) -> float:
    return retrieval.mean_average_precision(retrieval.pack_codes(decoder.encode(queries)), query_labels,
                                            retrieval.pack_codes(decoder.encode(db)), db_labels)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("q", [12, 48])
def test_decoder_output_shapes_and_ranges(q):
    x = torch.randn(10, 32)
    for decoder in (hashing.HashDecoder(32, q, beta=2.0, eps=0.1, seed=0), hashing.FCDecoder(32, q, seed=0)):
        relaxed = decoder.relaxed(x).detach()
        assert relaxed.shape == (10, q) and float(relaxed.min()) >= 0.0 and float(relaxed.max()) <= 1.0
        codes = decoder.encode(x)
        assert codes.dtype == np.uint8 and codes.shape == (10, q)
        np.testing.assert_array_equal(codes, (relaxed.detach().numpy() >= 0.5).astype(np.uint8))
    hash_decoder = hashing.HashDecoder(32, q, seed=0)
    assert hash_decoder.projection.out_features == 50 * q
    assert hash_decoder.slice_weight.shape == (q, 50)  # one 50->1 unit per bit, batched


def test_each_bit_depends_only_on_its_own_permuted_slice():
    decoder = hashing.HashDecoder(16, 4, beta=1.0, eps=0.1, seed=3)
    h = torch.randn(5, 200)
    # Reproduce slice i by hand: features permutation[50 i : 50 (i + 1)] through unit i
    by_hand = torch.stack([h[:, decoder.permutation[50 * i:50 * (i + 1)]] @ decoder.slice_weight[i]
                           for i in range(4)], dim=1)
    decoder._projected = lambda x: h  # bypass the projection to test the slicing alone
    torch.testing.assert_close(decoder.slice_logits(torch.zeros(5, 16)), by_hand)


def test_permutation_is_fixed_by_seed_and_travels_with_the_state_dict():
    a, b, c = (hashing.HashDecoder(8, 12, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.permutation, b.permutation)
    assert not torch.equal(a.permutation, c.permutation)
    assert sorted(a.permutation.tolist()) == list(range(600))  # a permutation, not a sample
    assert not a.permutation.requires_grad and "permutation" in a.state_dict()
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    c.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(c.permutation, a.permutation)
    x = torch.randn(6, 8)
    torch.testing.assert_close(c.relaxed(x), a.relaxed(x))


def test_construction_does_not_disturb_the_global_random_state():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    hashing.HashDecoder(8, 12, seed=1)
    hashing.FCDecoder(8, 12, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_piecewise_threshold_values_and_gradients():
    s = torch.tensor([0.0, 0.2, 0.39, 0.4, 0.45, 0.5, 0.6, 0.61, 0.9, 1.0], dtype=torch.float64, requires_grad=True)
    y = hashing.piecewise_threshold(s, eps=0.1)
    expected = [0.0, 0.0, 0.0, 0.4, 0.45, 0.5, 0.6, 1.0, 1.0, 1.0]  # exact outside, identity on [0.4, 0.6]
    assert y.tolist() == pytest.approx(expected, abs=0)
    y.sum().backward()
    assert s.grad.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_decoder_gradient_is_zero_outside_the_band_and_nonzero_inside():
    decoder = hashing.HashDecoder(4, 2, beta=1.0, eps=0.1, seed=0)
    with torch.no_grad():
        decoder.slice_weight.copy_(torch.tensor([[5.0] * 50, [0.001] * 50]))
        decoder.projection.weight.fill_(1.0)
        decoder.projection.bias.zero_()
    x = torch.full((1, 4), 0.5)  # projected features all 2 -> c = (500, 0.1) -> s = (1.0, ~0.525)
    codes = decoder.relaxed(x)
    assert codes[0, 0].item() == 1.0 and 0.4 < codes[0, 1].item() < 0.6
    codes[0, 0].backward()
    assert decoder.slice_weight.grad.abs().sum().item() == 0.0
    assert decoder.projection.weight.grad.abs().sum().item() == 0.0
    decoder.zero_grad()
    decoder.relaxed(x)[0, 1].backward()
    assert decoder.slice_weight.grad[1].abs().sum().item() > 0.0
    assert decoder.slice_weight.grad[0].abs().sum().item() == 0.0  # bit 1 never reaches unit 0


def test_invalid_decoder_settings_are_refused():
    with pytest.raises(ValueError, match="eps"):
        hashing.HashDecoder(8, 12, eps=0.5)
    with pytest.raises(ValueError, match="beta"):
        hashing.HashDecoder(8, 12, beta=0.0)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        hashing.HashDecoder(8, 12).relaxed(torch.zeros(2, 9))
    with pytest.raises(ValueError, match="objective"):
        hashing.train_decoder(hashing.FCDecoder(8, 12), np.zeros((4, 8), np.float32), [0, 1, 0, 1],
                              objective="contrastive")


@pytest.mark.parametrize("make", [
    lambda: hashing.HashDecoder(64, 24, beta=1.0, eps=0.1, seed=0),
    lambda: hashing.FCDecoder(64, 24, seed=0),
], ids=["hash", "fc"])
def test_training_on_separable_clusters_reaches_high_map(make):
    train_x, train_y = _clusters(600, seed=1)
    test_x, test_y = _clusters(150, seed=2)
    decoder = make()
    decoder.fit_input_scaling(train_x)
    untrained = _map(decoder, test_x, test_y, train_x, train_y)
    history = hashing.train_decoder(decoder, train_x, train_y, objective="both", epochs=8, batch_size=64, lr=3e-3,
                                    seed=0, val=(test_x[:50], test_y[:50]))
    trained = _map(decoder, test_x, test_y, train_x, train_y)
    assert untrained < 0.6 < 0.9 < trained
    assert len(history) == 8 and history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["val_map"] > 0.9
    assert history[-1]["triplet"] < history[0]["triplet"]


@pytest.mark.parametrize("objective", ["triplet", "classification"])
def test_each_objective_alone_trains_the_hash_decoder(objective):
    train_x, train_y = _clusters(450, seed=3)
    decoder = hashing.HashDecoder(64, 12, beta=1.0, eps=0.1, seed=1)
    history = hashing.train_decoder(decoder, train_x, train_y, objective=objective, epochs=6, batch_size=64,
                                    lr=3e-3, seed=1, mining="random")
    assert _map(decoder, train_x[:100], train_y[:100], train_x[100:], train_y[100:]) > 0.85
    unused = "classification" if objective == "triplet" else "triplet"
    assert history[-1][unused] == 0.0 and history[-1][objective] > 0.0
    # the threshold leaves most hash-decoder outputs exactly binary after training
    assert history[-1]["fraction_not_binary"] < 0.5


def test_training_is_deterministic_by_seed():
    train_x, train_y = _clusters(200, seed=4)

    def run(seed):
        decoder = hashing.HashDecoder(64, 12, seed=0)
        history = hashing.train_decoder(decoder, train_x, train_y, epochs=2, batch_size=50, seed=seed)
        return history, decoder.relaxed_numpy(train_x)

    (h1, c1), (h2, c2), (_, c3) = run(5), run(5), run(6)
    assert h1 == h2
    np.testing.assert_array_equal(c1, c2)
    assert not np.array_equal(c1, c3)  # the seed does change the shuffle

"""The divide-and-encode hash decoder, its FC ablation, and their shared supervised training."""

from __future__ import annotations

import io
import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from mammo_core.codes import retrieval
from mammo_core.evaluation import seed_summary
from mammo_core.models import hashing
from tests.helpers.torch_threads import one_torch_thread  # noqa: F401 (autouse: one torch thread here)


def _clusters(n: int, seed: int, dim: int = 64, n_classes: int = 3, separation: float = 0.5):
    """Gaussian clusters in ``dim``-D around fixed centres; close enough that random codes rank poorly."""
    centres = np.random.default_rng(123).normal(size=(n_classes, dim)) * separation
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


def _map(decoder, queries, query_labels, db, db_labels) -> float:
    return retrieval.mean_average_precision(retrieval.pack_codes(decoder.encode(queries)), query_labels,
                                            retrieval.pack_codes(decoder.encode(db)), db_labels)




@pytest.mark.parametrize("q", [12, 48])
def test_decoder_output_shapes_and_ranges(q):
    x = torch.randn(10, 32)
    for decoder in (hashing.HashDecoder(32, q, beta=2.0, eps=0.1, seed=0), hashing.FCDecoder(32, q, seed=0)):
        decoder.eval()  # encode runs in eval mode (batch norm on running statistics); compare like with like
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
    torch.testing.assert_close(decoder.logits_from_features(h), by_hand)


def test_bit_jacobian_is_zero_outside_its_own_fifty_features_and_dense_for_fc():
    q = 6
    decoder = hashing.HashDecoder(16, q, seed=5)
    fc = hashing.FCDecoder(16, q, seed=5)
    h = torch.rand(1, 50 * q) + 0.1
    jac = torch.autograd.functional.jacobian(lambda f: decoder.logits_from_features(f)[0], h)[:, 0, :]  # (q, 50q)
    assert jac.shape == (q, 50 * q)
    for i in range(q):
        own = torch.zeros(50 * q, dtype=torch.bool)
        own[decoder.permutation[50 * i:50 * (i + 1)]] = True
        assert torch.count_nonzero(jac[i, ~own]) == 0  # exactly zero outside its slice
        assert torch.count_nonzero(jac[i, own]) == 50  # and it does use all 50 of its own
    # the slices partition the 50q features: every feature feeds exactly one bit
    assert torch.equal(torch.count_nonzero(jac, dim=0), torch.ones(50 * q, dtype=torch.long))
    fc_jac = torch.autograd.functional.jacobian(lambda f: fc.logits_from_features(f)[0], h)[:, 0, :]
    assert torch.count_nonzero(fc_jac) == q * 50 * q  # the ablation's bits each see every feature


@pytest.mark.parametrize("make", [lambda: hashing.HashDecoder(16, 4, seed=2), lambda: hashing.FCDecoder(16, 4, seed=2)],
                         ids=["hash", "fc"])
def test_bit_pre_activations_are_not_affine_in_the_input(make):
    """Linear 50q features would make both decoders' pre-activations affine maps of the input, i.e. the same
    model class; batch norm + ReLU must break that (checked in eval mode, with fitted running statistics)."""
    decoder = make()
    train = torch.randn(256, 16)
    decoder.fit_input_scaling(train)
    decoder.train()
    with torch.no_grad():
        for _ in range(5):
            decoder.relaxed(train)  # give batch norm running statistics of the training features
    decoder.eval()
    x1, x2, a = torch.randn(8, 16), torch.randn(8, 16), 0.3
    with torch.no_grad():
        mixed = decoder.logits(a * x1 + (1 - a) * x2)
        affine = a * decoder.logits(x1) + (1 - a) * decoder.logits(x2)
        assert (mixed - affine).abs().max() > 1e-3
        # control: with the ReLU taken out (features of batch norm alone), the same identity holds exactly
        def linear_features(x):
            return decoder.projection_norm(decoder.projection((x - decoder.input_mean) / decoder.input_scale))
        lin_mixed = decoder.logits_from_features(linear_features(a * x1 + (1 - a) * x2))
        lin_affine = (a * decoder.logits_from_features(linear_features(x1))
                      + (1 - a) * decoder.logits_from_features(linear_features(x2)))
        torch.testing.assert_close(lin_mixed, lin_affine, atol=1e-4, rtol=1e-4)


def test_fc_ablation_shares_the_fifty_q_layer_and_adds_one_dense_layer():
    fc = hashing.FCDecoder(16, 4, seed=0)
    assert fc.projection.out_features == 200 and fc.projection_norm.num_features == 200
    assert fc.dense.in_features == 200 and fc.dense.out_features == 4
    h = torch.rand(3, 200)
    torch.testing.assert_close(fc.logits_from_features(h), h @ fc.dense.weight.T + fc.dense.bias)


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
    decoder.eval()  # batch norm at its initial running statistics (mean 0, var 1): ~identity on one example
    x = torch.full((1, 4), 0.5)  # 50q features all ~2 -> c = (~500, ~0.1) -> s = (1.0, ~0.525)
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


def test_paired_seed_summary_pairs_by_seed_and_refuses_repeats():
    by_seed = pd.DataFrame({"bits": [12, 12, 12, 48], "seed": [0, 1, 2, 0],
                            "a": [0.5, 0.7, 0.6, 0.4], "b": [0.4, 0.8, 0.3, 0.4]})
    table = seed_summary.paired_seed_summary(by_seed, "bits", "a", "b").set_index("bits")
    assert table.loc[12, "n_seeds"] == 3 and table.loc[12, "a"] == pytest.approx(0.6)
    assert table.loc[12, "a_std"] == pytest.approx(0.1)
    assert table.loc[12, "a_minus_b"] == pytest.approx(0.1)  # differences 0.1, -0.1, 0.3
    assert table.loc[12, "a_minus_b_std"] == pytest.approx(0.2)
    assert (table.loc[12, "a_minus_b_min"], table.loc[12, "a_minus_b_max"]) == pytest.approx((-0.1, 0.3))
    assert table.loc[12, "a_wins"] == 2 and table.loc[48, "a_wins"] == 0  # a tie is not a win
    assert np.isnan(table.loc[48, "a_std"])  # one seed: spread unknown, not zero
    with pytest.raises(ValueError, match="repeats"):
        seed_summary.paired_seed_summary(pd.concat([by_seed, by_seed.iloc[:1]]), "bits", "a", "b")
    with pytest.raises(ValueError, match=r"\['b'\]"):
        seed_summary.paired_seed_summary(by_seed.drop(columns="b"), "bits", "a", "b")


def test_hashing_stage_reports_every_seed_and_keeps_the_first_seeds_codes(smoke_store):
    (folder,) = (smoke_store / "stages" / "hashing").iterdir()
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    params = manifest["params"]["hashing"]
    seeds = list(range(params["seed"], params["seed"] + params["seeds"]))
    assert len(seeds) >= 3
    by_seed = pd.read_csv(folder / "table4_map_by_seed.csv")
    assert sorted(map(tuple, by_seed[["bits", "seed"]].values.tolist())) == sorted(
        (q, s) for q in params["bits"] for s in seeds)
    # the summary is the per-seed table summarised, and the logged metrics are the summary's
    table = pd.read_csv(folder / "table4_map.csv")
    expected = seed_summary.paired_seed_summary(by_seed, "bits", "hash_map", "fc_map",
                                                extra_means=("hash_p@10", "fc_p@10"))
    pd.testing.assert_frame_equal(table, expected, check_dtype=False)
    row = table.set_index("bits").loc[48]
    assert manifest["metrics"]["hashing/hash/map_at_48"] == pytest.approx(row["hash_map"])
    assert manifest["metrics"]["hashing/hash_minus_fc/map_at_48"] == pytest.approx(row["hash_map_minus_fc_map"])
    assert manifest["metrics"][f"hashing/seed_{seeds[1]}/fc/map_at_48"] == pytest.approx(
        by_seed.set_index(["bits", "seed"]).loc[(48, seeds[1]), "fc_map"])
    # codes.h5 holds the first seed's codes: their MAP is that seed's row, not another seed's
    with h5py.File(folder / "codes.h5", "r") as fh:
        assert int(fh.attrs["seed"]) == seeds[0]
        score = retrieval.mean_average_precision(fh["hash/48/test"][()], fh["labels/test"][()],
                                                 fh["hash/48/train"][()], fh["labels/train"][()])
    per_seed = by_seed.set_index(["bits", "seed"])["hash_map"]
    assert score == pytest.approx(per_seed.loc[(48, seeds[0])])
    assert per_seed.loc[48].nunique() > 1  # the seeds really trained different decoders


def test_hashing_stage_trains_the_same_decoders_on_freeze3_alone(smoke_store):
    """Tables 4 and 5 on a single DenseNet: the same grid of bits and seeds, codes kept under freeze3/."""
    (folder,) = (smoke_store / "stages" / "hashing").iterdir()
    fused = pd.read_csv(folder / "table4_map_by_seed.csv")
    single = pd.read_csv(folder / "table4_map_by_seed_freeze3.csv")
    assert sorted(map(tuple, single[["bits", "seed"]].values.tolist())) == sorted(
        map(tuple, fused[["bits", "seed"]].values.tolist()))
    expected = seed_summary.paired_seed_summary(single, "bits", "hash_map", "fc_map",
                                                extra_means=("hash_p@10", "fc_p@10"))
    pd.testing.assert_frame_equal(pd.read_csv(folder / "table4_map_freeze3.csv"), expected, check_dtype=False)
    first = int(single["seed"].min())
    with h5py.File(folder / "codes.h5", "r") as fh:
        score = retrieval.mean_average_precision(fh["freeze3/hash/48/test"][()], fh["labels/test"][()],
                                                 fh["freeze3/hash/48/train"][()], fh["labels/train"][()])
        assert not np.array_equal(fh["freeze3/hash/48/train"][()], fh["hash/48/train"][()])
    assert score == pytest.approx(single.set_index(["bits", "seed"]).loc[(48, first), "hash_map"])


def test_last_epoch_diagnostics_only_leave_training_unchanged():
    """The stage skips the per-epoch diagnostic pass: same decoder, same final row, fewer fields before."""
    train_x, train_y = _clusters(200, seed=4)
    val = (train_x[:40], train_y[:40])

    def run(every):
        decoder = hashing.FCDecoder(64, 12, seed=0)
        history = hashing.train_decoder(decoder, train_x, train_y, epochs=3, batch_size=50, seed=2, val=val,
                                        every_epoch_diagnostics=every)
        return history, decoder.state_dict()

    (h_all, s_all), (h_last, s_last) = run(True), run(False)
    assert all(torch.equal(s_all[k], s_last[k]) for k in s_all)
    assert h_last[-1] == h_all[-1] and "fraction_not_binary" in h_last[-1] and "val_map" in h_last[-1]
    assert "fraction_not_binary" not in h_last[0] and "val_map" not in h_last[0]
    assert [r["loss"] for r in h_last] == [r["loss"] for r in h_all]

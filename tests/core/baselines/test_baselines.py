"""Baselines library: network builders and input adaptation, frozen prefixes, resumable training from the
cached prefix, per-network units, SIFT-BoVW + SVM, the AGNet-style fusion, the Freeze3 + network fusion,
side-by-side latency and the shared protocol with the branches (all on CPU, tiny inputs)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from mammo_core.baselines import agnet, freeze3_fusion, latency, networks, sift_bovw, units
from mammo_core.baselines import train as baseline_train
from mammo_core.config import Params, load_params
from mammo_core.errors import ParamsError
from mammo_core.training.checkpoint import CHECKPOINT_NAME, load_safely
from mammo_core.training.loop import TensorData
from mammo_core.training.schedule import Schedule
from tests.helpers.torch_threads import one_torch_thread  # noqa: F401 (autouse: one torch thread here)

CLASSES = ["NORMAL", "MASS", "CALC"]
SCHEDULE = Schedule(epochs=3, batch_size=4, lr=0.02, warmup_epochs=1, warmup_lr=0.005, lr_step=2,
                    rollback_every=2, device="cpu")




def _data(n: int, seed: int, size: int = 32) -> TensorData:
    """Class k is a noisy grey level band around 40 + 80k: learnable in a couple of epochs."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSES)
    noise = torch.randint(0, 40, (n, 1, size, size), generator=g)
    return TensorData((noise + 20 + 80 * labels.view(-1, 1, 1, 1)).to(torch.uint8), labels)


TRAIN, VAL, TEST = _data(12, 1), _data(6, 2), _data(6, 3)


# ---------------------------------------------------------------------------------------------- builders


@pytest.mark.parametrize(("network", "input_size", "feature_dim"), [
    ("vgg16", 32, 4096), ("inception_v3", 75, 2048), ("resnet50", 32, 2048), ("densenet121", 32, 1024),
])
def test_builders_give_class_logits_and_head_features_at_the_patch_size(network, input_size, feature_dim):
    model = networks.build_baseline(network, 7, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        features, logits = model.features_and_logits(x)
        assert torch.allclose(model.head(features), logits, atol=1e-5)  # the features are what the head reads
    assert model.input_size == input_size
    assert logits.shape == (2, 7) and features.shape == (2, feature_dim) == (2, model.feature_dim)
    assert model.weights_tag == networks.RANDOM_INIT_TAG


@pytest.mark.parametrize(("network", "freeze"), [(n, level) for level in networks.FREEZE_LEVELS
                                                 for n in networks.NETWORKS])
def test_frozen_prefix_then_rest_is_torchvisions_forward_and_the_prefix_stays_fixed(network, freeze):
    model = networks.build_baseline(network, 3, 32, vgg_classifier="pooled", freeze=freeze, seed=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model.eval()(x), model.net(model.adapt(x)))  # same arithmetic, cut in two
    split = model.parameter_split()
    assert split["frozen"] > 0 and split["trainable"] > 0
    assert split["frozen"] + split["trainable"] == sum(p.numel() for p in model.parameters())
    prefix = [model.net.get_submodule(path) for path in model.frozen_prefix.paths]
    assert split["frozen"] == sum(p.numel() for m in prefix for p in m.parameters())
    model.train()
    assert all(not m.training for m in prefix) and model.head.training  # frozen batch-norm statistics
    h = model.prefix(x)
    assert not h.requires_grad
    logits, _ = model.training_logits_from_prefix(h)
    logits.sum().backward()
    assert all(p.grad is None for m in prefix for p in m.parameters()) and model.head.weight.grad is not None


def test_vgg_pooled_classifier_is_one_linear_layer_over_the_last_convolution():
    full = networks.build_baseline("vgg16", 5, 32, vgg_classifier="full")
    pooled = networks.build_baseline("vgg16", 5, 32, vgg_classifier="pooled")
    assert isinstance(pooled.head, torch.nn.Linear) and pooled.head.in_features == 512
    assert round(networks.parameter_millions(full), 1) == 134.3
    assert round(networks.parameter_millions(pooled), 1) == 14.7
    with torch.inference_mode():
        assert pooled.eval()(torch.randn(3, 3, 32, 32)).shape == (3, 5)


def test_same_seed_same_initial_weights_other_seed_other_weights():
    a, b, c = (networks.build_baseline("densenet121", 3, 32, seed=s) for s in (4, 4, 5))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.head.weight, c.head.weight)


def test_inception_input_is_upsampled_to_its_minimum_and_its_aux_head_dropped_below_299():
    assert networks.min_input_size("inception_v3") == 75
    assert [networks.input_size_for("inception_v3", s) for s in (32, 75, 128)] == [75, 75, 128]
    assert networks.input_size_for("vgg16", 16) == 32 and networks.input_size_for("resnet50", 16) == 16
    model = networks.build_baseline("inception_v3", 4, 32)
    assert model.adapt(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 75, 75)
    same = torch.randn(1, 3, 75, 75)
    assert model.adapt(same) is same
    assert not model.has_aux
    logits, aux = model.train().training_logits(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 4) and aux is None
    with pytest.raises(ValueError, match="at least 75 px"):
        networks.SingleNetClassifier("inception_v3", 4, input_size=64)


def test_inception_keeps_and_trains_its_aux_head_at_299():
    model = networks.build_baseline("inception_v3", 3, 299).train()
    assert model.has_aux
    logits, aux = model.training_logits(torch.randn(2, 3, 299, 299))
    assert logits.shape == aux.shape == (2, 3)


def test_imagenet_weights_come_from_the_local_hub_cache_or_random_init_is_tagged(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # the hub cache is $TORCH_HOME/hub, as torch.hub's
    assert networks.imagenet_file("densenet121").is_relative_to(tmp_path)
    assert networks.build_baseline("densenet121", 3, 32, weights="imagenet").weights_tag == "none (random init)"
    reference = torchvision.models.densenet121(weights=None)
    state = reference.state_dict()
    # torchvision's published file uses pre-0.4 key names ("norm.1"); the loader must map them back.
    old = {k.replace("denselayer1.norm1.", "denselayer1.norm.1."): v for k, v in state.items()
           if not k.endswith("num_batches_tracked")}  # (the published file predates that buffer)
    path = networks.imagenet_file("densenet121")
    path.parent.mkdir(parents=True)
    torch.save(old, path)
    model = networks.build_baseline("densenet121", 3, 32, weights="imagenet")
    assert model.weights_tag == "imagenet"
    assert torch.equal(model.net.features.conv0.weight, state["features.conv0.weight"])
    assert torch.equal(model.net.features.denseblock1.denselayer1.norm1.weight,
                       state["features.denseblock1.denselayer1.norm1.weight"])
    assert model.head.weight.shape == (3, 1024)  # the new head, not ImageNet's 1000 classes
    torch.save({"features.conv0.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r"densenet121.*features.conv0.weight"):
        networks.build_baseline("densenet121", 3, 32, weights="imagenet")
    path.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=str(path.name)):
        networks.build_baseline("densenet121", 3, 32, weights="imagenet")


def test_unknown_network_is_named():
    with pytest.raises(ValueError, match="alexnet"):
        networks.build_baseline("alexnet", 3, 32)


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(weights before, result, checkpoint folder) of one uninterrupted DenseNet-121 training on TRAIN/VAL.

    Module-scoped: the best-so-far test reads it and the resume test compares against it, one training.
    """
    folder = tmp_path_factory.mktemp("uninterrupted")
    model = networks.build_baseline("densenet121", 3, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = baseline_train.train_baseline(model, TRAIN, VAL, SCHEDULE, checkpoint_dir=folder, class_names=CLASSES)
    return before, result, folder


def test_training_learns_and_stores_best_so_far(uninterrupted):
    before, result, folder = uninterrupted
    after = result.model.state_dict()
    frozen = ("net.features.conv0.", "net.features.norm0.", "net.features.denseblock2.")
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith(frozen))  # incl. BN stats
    assert not torch.equal(after["net.classifier.weight"], before["net.classifier.weight"])
    assert not torch.equal(after["net.features.denseblock4.denselayer1.conv1.weight"],
                           before["net.features.denseblock4.denselayer1.conv1.weight"])
    assert result.cached["train"].shape == (12, 512, 4, 4)  # computed once: 32 px -> 4 x 4 after denseblock2
    assert [r.epoch for r in result.history] == [1, 2, 3]
    assert result.best_val_acc == max(r.val_acc for r in result.history)
    assert result.history[result.best_epoch - 1].val_acc == result.best_val_acc
    assert result.history[0].lr == pytest.approx(0.005) and result.history[1].lr == pytest.approx(0.02)
    saved = load_safely(folder / CHECKPOINT_NAME)
    assert saved["epoch"] == 3 and saved["network"] == "densenet121"
    proba = baseline_train.predict(result.model, VAL)
    assert proba.shape == (6, 3) and np.allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert float((proba.argmax(1) == VAL.labels.numpy()).mean()) == pytest.approx(result.best_val_acc)


class _Killed(RuntimeError):
    pass


def test_resume_after_a_kill_ends_with_the_uninterrupted_weights(uninterrupted, tmp_path):
    _, reference, _ = uninterrupted

    def kill(epoch: int, batch: int) -> None:
        if epoch == 3 and batch == 1:
            raise _Killed

    with pytest.raises(_Killed):
        baseline_train.train_baseline(networks.build_baseline("densenet121", 3, 32), TRAIN, VAL, SCHEDULE,
                                      checkpoint_dir=tmp_path / "run", class_names=CLASSES, on_batch=kill)
    assert load_safely(tmp_path / "run" / CHECKPOINT_NAME)["epoch"] == 2
    torch.manual_seed(99)  # global RNGs come back from the checkpoint
    resumed = baseline_train.train_baseline(networks.build_baseline("densenet121", 3, 32), TRAIN, VAL, SCHEDULE,
                                            checkpoint_dir=tmp_path / "run", class_names=CLASSES)
    assert resumed.resumed_from_epoch == 2
    assert [dataclasses.replace(r, seconds=0) for r in resumed.history] == \
        [dataclasses.replace(r, seconds=0) for r in reference.history]
    ref_state, state = reference.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)


def test_resume_refuses_a_checkpoint_of_another_network_or_schedule(tmp_path):
    one = Schedule(**{**dataclasses.asdict(SCHEDULE), "epochs": 1})
    baseline_train.train_baseline(networks.build_baseline("densenet121", 3, 32), TRAIN, VAL, one,
                                  checkpoint_dir=tmp_path, class_names=CLASSES)
    with pytest.raises(ValueError, match="another architecture"):
        baseline_train.train_baseline(networks.build_baseline("resnet50", 3, 32), TRAIN, VAL, one,
                                      checkpoint_dir=tmp_path, class_names=CLASSES)
    other_lr = Schedule(**{**dataclasses.asdict(SCHEDULE), "epochs": 2, "lr": 0.5})
    with pytest.raises(ValueError, match="lr=0.02"):
        baseline_train.train_baseline(networks.build_baseline("densenet121", 3, 32), TRAIN, VAL, other_lr,
                                      checkpoint_dir=tmp_path, class_names=CLASSES)


# ---------------------------------------------------------------------------------------------- units


def _outcome(network: str, value: float) -> units.NetworkOutcome:
    feats = agnet.FeatureSplits(np.full((4, 2), value, np.float32), np.zeros((2, 2), np.float32),
                                np.zeros((3, 2), np.float32))
    return units.NetworkOutcome(
        network=network, history=[baseline_train.EpochRecord(1, 1.5, 0.5, 0.01, 0.1)], best_epoch=1,
        best_val_acc=0.5, val_probabilities=np.full((2, 3), 1 / 3, np.float32),
        test_probabilities=np.eye(3, dtype=np.float32), features=feats, params_m=7.0, weights="none (random init)",
        input_size=32, epochs=1, patches_train_features=np.full((3, 2), value, np.float32), frozen_layers="conv0..",
        frozen_params=5, trainable_params=2)


def test_a_unit_is_produced_once_then_reused_from_the_store(tmp_path):
    calls = []

    def produce(network: str, value: float):
        def run():
            calls.append(network)
            return _outcome(network, value), None
        return run

    settings = {"epochs": 1}
    key_a = units.unit_key("densenet121", settings, {"augment": "a" * 24, "patches": "p" * 24})
    first = units.obtain_unit(tmp_path, "densenet121", key_a, produce("densenet121", 2.0), params=settings,
                              upstream={})
    again = units.obtain_unit(tmp_path, "densenet121", key_a, produce("densenet121", 9.0), params=settings,
                              upstream={})
    assert calls == ["densenet121"] and not first.reused and again.reused
    assert np.array_equal(again.features.train, np.full((4, 2), 2.0)) and again.history == first.history
    assert np.array_equal(again.patches_train_features, np.full((3, 2), 2.0))
    assert (again.frozen_layers, again.frozen_params, again.trainable_params) == ("conv0..", 5, 2)
    assert (tmp_path / "units" / "baselines" / key_a / "manifest.json").is_file()
    key_b = units.unit_key("resnet50", settings, {"augment": "a" * 24, "patches": "p" * 24})
    units.obtain_unit(tmp_path, "resnet50", key_b, produce("resnet50", 3.0), params=settings, upstream={})
    assert calls == ["densenet121", "resnet50"]


def test_a_damaged_unit_is_trained_again_and_replaced(tmp_path):
    calls = []

    def produce(value: float):
        def run():
            calls.append(value)
            return _outcome("densenet121", value), None
        return run

    key = units.unit_key("densenet121", {"epochs": 1}, {})
    units.obtain_unit(tmp_path, "densenet121", key, produce(2.0), params={"epochs": 1}, upstream={})
    outputs = tmp_path / "units" / "baselines" / key / units.OUTPUTS_FILE
    data = bytearray(outputs.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    outputs.write_bytes(data)
    again = units.obtain_unit(tmp_path, "densenet121", key, produce(5.0), params={"epochs": 1}, upstream={})
    assert calls == [2.0, 5.0] and not again.reused
    reread = units.obtain_unit(tmp_path, "densenet121", key, produce(9.0), params={"epochs": 1}, upstream={})
    assert calls == [2.0, 5.0] and reread.reused
    assert np.array_equal(reread.features.train, np.full((4, 2), 5.0))


def test_adding_a_network_leaves_the_other_unit_keys_alone():
    from tasks.stages.baselines import _unit_settings, baseline_schedule

    small = Params.model_validate({"baselines": {"networks": ["densenet121"], "classic": []}})
    large = Params.model_validate({"baselines": {"networks": ["densenet121", "resnet50"], "classic": [],
                                                 "latency_repeats": 3, "n_boot": 10}})
    longer = Params.model_validate({"baselines": {"networks": ["densenet121"], "classic": []}, "train": {"epochs": 3}})
    up = {"augment": "a" * 24, "patches": "p" * 24}

    def key(p, upstream=up):
        return units.unit_key("densenet121", _unit_settings(p.baselines, "densenet121", baseline_schedule(p)), upstream)

    assert key(small) == key(large) != key(longer)
    assert key(small) != key(small, {**up, "augment": "b" * 24})


@pytest.mark.parametrize("params_file", sorted((Path(__file__).resolve().parents[3] / "params").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_baselines_share_rows_epochs_and_schedule_with_the_branches(params_file):
    from tasks.stages import baselines as stage

    params = load_params(params_file)
    branches = Schedule.from_params({**params.train.model_dump(), "device": params.run.device})
    assert stage.baseline_schedule(params) == branches
    assert stage.baseline_schedule(params).epochs == params.train.epochs
    # rows: both stages read the augment stage's file whole; the baselines have no row budget of their own
    assert "augment" in stage.SPEC.upstream and "train" in stage.SPEC.sections
    assert not {"epochs", "lr", "batch_size", "warmup_epochs", "rollback_every", "max_train_rows"} \
        & set(params.baselines.model_dump())
    for key in ("epochs=3", "max_train_rows=10"):  # a params file cannot give the baselines another budget
        with pytest.raises(ParamsError, match=key.split("=")[0]):
            load_params(params_file, [f"baselines.{key}"])


def test_a_broken_unit_is_named(tmp_path):
    (tmp_path / units.UNIT_FILE).write_text("{}")
    with pytest.raises(ValueError, match=str(tmp_path)):
        units.read_unit(tmp_path)


# ---------------------------------------------------------------------------------------------- SIFT-BoVW


def _textured(n: int, seed: int) -> np.ndarray:
    """Random blobs on a mid-grey background: plenty of SIFT keypoints."""
    rng = np.random.default_rng(seed)
    images = np.full((n, 1, 32, 32), 120, np.uint8)
    for image in images:
        for _ in range(6):
            y, x = rng.integers(4, 28, 2)
            image[0, y - 3:y + 3, x - 3:x + 3] = rng.choice([10, 250])
    return images


def test_sift_finds_keypoints_on_texture_and_none_on_flat_patches():
    flat = np.full((3, 1, 32, 32), 90, np.uint8)
    descriptors = sift_bovw.sift_descriptors(np.concatenate([_textured(3, 0), flat]), image_size=96)
    assert [len(d) > 0 for d in descriptors] == [True, True, True, False, False, False]
    assert all(d.shape[1] == 128 and d.dtype == np.float32 for d in descriptors)
    vocabulary = sift_bovw.fit_vocabulary(descriptors, 8, seed=0)
    hist = sift_bovw.histograms(descriptors, vocabulary)
    assert np.allclose(hist[:3].sum(axis=1), 1.0) and not hist[3:].any()  # empty patches: zero rows


def test_sift_bovw_svm_separates_texture_from_flat_and_counts_the_blind_patches():
    flat_train = np.full((6, 1, 32, 32), 60, np.uint8)
    x_train = np.concatenate([_textured(6, 1), flat_train])
    y_train = np.array([1] * 6 + [0] * 6)
    x_test = np.concatenate([_textured(4, 2), np.full((2, 1, 32, 32), 200, np.uint8)])
    result = sift_bovw.sift_bovw_svm(x_train, y_train, x_test, sift_bovw.BovwSettings(image_size=96,
                                                                                     vocabulary_size=8))
    assert result.predictions.tolist() == [1, 1, 1, 1, 0, 0]
    assert result.empty == {"train": 6, "test": 2}
    assert result.vocabulary_size == 8 and result.descriptors > 8
    assert "train 6/12, test 2/6" in result.detail({"train": 12, "test": 6})


def test_sift_without_any_training_keypoint_is_a_clear_error():
    flat = np.full((4, 1, 32, 32), 90, np.uint8)
    with pytest.raises(ValueError, match="no keypoint in any training patch"):
        sift_bovw.sift_bovw_svm(flat, np.array([0, 1, 0, 1]), flat)
    with pytest.raises(ValueError, match="uint8"):
        sift_bovw.sift_descriptors(np.zeros((2, 3, 8, 8), np.float32))


# ---------------------------------------------------------------------------------------------- AGNet


def test_agnet_fusion_uses_both_networks_features():
    rng = np.random.default_rng(0)
    n = {"train": 90, "val": 30, "test": 30}
    labels = {s: rng.integers(0, 4, k) for s, k in n.items()}
    # Network a knows bit 0 of the class, network b bit 1: only the two together tell all four classes.
    a = agnet.FeatureSplits(*((np.c_[labels[s] % 2, rng.normal(size=(n[s], 5))] + 0.05 * rng.normal(size=(n[s], 6)))
                              for s in n))
    b = agnet.FeatureSplits(*((np.c_[labels[s] // 2, rng.normal(size=(n[s], 3))] + 0.05 * rng.normal(size=(n[s], 4)))
                              for s in n))
    fused = agnet.agnet_fusion(a, b, labels["train"], labels["val"], ("vgg16", "inception_v3"))
    assert float((fused.test_predictions == labels["test"]).mean()) == 1.0
    assert fused.test_probabilities.shape == (30, 4) and fused.chosen_c in (0.1, 1.0, 10.0)
    only_a = agnet.agnet_fusion(a, a, labels["train"], labels["val"], ("vgg16", "resnet50"))
    assert float((only_a.test_predictions == labels["test"]).mean()) < 0.8
    assert "vgg16 + inception_v3" in fused.detail()
    with pytest.raises(ValueError, match="two different"):
        agnet.agnet_fusion(a, b, labels["train"], labels["val"], ("vgg16", "vgg16"))
    short = agnet.FeatureSplits(b.train[:10], b.val, b.test)
    with pytest.raises(ValueError, match="train: the two networks' features have 90 and 10 rows"):
        agnet.fuse_features(a, short)


# ---------------------------------------------------------------------------------------------- Freeze3 + network


def test_freeze3_fusion_sums_both_networks_and_chooses_the_weight_on_validation():
    rng = np.random.default_rng(0)
    n = {"train": 120, "val": 60, "test": 60}
    labels = {s: rng.integers(0, 4, k) for s, k in n.items()}
    # Freeze3 knows bit 0 of the class, the other network bit 1 (and is wider): only together all four.
    a = agnet.FeatureSplits(*(np.c_[labels[s] % 2, rng.normal(size=(n[s], 5))] + 0.05 * rng.normal(size=(n[s], 6))
                              for s in n))
    b = agnet.FeatureSplits(*(np.c_[labels[s] // 2, rng.normal(size=(n[s], 11))] + 0.05 * rng.normal(size=(n[s], 12))
                              for s in n))
    fused = freeze3_fusion.fuse_with_freeze3("Freeze3+VGG16", a, b, labels["train"], labels["val"], 4)
    alone = freeze3_fusion.probe_fused("Freeze3", a, labels["train"], labels["val"], 4)
    acc = float((fused.test_predictions == labels["test"]).mean())
    assert acc > 0.9 > 0.6 > float((alone.test_predictions == labels["test"]).mean())
    assert fused.weight in freeze3_fusion.WEIGHT_GRID and alone.weight is None
    assert fused.test_scores.shape == (60, 4) and np.allclose(fused.test_scores.sum(axis=1), 1.0, atol=1e-5)
    assert np.array_equal(fused.test_scores.argmax(axis=1), fused.test_predictions)
    rotation = freeze3_fusion.Rotation.seeded(18, seed=3)  # one isometry, both blocks in every coordinate
    x, z = rng.normal(size=(5, 6)).astype(np.float32), rng.normal(size=(5, 12)).astype(np.float32)
    summed = freeze3_fusion.weighted_sum(x, z, 0.3, rotation)
    assert np.allclose(np.linalg.norm(summed, axis=1), np.linalg.norm(np.c_[0.3 * x, 0.7 * z], axis=1), atol=1e-4)
    assert np.count_nonzero(np.abs(freeze3_fusion.weighted_sum(x, 0 * z, 1.0, rotation)) > 1e-6) > 12
    short = agnet.FeatureSplits(b.train[:10], b.val, b.test)
    with pytest.raises(ValueError, match="train: 120 Freeze3 rows but 10 rows"):
        freeze3_fusion.fuse_with_freeze3("Freeze3+VGG16", a, short, labels["train"], labels["val"], 4)


# ---------------------------------------------------------------------------------------------- latency, params


def test_latency_is_measured_for_every_model_side_by_side():
    models = {"small": torch.nn.Conv2d(3, 4, 3), "large": torch.nn.Sequential(*[torch.nn.Conv2d(3, 3, 3, padding=1)
                                                                               for _ in range(40)])}
    ms = latency.latency_ms(models, 64, repeats=5)
    assert set(ms) == {"small", "large"} and all(v > 0 for v in ms.values())
    assert ms["large"] > ms["small"]


def test_baselines_params_name_a_bad_key(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("baselines:\n  networks: [densenet121]\n  classic: [agnet]\n")
    with pytest.raises(ParamsError, match="agnet_pair"):
        load_params(bad)
    bad.write_text("baselines:\n  networks: [alexnet]\n")
    with pytest.raises(ParamsError, match="baselines.networks"):
        load_params(bad)
    for name in ("smoke", "default", "paper"):
        load_params(Path(__file__).resolve().parents[3] / "params" / f"{name}.yaml")


# ---------------------------------------------------------------------------------------------- issue 18 speed


def test_prefix_pass_in_inference_mode_and_channels_last_is_the_plain_prefix():
    """The cached prefix (inference mode, channels-last convolutions) equals the plain prefix up to float
    rounding, and is an ordinary contiguous tensor the trainable rest can train from."""
    model = networks.build_baseline("resnet50", 3, 32, freeze="deep").eval()
    with torch.no_grad():
        plain = model.prefix(baseline_train.prepare_images(TRAIN.images, "cpu"))
    cached = baseline_train.prefix_outputs(model, TRAIN, 5, "cpu")
    torch.testing.assert_close(cached, plain, atol=1e-4, rtol=1e-4)
    assert cached.is_contiguous() and not cached.is_inference()
    model.train()
    logits, _ = model.training_logits_from_prefix(cached[:4])
    logits.sum().backward()  # autograd may save it for backward
    assert model.head.weight.grad is not None


def test_patches_train_rows_are_found_in_the_augmented_set_by_their_bytes():
    augmented = TensorData(torch.cat([TRAIN.images, TRAIN.images.flip(-1)]), torch.cat([TRAIN.labels, TRAIN.labels]))
    originals = TensorData(TRAIN.images[[5, 0, 7]], TRAIN.labels[[5, 0, 7]])
    assert units.rows_holding(augmented, originals).tolist() == [5, 0, 7]
    unseen = TensorData(TEST.images[:2], TEST.labels[:2])
    assert units.rows_holding(augmented, unseen) is None  # then the stage reads those rows out itself
    relabelled = TensorData(TRAIN.images[:1], (TRAIN.labels[:1] + 1) % len(CLASSES))
    assert units.rows_holding(augmented, relabelled) is None


def test_patches_train_features_equal_their_own_read_out(tmp_path):
    """The Freeze3 + X fusion's training features, taken from the augmented set's read-out of the same
    images, equal a read-out of the patches' training split itself."""
    patches_train = TensorData(TRAIN.images[::2], TRAIN.labels[::2])
    data = units.BaselineData(train=TRAIN, val=VAL, test=TEST, class_names=CLASSES, patches_train=patches_train)
    sched = dataclasses.replace(SCHEDULE, epochs=1)
    outcome, _ = units.train_network("densenet121", data, sched, weights="none", vgg_classifier="pooled",
                                     keep_weights=False, checkpoint_dir=tmp_path, freeze="deep")
    rebuilt = networks.build_baseline("densenet121", 3, 32, freeze="deep")
    rebuilt.load_state_dict(baseline_train.train_baseline(
        rebuilt, TRAIN, VAL, sched, checkpoint_dir=tmp_path, class_names=CLASSES).model.state_dict())
    direct = baseline_train.extract_features(rebuilt.eval(), patches_train)
    np.testing.assert_allclose(outcome.patches_train_features, direct, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(outcome.patches_train_features, outcome.features.train[::2], atol=0, rtol=0)

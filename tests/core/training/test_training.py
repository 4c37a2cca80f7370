"""Freeze1..3 training: shared vs cached vs separate equality, resume after a kill, bad input.

Everything runs on CPU with a real FusedDenseNet on 16x16 patches (the trunk ends at a 1x1 map) and a
dozen samples, so a training epoch costs well under a second.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mammo_core.config import load_params
from mammo_core.errors import ParamsError
from mammo_core.models.fused import FusedDenseNet, branch_state_dict, build_single
from mammo_core.training.checkpoint import CHECKPOINT_NAME, FORMAT_VERSION, load_safely, previous_path, save_atomic
from mammo_core.training.loop import (
    CUDA_CACHE_SHARE,
    DEFAULT_CACHE_MAX_BYTES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TensorData,
    TrainingDiverged,
    cache_budget_bytes,
    check_training_classes,
    evaluate,
    load_tensor_data,
    prepare_images,
    read_rows,
    train_branches,
    train_separate,
)
from mammo_core.training.schedule import Schedule
from tests.helpers.torch_threads import one_torch_thread  # noqa: F401 (autouse: one torch thread here)

FREEZE = {"freeze1": "denseblock3", "freeze2": "denseblock3.denselayer23", "freeze3": "denseblock3.denselayer22"}
CLASSES = ["NORMAL", "MASS", "CALC"]
SCHEDULE = Schedule(
    epochs=3, batch_size=4, lr=0.05, warmup_epochs=1, warmup_lr=0.01, lr_step=2, rollback_every=2, device="cpu"
)


def _data(n: int, seed: int) -> TensorData:
    """Class k is a noisy grey level band around 40 + 80k: learnable in a couple of epochs."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSES)
    noise = torch.randint(0, 40, (n, 1, 16, 16), generator=g)
    return TensorData((noise + 20 + 80 * labels.view(-1, 1, 1, 1)).to(torch.uint8), labels)


TRAIN = _data(12, 1)
VAL = _data(6, 2)




@pytest.fixture(scope="module")
def base() -> FusedDenseNet:
    return FusedDenseNet(len(CLASSES), FREEZE, seed=0)


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """One uninterrupted shared run: the result every other mode and every resume must reproduce."""
    model = copy.deepcopy(base)
    reports = []
    result = train_branches(model, TRAIN, VAL, SCHEDULE, mode="shared", class_names=CLASSES,
                            checkpoint_dir=tmp_path_factory.mktemp("ref"), on_epoch=reports.append)
    return result, reports


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} entries differ, first {different[0]}"


# ----------------------------------------------------------------------------------------------
# Schedule and inputs


def test_paper_schedule_learning_rates():
    s = Schedule()
    assert (s.epochs, s.batch_size, s.momentum, s.weight_decay, s.rollback_every) == (100, 32, 0.9, 5e-4, 5)
    assert [s.lr_at(e) for e in (0, 4)] == [1e-5, 1e-5]
    assert [s.lr_at(e) for e in (5, 19, 20, 39, 40, 99)] == pytest.approx([0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-6])
    assert [e for e in range(12) if s.is_rollback_epoch(e)] == [4, 9]  # after epochs 5 and 10 (1-based)
    assert Schedule.from_params({"epochs": 7, "batch_size": 8, "freeze_upto": "x"}) == Schedule(epochs=7, batch_size=8)
    with pytest.raises(ParamsError, match="train.batch_size"):  # ranges are the params schema's to check
        load_params(overrides=["train.batch_size=0"])
    with pytest.raises(ValueError, match="schedule.device"):
        Schedule(device="gpu")


def test_prepare_images_maps_to_three_imagenet_normalised_channels():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)
    x = prepare_images(images, "cpu")
    assert x.shape == (2, 3, 1, 1) and x.dtype == torch.float32
    for c in range(3):
        assert x[0, c, 0, 0].item() == pytest.approx(-IMAGENET_MEAN[c] / IMAGENET_STD[c], rel=1e-6)
        assert x[1, c, 0, 0].item() == pytest.approx((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], rel=1e-6)


def test_load_tensor_data_selects_split_and_rejects_bad_files(tmp_path):
    path = tmp_path / "patches.h5"
    with h5py.File(path, "w") as fh:
        fh["images"] = np.arange(4 * 16, dtype=np.uint8).reshape(4, 1, 4, 4)
        fh["labels"] = np.array([0, 1, 2, 1], dtype=np.int64)
        fh["split"] = np.array([0, 1, 0, 2], dtype=np.int8)
    data = load_tensor_data(path, split=0)
    assert data.labels.tolist() == [0, 2] and data.images[1, 0, 0, 0].item() == 32
    assert len(load_tensor_data(path)) == 4
    with h5py.File(path, "a") as fh:
        del fh["labels"]
    with pytest.raises(ValueError, match=r"patches\.h5.*'labels' missing"):
        load_tensor_data(path)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="junk.h5"):
        load_tensor_data(junk)


def test_class_without_training_samples_is_named(base, tmp_path):
    labels = torch.tensor([0, 2, 0, 2])
    with pytest.raises(ValueError, match=r"'MASS' \(label 1\)"):
        check_training_classes(labels, 3, CLASSES)
    data = TensorData(TRAIN.images[:4], labels)
    with pytest.raises(ValueError, match="MASS"):
        train_branches(copy.deepcopy(base), data, VAL, SCHEDULE, class_names=CLASSES, checkpoint_dir=tmp_path)
    assert not (tmp_path / CHECKPOINT_NAME).exists()
    empty = TensorData(VAL.images[:0], VAL.labels[:0])
    with pytest.raises(ValueError, match="validation set is empty"):
        train_branches(copy.deepcopy(base), TRAIN, empty, SCHEDULE, class_names=CLASSES, checkpoint_dir=tmp_path)


def test_dataloader_workers_give_the_same_weights(base, reference, tmp_path):
    model = copy.deepcopy(base)
    schedule = dataclasses.replace(SCHEDULE, num_workers=1)
    train_branches(model, TRAIN, VAL, schedule, class_names=CLASSES, checkpoint_dir=tmp_path)
    _assert_same_weights(model, reference[0].model)


# ----------------------------------------------------------------------------------------------
# Modes


def test_shared_run_learns_checkpoints_and_keeps_frozen_parts(base, reference, tmp_path):
    result, reports = reference
    assert [r.epoch for r in reports] == [1, 2, 3] and result.history == reports
    assert [r.lr["freeze1"] for r in reports] == pytest.approx([0.01, 0.05, 0.005])
    for b in FREEZE:
        assert reports[-1].train_loss[b] < reports[0].train_loss[b]
        assert result.best_val_acc[b] == max(r.val_acc[b] for r in reports)
        assert reports[result.best_epoch[b] - 1].val_acc[b] == result.best_val_acc[b]
    model = result.model
    # frozen: the trunk, freeze1's dense layers 23 and 24, freeze2's layer 23: never moved, BN stats included
    _assert_same_weights(model.trunk, base.trunk)
    for b, expected in (("freeze1", 2), ("freeze2", 1), ("freeze3", 0)):
        frozen = [n for n, m in base.branches[b].named_children() if not any(p.requires_grad for p in m.parameters())]
        assert len(frozen) == expected
        for name in frozen:
            _assert_same_weights(model.branches[b].get_submodule(name), base.branches[b].get_submodule(name))
    assert not torch.equal(model.heads["freeze3"].weight, base.heads["freeze3"].weight)
    saved = load_safely(result.checkpoint)
    assert saved["epoch"] == 3 and len(saved["history"]) == 3
    assert set(saved["rng"]) >= {"torch", "shuffle", "numpy", "python"}
    # no temp files left; the epoch before stays as the fallback
    assert sorted(p.name for p in result.checkpoint.parent.iterdir()) == sorted([CHECKPOINT_NAME, "checkpoint.prev.pt"])
    assert load_safely(previous_path(result.checkpoint))["epoch"] == 2


def test_cached_mode_gives_identical_weights(base, reference, tmp_path):
    model = copy.deepcopy(base)
    # Freeze1 freezes denselayer23 like Freeze2 does: the cache computes that frozen layer once (Freeze2's
    # copy) and carries Freeze2's output on through Freeze1's own extra frozen layer 24.
    calls = {"freeze1": 0, "freeze2": 0}
    for b in calls:
        model.branches[b].get_submodule("denseblock3_23to23").register_forward_hook(
            lambda *_, b=b: calls.__setitem__(b, calls[b] + 1))
    result = train_branches(model, TRAIN, VAL, SCHEDULE, mode="cached", class_names=CLASSES, checkpoint_dir=tmp_path)
    _assert_same_weights(model, reference[0].model)
    assert result.history[-1].train_loss == reference[0].history[-1].train_loss
    assert [r.val_acc for r in result.history] == [r.val_acc for r in reference[0].history]
    assert result.trunk_cache_seconds > 0
    chunks = sum(1 + -(-len(d) // SCHEDULE.batch_size) for d in (TRAIN, VAL))  # a shape probe + the chunks
    assert calls == {"freeze1": 0, "freeze2": chunks}


def test_cached_mode_through_scratch_hdf5_gives_identical_weights(base, reference, tmp_path):
    model = copy.deepcopy(base)
    train_branches(model, TRAIN, VAL, SCHEDULE, mode="cached", class_names=CLASSES, checkpoint_dir=tmp_path,
                   cache_max_bytes=0)
    _assert_same_weights(model, reference[0].model)
    assert not list(tmp_path.glob("*trunk_cache*"))  # scratch removed


def test_cache_rows_are_read_back_in_the_batch_order(tmp_path):
    values = np.arange(6 * 2 * 3, dtype=np.float32).reshape(6, 2, 3)
    with h5py.File(tmp_path / "cache.h5", "w") as fh:
        fh.create_dataset("trunk", data=values, chunks=(1, 2, 3))
    with h5py.File(tmp_path / "cache.h5", "r") as fh:
        rows = read_rows(fh["trunk"], np.array([4, 0, 5, 2]))
    assert np.array_equal(rows, values[[4, 0, 5, 2]])


def test_the_cache_budget_is_the_devices():
    assert cache_budget_bytes(torch.device("cpu")) == DEFAULT_CACHE_MAX_BYTES
    if torch.cuda.is_available():  # on a GPU, a share of its free memory: far beyond the CPU's 2 GiB on an H200
        free, _ = torch.cuda.mem_get_info()
        assert cache_budget_bytes(torch.device("cuda")) == int(free * CUDA_CACHE_SHARE)


def test_separate_training_matches_the_shared_branch(reference, tmp_path):
    single = build_single(FREEZE["freeze3"], len(CLASSES), seed=0, name="freeze3")
    results = train_separate({"freeze3": single}, TRAIN, VAL, SCHEDULE, class_names=CLASSES, checkpoint_dir=tmp_path)
    shared = reference[0]
    assert [r.train_loss["freeze3"] for r in results["freeze3"].history] == [
        r.train_loss["freeze3"] for r in shared.history
    ]
    assert results["freeze3"].best_epoch["freeze3"] == shared.best_epoch["freeze3"]
    mine, theirs = branch_state_dict(single, "freeze3"), branch_state_dict(shared.model, "freeze3")
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert (tmp_path / "freeze3" / CHECKPOINT_NAME).is_file()


def test_separate_training_with_cached_frozen_prefix_matches_the_shared_branch(reference, tmp_path):
    # Freeze1 freezes the most (a single network's frozen prefix is its ``trunk``): computed once, for the cache.
    single = build_single(FREEZE["freeze1"], len(CLASSES), seed=0, name="freeze1")
    calls = []
    single.trunk.register_forward_hook(lambda *_: calls.append(1))
    result = train_separate({"freeze1": single}, TRAIN, VAL, SCHEDULE, class_names=CLASSES, checkpoint_dir=tmp_path,
                            cache_frozen=True)["freeze1"]
    shared = reference[0]
    assert result.mode == "separate" and result.trunk_cache_seconds > 0
    assert [r.train_loss["freeze1"] for r in result.history] == [r.train_loss["freeze1"] for r in shared.history]
    assert [r.val_acc["freeze1"] for r in result.history] == [r.val_acc["freeze1"] for r in shared.history]
    mine, theirs = branch_state_dict(single, "freeze1"), branch_state_dict(shared.model, "freeze1")
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    chunks = sum(1 + -(-len(d) // SCHEDULE.batch_size) for d in (TRAIN, VAL))  # a shape probe + the chunks
    assert len(calls) == chunks  # the frozen prefix ran for the cache only, never in the 3 epochs


def test_evaluate_reports_consistent_predictions(reference):
    model = reference[0].model.train()
    out = evaluate(model, VAL, batch_size=4)
    assert model.training  # evaluate restores the mode
    model.eval()
    with torch.inference_mode():
        logits = model(prepare_images(VAL.images, "cpu"))
    for b, ev in out.items():
        assert ev.predictions.tolist() == logits[b].argmax(1).tolist()
        np.testing.assert_allclose(ev.probabilities.sum(axis=1), 1.0, rtol=1e-5)
        assert ev.confusion.shape == (3, 3) and ev.confusion.sum() == len(VAL)
        assert ev.confusion.sum(axis=1).tolist() == [2, 2, 2]
        assert ev.accuracy == pytest.approx(np.trace(ev.confusion) / len(VAL))
        assert ev.accuracy == reference[0].best_val_acc[b]  # the best weights are the ones returned


# ----------------------------------------------------------------------------------------------
# Resume after a kill


class _Killed(Exception):
    pass


def _kill_after_epoch(n):
    def hook(report):
        if report.epoch == n:
            raise _Killed

    return hook


def _kill_in_batch(epoch, batch):
    def hook(e, i):
        if (e, i) == (epoch, batch):
            raise _Killed

    return hook


@pytest.mark.parametrize("where", ["after_epoch_2", "mid_epoch_2"])
def test_resume_after_kill_ends_with_the_same_weights(base, reference, tmp_path, where):
    hooks = {"on_epoch": _kill_after_epoch(2)} if where == "after_epoch_2" else {"on_batch": _kill_in_batch(2, 1)}
    with pytest.raises(_Killed):
        train_branches(copy.deepcopy(base), TRAIN, VAL, SCHEDULE, class_names=CLASSES, checkpoint_dir=tmp_path,
                       **hooks)
    completed = 2 if where == "after_epoch_2" else 1
    assert load_safely(tmp_path / CHECKPOINT_NAME)["epoch"] == completed
    # Global RNGs must be restored from the checkpoint too: disturb them before resuming.
    torch.manual_seed(1234)
    np.random.seed(1234)
    model = copy.deepcopy(base)
    result = train_branches(model, TRAIN, VAL, SCHEDULE, class_names=CLASSES, checkpoint_dir=tmp_path)
    assert result.resumed_from_epoch == completed
    _assert_same_weights(model, reference[0].model)
    untimed = [dataclasses.replace(r, seconds=0.0) for r in result.history]
    assert untimed == [dataclasses.replace(r, seconds=0.0) for r in reference[0].history]
    assert result.history[:completed] == [r for r in result.history if r.epoch <= completed]
    last = load_safely(tmp_path / CHECKPOINT_NAME)
    ref_last = load_safely(reference[0].checkpoint)
    assert all(torch.equal(last["model"][k], ref_last["model"][k]) for k in ref_last["model"])


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one_with_a_warning(base, reference, tmp_path):
    with pytest.raises(_Killed):
        train_branches(copy.deepcopy(base), TRAIN, VAL, SCHEDULE, class_names=CLASSES, checkpoint_dir=tmp_path,
                       on_epoch=_kill_after_epoch(2))
    latest = tmp_path / CHECKPOINT_NAME
    assert load_safely(previous_path(latest))["epoch"] == 1
    damaged = bytearray(latest.read_bytes())  # a damaged sector: same size, bytes in the middle garbled
    damaged[len(damaged) // 3: len(damaged) // 3 + 4096] = b"\xff" * 4096
    latest.write_bytes(bytes(damaged))
    model = copy.deepcopy(base)
    with pytest.warns(RuntimeWarning, match=r"checkpoint\.pt: cannot be read .* previous checkpoint"):
        result = train_branches(model, TRAIN, VAL, SCHEDULE, class_names=CLASSES, checkpoint_dir=tmp_path)
    assert result.resumed_from_epoch == 1, "epoch 2 is trained again from the previous checkpoint"
    _assert_same_weights(model, reference[0].model)


# ----------------------------------------------------------------------------------------------
# Roll-back and divergence


def test_rollback_restores_best_weights_when_current_are_worse(base, tmp_path):
    sched = Schedule(epochs=4, batch_size=4, lr=0.05, warmup_epochs=0, lr_step=0, rollback_every=1, device="cpu")
    seen = {}

    def sabotage(report):  # once freeze2 first beats chance, make it predict MASS for everything
        if "epoch" in seen and report.epoch == seen["epoch"] + 1:
            seen["bias_after"] = model.heads["freeze2"].bias.detach().clone()
        if "epoch" not in seen and report.val_acc["freeze2"] > 1 / 3:
            seen.update(epoch=report.epoch, bias=model.heads["freeze2"].bias.detach().clone())
            with torch.no_grad():
                model.heads["freeze2"].bias[1] = 1e4

    model = copy.deepcopy(base)
    result = train_branches(model, TRAIN, VAL, sched, class_names=CLASSES, checkpoint_dir=tmp_path, on_epoch=sabotage)
    assert seen.get("epoch", 4) < 4, "freeze2 must beat chance before the last epoch for this test to mean anything"
    after = result.history[seen["epoch"]]  # the epoch trained from the sabotaged weights
    assert after.val_acc["freeze2"] == pytest.approx(1 / 3)
    assert "freeze2" in after.rolled_back
    assert torch.equal(seen["bias_after"], seen["bias"])  # back to the best epoch's weights, exactly
    assert result.best_epoch["freeze2"] != after.epoch


def test_nan_loss_stops_with_a_clear_error_and_keeps_last_good_checkpoint(base, tmp_path):
    model = copy.deepcopy(base)

    def poison(report):
        if report.epoch == 1:
            with torch.no_grad():
                model.heads["freeze2"].weight[0, 0] = float("nan")

    with pytest.raises(TrainingDiverged, match=r"'freeze2' diverged in epoch 2") as info:
        train_branches(model, TRAIN, VAL, SCHEDULE, class_names=CLASSES, checkpoint_dir=tmp_path, on_epoch=poison)
    assert info.value.branch == "freeze2" and info.value.epoch == 2
    saved = load_safely(tmp_path / CHECKPOINT_NAME)
    assert saved["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------------------------
# Bad checkpoints


def test_checkpoint_of_another_architecture_names_file_and_key(base, tmp_path):
    state = dict(base.state_dict())
    state["heads.freeze1.weight"] = torch.zeros(4, state["heads.freeze1.weight"].shape[1])
    save_atomic({"format": FORMAT_VERSION, "model": state}, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match=r"checkpoint\.pt.*first mismatched key 'heads\.freeze1\.weight'"):
        train_branches(copy.deepcopy(base), TRAIN, VAL, SCHEDULE, class_names=CLASSES, checkpoint_dir=tmp_path)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_crafted_pickle_checkpoint_is_refused(base, tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / CHECKPOINT_NAME).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="refused"):
        train_branches(copy.deepcopy(base), TRAIN, VAL, SCHEDULE, class_names=CLASSES, checkpoint_dir=tmp_path)
    assert not marker.exists()

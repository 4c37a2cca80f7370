"""Unit tests of mammo_core.detection: boxes under augmentation, data loading, heads, resume, metrics."""

from __future__ import annotations

import copy
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mammo_core.detection import bootstrap, builders, data, engine, evaluate, feature_cache, heads, latency, records

CLASSES = ["MASS_BENIGN", "MASS_MALIGNANT", "CALC_BENIGN", "CALC_MALIGNANT"]


# ------------------------------------------------------------------------------------------ boxes


def test_flips_mirror_boxes_and_pixels_together():
    image = torch.zeros(1, 20, 30)
    image[0, 2:6, 3:10] = 1.0
    boxes = torch.tensor([[3.0, 2.0, 10.0, 6.0]])
    flipped, fb = data.hflip(image, boxes)
    assert fb.tolist() == [[20.0, 2.0, 27.0, 6.0]]
    ys, xs = torch.nonzero(flipped[0], as_tuple=True)
    assert (xs.min().item(), xs.max().item() + 1) == (20, 27)
    vflipped, vb = data.vflip(image, boxes)
    assert vb.tolist() == [[3.0, 14.0, 10.0, 18.0]]
    ys, _ = torch.nonzero(vflipped[0], as_tuple=True)
    assert (ys.min().item(), ys.max().item() + 1) == (14, 18)


def test_rotation_by_90_degrees_recomputes_the_box_exactly():
    # square 40x40 image, box 10 wide and 4 high; rotated 90 degrees counter-clockwise about (20, 20)
    out = data.rotate_boxes(torch.tensor([[5.0, 8.0, 15.0, 12.0]]), 90.0, 40, 40)
    assert out[0].tolist() == pytest.approx([8.0, 25.0, 12.0, 35.0])


def test_rotated_box_encloses_the_rotated_object():
    image = torch.zeros(1, 64, 64)
    image[0, 20:30, 24:44] = 1.0
    boxes = torch.tensor([[24.0, 20.0, 44.0, 30.0]])
    rotated, out = data.rotate(image, boxes, 10.0)
    ys, xs = torch.nonzero(rotated[0] > 0.5, as_tuple=True)
    x0, y0, x1, y1 = out[0].tolist()
    assert x0 <= xs.min().item() + 0.5 and xs.max().item() + 0.5 <= x1 + 0.5
    assert y0 <= ys.min().item() + 0.5 and ys.max().item() + 0.5 <= y1 + 0.5
    # and it is tight: the enclosing box of the turned corners, not the whole image
    assert (x1 - x0) < 26 and (y1 - y0) < 18 and (x1 - x0) > 20


def test_positive_window_holds_its_lesion_and_moves_with_it():
    image = torch.arange(200 * 120, dtype=torch.float32).reshape(1, 200, 120)
    boxes = torch.tensor([[70.0, 150.0, 90.0, 170.0], [5.0, 5.0, 15.0, 15.0]])
    labels = torch.tensor([2, 3])
    g = torch.Generator().manual_seed(0)
    seen_left = set()
    for _ in range(40):
        window, out, kept = data.random_crop(image, boxes, labels, 64, g, positive_fraction=1.0)
        assert window.shape == (1, 64, 64)
        top, left = divmod(int(window[0, 0, 0].item()), 120)  # the pixel value says where the window sits
        assert torch.equal(window, image[:, top:top + 64, left:left + 64])
        seen_left.add(left)
        # every kept box is the original shifted into the window, and a lesion window holds a whole lesion
        assert len(out) >= 1
        for b, lab in zip(out.tolist(), kept.tolist(), strict=True):
            original = boxes[labels.tolist().index(lab)].tolist()
            assert b == pytest.approx([original[0] - left, original[1] - top, original[2] - left, original[3] - top])
    assert len(seen_left) > 5  # the lesion is not always at the same place in the window


def test_negative_window_drops_mostly_cut_boxes_and_small_images_stay_whole():
    image = torch.rand(1, 100, 100)
    boxes = torch.tensor([[40.0, 40.0, 60.0, 60.0]])
    labels = torch.tensor([1])
    g = torch.Generator().manual_seed(1)
    outcomes = set()
    for _ in range(60):
        window, out, _ = data.random_crop(image, boxes, labels, 50, g, positive_fraction=0.0)
        top, left = 0, 0
        for cand_top in range(51):
            for cand_left in range(51):
                if torch.equal(window, image[:, cand_top:cand_top + 50, cand_left:cand_left + 50]):
                    top, left = cand_top, cand_left
        visible = max(0, min(60, left + 50) - max(40, left)) * max(0, min(60, top + 50) - max(40, top)) / 400
        assert (len(out) == 1) == (visible >= 0.5), (left, top, visible)
        outcomes.add(len(out))
    assert outcomes == {0, 1}
    small, out, _ = data.random_crop(torch.rand(1, 30, 20), boxes / 4, labels, 64, g)
    assert small.shape == (1, 30, 20) and out.tolist() == (boxes / 4).tolist()


def test_bad_boxes_are_clipped_or_dropped_and_counted():
    dropped: Counter = Counter()
    keep, boxes = data.clean_boxes([[5, 5, 5, 9], [-10, 2, 8, 6], [50, 50, 60, 60], [1, 1, 4, 4]], 20, 30, dropped)
    assert keep == [1, 3]
    assert boxes.tolist() == [[0.0, 2.0, 8.0, 6.0], [1.0, 1.0, 4.0, 4.0]]
    assert dropped == Counter({"zero_size": 1, "outside_image": 1})


def test_detection_classes_count_bwc_as_benign():
    assert data.detection_class("mass", "BENIGN_WITHOUT_CALLBACK", "four") == "MASS_BENIGN"
    assert data.detection_class("calc", "MALIGNANT", "four") == "CALC_MALIGNANT"
    assert data.detection_class("calc", "BENIGN", "two") == "CALC"
    assert data.detection_class("architectural", "BENIGN", "four") is None


def _curate_folder(tmp_path):
    (tmp_path / "cache" / "images").mkdir(parents=True)
    breast = np.full((100, 60), 500, dtype=np.uint16)
    breast[5:95, 10:50] = 30000
    Image.fromarray(breast).save(tmp_path / "cache" / "images" / "a.png")
    Image.fromarray(np.zeros((100, 60), dtype=np.uint16)).save(tmp_path / "cache" / "images" / "b.png")
    Image.fromarray(breast).save(tmp_path / "cache" / "images" / "c.png")
    images = pd.DataFrame({"image_id": ["a", "b", "c"], "split": ["train", "train", "test"],
                           "cache_path": ["images/a.png", "images/b.png", "images/c.png"],
                           "scale": [0.5, 0.5, 0.5]})
    # full-image coordinates (cache = full * 0.5): a's mass at cache (20, 30)-(30, 40); a zero-size calc
    lesions = pd.DataFrame({"image_id": ["a", "a", "b"], "abnormality_type": ["mass", "calc", "mass"],
                            "pathology": ["MALIGNANT", "BENIGN", "BENIGN"],
                            "x0": [40, 60, 10], "y0": [60, 60, 10], "x1": [60, 60, 20], "y1": [80, 70, 20]})
    images.to_parquet(tmp_path / "images.parquet")
    lesions.to_parquet(tmp_path / "lesions.parquet")
    return tmp_path


def test_dataset_crops_to_the_breast_keeps_negatives_and_counts_drops(tmp_path):
    folder = _curate_folder(tmp_path)
    dataset = data.load_detection_data(folder, "four", max_size=90)
    assert dataset.dropped == Counter({"no_breast_tissue": 1, "zero_size": 1})
    a, c = dataset.images
    assert (a.split, c.split) == ("train", "test")
    assert tuple(a.image.shape[1:]) == (90, 40)  # the 90x40 breast, scale 1
    assert a.crop == (10, 5) and a.scale == pytest.approx(1.0)
    assert a.boxes.tolist() == [[10.0, 25.0, 20.0, 35.0]]  # shifted by the crop
    assert a.labels.tolist() == [CLASSES.index("MASS_MALIGNANT") + 1]
    assert len(c.boxes) == 0  # a lesion-free image stays in as a negative
    assert a.image.max().item() == pytest.approx(1.0) and a.image.min().item() >= 0.0


def test_dataset_names_the_missing_column(tmp_path):
    folder = _curate_folder(tmp_path)
    pd.read_parquet(folder / "lesions.parquet").drop(columns=["pathology"]).to_parquet(folder / "lesions.parquet")
    with pytest.raises(ValueError, match=r"lesions.parquet: missing columns \['pathology'\]"):
        data.load_detection_data(folder, "four", max_size=90)


# ------------------------------------------------------------------------------------------ models


def test_hash_head_shapes_and_classification_goes_through_the_codes():
    torch.manual_seed(0)
    head = heads.HashBoxPredictor(32, 5, hash_bits=12)
    x = torch.randn(7, 32)
    logits, deltas = head(x)
    assert logits.shape == (7, 5) and deltas.shape == (7, 20)
    codes = head.codes(x)
    assert codes.shape == (7, 12) and codes.min().item() >= 0.0 and codes.max().item() <= 1.0
    torch.testing.assert_close(logits, head.cls_score((codes - 0.5) / head.hash.eps))
    logits.sum().backward()
    assert head.hash.projection.weight.grad.abs().sum() > 0  # the class loss trains the decoder
    assert head.bbox_pred.weight.grad is None  # box regression does not depend on the class path
    with torch.no_grad():
        head.hash.slice_weight.mul_(-1.0)
    new_logits, new_deltas = head(x)
    assert not torch.allclose(new_logits, logits)
    torch.testing.assert_close(new_deltas, deltas)


def _tiny_config(model: str = "ours", classes=CLASSES) -> builders.DetectorConfig:
    return builders.DetectorConfig(model=model, classes=list(classes), input_size=64, anchor_sizes=[8, 16, 32, 64],
                                   hash_bits=8, representation=32, fpn_channels=16, proposals_train=50,
                                   proposals_test=20, roi_samples=16)


def test_ours_uses_the_hash_head_at_inference_and_the_ablation_does_not():
    model, tag = builders.build_detector(_tiny_config("ours"))
    assert tag == "none (random init)"
    assert isinstance(model.roi_heads.box_predictor, heads.HashBoxPredictor)
    calls = []
    model.roi_heads.box_predictor.hash.register_forward_hook(lambda *a: calls.append(a[2].shape))
    model.eval()
    with torch.inference_mode():
        model([torch.rand(3, 64, 40)])
    assert calls and calls[0][1] == 8
    plain, _ = builders.build_detector(_tiny_config("ours_nohash"))
    assert isinstance(plain.roi_heads.box_predictor, heads.PlainBoxPredictor)
    assert builders.parameter_millions(model) > builders.parameter_millions(plain)


def test_detectors_take_inputs_at_their_own_size():
    # torchvision's transform would scale a 32-px training window up to input_size (64): ours must not
    for name in ("ours", "frcnn_r50"):
        model, _ = builders.build_detector(_tiny_config(name))
        images, _ = model.transform([torch.rand(3, 32, 24), torch.rand(3, 64, 40)])
        assert images.image_sizes == [(32, 24), (64, 40)], name


def test_freezing_the_fused_extractor_leaves_fpn_rpn_and_heads_trainable():
    model, _ = builders.build_detector(_tiny_config("ours"))
    frozen = builders.freeze_feature_extractor(model)
    assert frozen > 0 and not any(p.requires_grad for p in model.backbone.body.parameters())
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"backbone.fpn", "rpn.head", "roi_heads.box_head", "roi_heads.box_predictor"}
    before = {k: v.clone() for k, v in model.backbone.body.state_dict().items()}
    engine.train_detector(model, _items(), epochs=1, lr=0.01, batch_size=2, crop_size=32)
    assert all(torch.equal(before[k], v) for k, v in model.backbone.body.state_dict().items())
    r50, _ = builders.build_detector(_tiny_config("frcnn_r50"))
    with pytest.raises(TypeError, match="fused detectors"):
        builders.freeze_feature_extractor(r50)


def test_frcnn_r50_freezes_its_first_stages_only_when_weights_were_loaded(tmp_path, monkeypatch):
    """Asked for ImageNet weights that are not in the cache, the ResNet-50 starts random and trains every
    stage (freezing random features would handicap the baseline); loaded from a file, conv1 and layer1 stay
    frozen as in torchvision. The tag states the initialisation and the trainable count either way."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))

    def stages(model) -> dict[str, bool]:
        body = model.backbone.body
        return {name: any(p.requires_grad for p in getattr(body, name).parameters())
                for name in ("conv1", "layer1", "layer2", "layer4")}

    random_start, tag = builders.build_frcnn_r50(_tiny_config("frcnn_r50"), "imagenet")
    assert stages(random_start) == {"conv1": True, "layer1": True, "layer2": True, "layer4": True}
    n_all = sum(p.numel() for p in random_start.parameters() if p.requires_grad)
    assert tag.startswith("none (random init; imagenet weights not in the local cache: resnet50-0676ba61.pth)")
    assert tag.endswith(f"5 ResNet layers trainable ({n_all / 1e6:.1f}M trainable parameters)")
    weights = tmp_path / "resnet50_body.pt"
    torch.save({k: v + 0.5 for k, v in random_start.backbone.body.state_dict().items()}, weights)
    loaded, tag = builders.build_frcnn_r50(_tiny_config("frcnn_r50"), str(weights))
    assert stages(loaded) == {"conv1": False, "layer1": False, "layer2": True, "layer4": True}
    assert torch.equal(loaded.backbone.body.conv1.weight, random_start.backbone.body.conv1.weight + 0.5)
    n_loaded = sum(p.numel() for p in loaded.parameters() if p.requires_grad)
    assert n_loaded < n_all and tag == f"file resnet50_body.pt, 3 ResNet layers trainable ({n_loaded / 1e6:.1f}M " \
        "trainable parameters)"


def _items(n: int = 3) -> list[data.DetectionImage]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        image = torch.rand(1, 64, 48, generator=g) * 0.2
        image[0, 20:34, 10:26] += 0.7
        out.append(data.DetectionImage(i, "train", image, torch.tensor([[10.0, 20.0, 26.0, 34.0]]),
                                       torch.tensor([1 + i % 4]), (0, 0), 1.0, 1.0))
    return out


def test_resume_from_checkpoint_is_bit_identical_on_cpu(tmp_path):
    items = _items()
    kwargs = dict(epochs=2, lr=0.005, batch_size=2, seed=3)
    straight, _ = builders.build_detector(_tiny_config("ours_nohash"))
    full = engine.train_detector(straight, items, checkpoint_path=tmp_path / "a.pt", **kwargs)
    first, _ = builders.build_detector(_tiny_config("ours_nohash"))
    engine.train_detector(first, items, checkpoint_path=tmp_path / "b.pt", stop_after=1, **kwargs)
    torch.manual_seed(12345)  # a fresh process would start from other RNG states: resume must restore them
    again, _ = builders.build_detector(_tiny_config("ours_nohash"))
    resumed = engine.train_detector(again, items, checkpoint_path=tmp_path / "b.pt", **kwargs)
    assert resumed.resumed_from_epoch == 1 and len(resumed.history) == 2
    assert [h.train_loss for h in resumed.history] == [h.train_loss for h in full.history]
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    items = _items(2)
    model, _ = builders.build_detector(_tiny_config("ours_nohash"))
    engine.train_detector(model, items, epochs=1, lr=0.005, checkpoint_path=tmp_path / "c.pt")
    other, _ = builders.build_detector(_tiny_config("ours_nohash", classes=["MASS", "CALC"]))
    with pytest.raises(ValueError, match=r"c\.pt: checkpoint of another architecture"):
        engine.train_detector(other, items, epochs=2, lr=0.005, checkpoint_path=tmp_path / "c.pt")


def test_detector_weights_for_other_classes_are_refused_with_the_file_named(tmp_path):
    model, _ = builders.build_detector(_tiny_config("ours"))
    torch.save(model.state_dict(), tmp_path / "detector.pt")
    two = _tiny_config("ours", classes=["MASS", "CALC"])
    with pytest.raises(ValueError, match=r"detector\.pt: detector weights for 4 classes, but the config lists 2"):
        builders.load_detector(tmp_path / "detector.pt", two)
    with pytest.raises(ValueError, match=r"detector\.pt: detector weights for classes .* expected \['MASS'"):
        builders.load_detector(tmp_path / "detector.pt", _tiny_config("ours"), expected_classes=["MASS", "CALC"])
    loaded = builders.load_detector(tmp_path / "detector.pt", _tiny_config("ours"))
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_detector_config_round_trips_and_rejects_unknown_keys():
    config = _tiny_config()
    assert builders.DetectorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        builders.DetectorConfig.from_dict({**config.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="unknown detector 'yolo'"):
        builders.DetectorConfig(model="yolo", classes=["A"], input_size=64)


# ------------------------------------------------------------------------------------------ metrics


def _case():
    a, b = [10.0, 10.0, 30.0, 30.0], [50.0, 50.0, 70.0, 80.0]
    targets = [{"boxes": torch.tensor([a]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([b]), "labels": torch.tensor([2])}]
    predictions = [
        {"boxes": torch.tensor([a, [80.0, 80.0, 90.0, 90.0], [11.0, 10.0, 30.0, 30.0]]),
         "scores": torch.tensor([0.9, 0.8, 0.6]), "labels": torch.tensor([1, 1, 1])},
        {"boxes": torch.tensor([b, [0.0, 0.0, 5.0, 5.0]]), "scores": torch.tensor([0.7, 0.95]),
         "labels": torch.tensor([1, 2])},
    ]
    return predictions, targets


def test_coco_metrics_on_a_hand_made_case():
    predictions, targets = _case()
    m = evaluate.coco_metrics(predictions, targets, CLASSES)
    # class 1: TP .9, FP .8, FP .7 (b is class 2), duplicate .6 -> AP 1; class 2: only an FP -> AP 0
    assert m["per_class_ap50"]["MASS_BENIGN"] == pytest.approx(1.0)
    assert m["per_class_ap50"]["MASS_MALIGNANT"] == pytest.approx(0.0)
    assert math.isnan(m["per_class_ap50"]["CALC_BENIGN"]) and math.isnan(m["per_class_ap50"]["CALC_MALIGNANT"])
    assert m["map50"] == pytest.approx(0.5)
    assert m["ar100"] == pytest.approx(0.5)
    assert 0.0 < m["map"] <= m["map50"]


def test_froc_on_a_hand_made_case():
    predictions, targets = _case()
    # class-agnostic, by score: .95 FP, .9 finds a, .8 FP, .7 finds b, .6 duplicate of a (not counted)
    assert evaluate.froc(predictions, targets) == {"0.5": 0.5, "1": 1.0, "2": 1.0}
    assert evaluate.froc(predictions, targets, rates=(0.25,)) == {"0.25": 0.0}


def test_class_agnostic_ap_counts_a_found_lesion_of_the_wrong_class():
    predictions, targets = _case()
    lesion = evaluate.coco_metrics(evaluate.class_agnostic(predictions), evaluate.class_agnostic(targets), ["lesion"])
    by_class = evaluate.coco_metrics(predictions, targets, CLASSES)
    # b is found only by a class-1 box (.7): wrong class, right place
    assert lesion["map50"] > by_class["per_class_ap50"]["MASS_MALIGNANT"]
    assert lesion["ar100"] == pytest.approx(1.0) and by_class["ar100"] == pytest.approx(0.5)
    assert predictions[1]["labels"].tolist() == [1, 2]  # inputs untouched


def test_metrics_without_detections_or_truth():
    _, targets = _case()
    empty = [{"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    m = evaluate.coco_metrics(empty, targets, CLASSES)
    assert m["map50"] == 0.0 and math.isnan(m["per_class_ap50"]["CALC_BENIGN"])
    assert evaluate.froc(empty, targets) == {"0.5": 0.0, "1": 0.0, "2": 0.0}
    no_truth = [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    assert math.isnan(evaluate.coco_metrics(empty, no_truth, CLASSES)["map50"])


def test_latency_is_measured_for_every_model_side_by_side():
    slow = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 5, padding=2), torch.nn.Conv2d(64, 64, 5, padding=2))

    class Wrap(torch.nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, images):
            return [self.body(images[0][None])]

    times = latency.measure_latency({"fast": Wrap(torch.nn.Identity()), "slow": Wrap(slow)},
                                    torch.rand(3, 64, 64), repeats=3, warmup=1)
    assert set(times) == {"fast", "slow"} and times["slow"] > times["fast"] > 0


def test_the_one_thread_latency_runs_on_one_thread_and_gives_the_count_back():
    seen: list[int] = []

    class Recorder(torch.nn.Module):
        def forward(self, images):
            seen.append(torch.get_num_threads())
            return [images[0]]

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # start from two, whatever the machine has
    try:
        times = latency.measure_latency_on_threads({"a": Recorder()}, torch.rand(3, 8, 8), 1, repeats=2, warmup=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1, 1] and times["a"] > 0


# ------------------------------------------------------------------------------ cached extractor maps


def _frozen_ours(name: str = "ours"):
    model, _ = builders.build_detector(_tiny_config(name), freeze_extractor=True)
    return model


def test_windows_on_the_grid_still_hold_their_lesion():
    image = torch.rand(1, 256, 160)
    boxes = torch.tensor([[70.0, 150.0, 90.0, 170.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        window, out, _, (top, left) = data.random_window(image, boxes, torch.tensor([1]), 96, g, 1.0, grid=32)
        assert top % 32 == 0 and left % 32 == 0 and window.shape == (1, 96, 96)
        assert torch.equal(window, image[:, top:top + 96, left:left + 96]) and len(out) == 1


def test_cached_maps_are_the_extractors_output_and_windows_are_their_cells():
    model = _frozen_ours()
    items = _items(2)
    cache = feature_cache.FeatureCache(model)
    cache.add(model, items)
    with torch.no_grad():
        images, _ = model.transform([engine.as_input(items[0].image, "cpu")])
        reference = list(model.backbone.body(images.tensors).values())
    for cached, ref in zip(cache.full(0), reference, strict=True):
        assert cached.dtype == torch.float16
        torch.testing.assert_close(cached.float(), ref[0], rtol=2e-3, atol=2e-3)
    # a 32 x 48 window at (32, 0) of the 64 x 48 image (padded to 64 wide) is rows 32.. of every map
    for cut, full, stride in zip(cache.window(0, 32, 0, 32, 48), cache.full(0), model.backbone.body.strides,
                                 strict=True):
        assert torch.equal(cut, full[:, 32 // stride:64 // stride, :64 // stride])
    with pytest.raises(ValueError, match="off the 32-pixel grid"):
        cache.window(0, 8, 0, 32, 32)
    other = _frozen_ours()
    with torch.no_grad():
        other.backbone.body.fused.trunk[0].conv0.weight.mul_(1.5)
    with pytest.raises(ValueError, match="another extractor"):
        cache.check(other)


def test_forward_with_given_maps_is_the_models_own_forward():
    """Losses (training) and detections (eval) with the extractor's maps given equal the model's own."""
    model = _frozen_ours().train()  # train(): every BatchNorm of the extractor in eval mode, as in training
    items = _items(2)
    images = [engine.as_input(i.image, "cpu") for i in items]
    targets = [i.target() for i in items]
    with torch.no_grad():
        batch, _ = model.transform(images)
        maps = [[m[k] for m in model.backbone.body(batch.tensors).values()] for k in range(len(images))]
    torch.manual_seed(5)
    own = model(images, targets)
    torch.manual_seed(5)
    given = feature_cache.forward_with_maps(model, images, targets, maps)
    assert set(own) == set(given) and all(torch.allclose(own[k], given[k]) for k in own)
    model.eval()
    with torch.no_grad():
        single, _ = model.transform(images[:1])
        one = [list(model.backbone.body(single.tensors).values())]
        a = model(images[:1])[0]
        b = feature_cache.forward_with_maps(model, images[:1], None, [[m[0] for m in one[0]]])[0]
    assert len(a["scores"]) > 0 and all(torch.equal(a[k], b[k]) for k in a)


def test_cached_training_sees_the_same_windows_and_matches_within_half_precision(monkeypatch):
    """The cached path draws the same windows as the pixel path; where the window is the whole image (so
    both paths see the same pixels' features) the two trainings agree within the cache's half precision."""
    drawn: list[list] = []
    real = data.random_window

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        drawn[-1].append((out[3], out[1].tolist(), out[2].tolist()))
        return out

    monkeypatch.setattr(engine, "random_window", spy)
    items = _items(3)
    results = []
    for cached in (False, True):
        drawn.append([])
        model = _frozen_ours("ours_nohash")
        cache = None
        if cached:
            cache = feature_cache.FeatureCache(model)
            cache.add(model, items)
        results.append(engine.train_detector(model, items, epochs=1, lr=0.005, batch_size=2, seed=1, crop_size=64,
                                             window_grid=32, augment_train=False, features=cache))
    assert drawn[0] == drawn[1] and len(drawn[0]) == 3
    losses = [[h.train_loss for h in r.history] for r in results]
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)
    for (k, a), b in zip(results[0].model.state_dict().items(), results[1].model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3, msg=k)


def test_the_cache_refuses_pixel_augmentation_and_a_training_extractor():
    model = _frozen_ours()
    cache = feature_cache.FeatureCache(model)
    cache.add(model, _items(2))
    with pytest.raises(ValueError, match="cannot be flipped or rotated"):
        engine.train_detector(model, _items(2), epochs=1, lr=0.01, features=cache, augment_train=True)
    trainable, _ = builders.build_detector(_tiny_config("ours"))
    with pytest.raises(ValueError, match="cannot be cached"):
        feature_cache.FeatureCache(trainable)


def test_predictions_from_cached_maps_match_the_uncached_ones():
    model = _frozen_ours()
    items = _items(2)
    cache = feature_cache.FeatureCache(model)
    plain = engine.predict(model, items)
    cached = engine.predict(model, items, features=cache)
    assert 0 in cache and 1 in cache
    for a, b in zip(plain, cached, strict=True):
        top = a["scores"] > 0.05
        assert len(a["scores"]) and torch.allclose(a["scores"][top][:5], b["scores"][top][:5], rtol=1e-2, atol=1e-3)


def test_parameter_counts_are_what_the_optimiser_trains():
    model = _frozen_ours()
    counts = builders.parameter_counts(model)
    expected = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone.body."))
    assert counts["trainable"] == expected
    assert counts["frozen"] == sum(p.numel() for p in model.backbone.body.parameters())
    r50, _ = builders.build_frcnn_r50(_tiny_config("frcnn_r50"), "none")
    assert builders.parameter_counts(r50) == {"trainable": sum(p.numel() for p in r50.parameters() if p.requires_grad),
                                              "frozen": sum(p.numel() for p in r50.parameters()
                                                            if not p.requires_grad)}


# ------------------------------------------------------------------------------ bootstrap intervals


def _random_case(n_images: int, seed: int = 0, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    predictions, targets = [], []
    for _ in range(n_images):
        k = int(torch.randint(0, 4, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * 200
        truth = torch.cat([xy, xy + 10 + torch.rand(k, 2, generator=g) * 40], 1)
        labels = torch.randint(1, classes + 1, (k,), generator=g)
        m = int(torch.randint(0, 25, (1,), generator=g))
        source = torch.randint(0, max(k, 1), (m,), generator=g)
        boxes = (truth[source] if k else torch.rand(m, 4, generator=g) * 200) + torch.randn(m, 4, generator=g) * 6
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 2)
        scores = torch.round(torch.rand(m, generator=g) * 20) / 20  # tied scores on purpose
        pred_labels = labels[source] if k else torch.ones(m, dtype=torch.int64)
        pred_labels = torch.where(torch.rand(m, generator=g) < 0.7, pred_labels,
                                  torch.randint(1, classes + 1, (m,), generator=g))
        predictions.append({"boxes": boxes, "scores": scores, "labels": pred_labels})
        targets.append({"boxes": truth, "labels": labels})
    return predictions, targets


def test_bootstrap_point_values_are_cocoeval_and_froc():
    for seed in range(3):
        predictions, targets = _random_case(25, seed)
        ci = bootstrap.detection_intervals(predictions, targets, 4, n_boot=50)
        coco = evaluate.coco_metrics(predictions, targets, CLASSES)
        assert ci["map50"].value == pytest.approx(coco["map50"], abs=1e-12)
        assert ci["lesion_ap50"].value == pytest.approx(evaluate.lesion_ap50(predictions, targets), abs=1e-12)
        for rate, value in evaluate.froc(predictions, targets).items():
            assert ci[f"froc_{rate}"].value == value


def test_bootstrap_interval_holds_the_point_and_narrows_with_more_images():
    predictions, targets = _random_case(20, seed=1)
    small = bootstrap.detection_intervals(predictions, targets, 4, n_boot=400)
    large = bootstrap.detection_intervals(predictions * 6, targets * 6, 4, n_boot=400)
    for key, interval in small.items():
        assert interval.low <= interval.value <= interval.high, key
        assert interval.high - interval.low > 0, key
        assert (large[key].high - large[key].low) < 0.7 * (interval.high - interval.low), key
    # a patient's images move together: grouping pairs of images widens nothing into nonsense, and is used
    grouped = bootstrap.detection_intervals(predictions, targets, 4, groups=[k // 2 for k in range(20)], n_boot=400)
    assert grouped["map50"].value == small["map50"].value and grouped["map50"].low != small["map50"].low


def test_intervals_computed_from_the_saved_tables_equal_those_from_memory(tmp_path):
    predictions, targets = _random_case(12, seed=2)
    items = [data.DetectionImage(k, "test", torch.zeros(1, 8, 8), t["boxes"], t["labels"], (0, 0), 1.0, 1.0, k // 2)
             for k, t in enumerate(targets)]
    by_model = {"ours": predictions, "empty": [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                                "labels": torch.zeros(0, dtype=torch.int64)}] * 12}
    truth, images = records.truth_frames(items)
    records.write_parquet_atomic(records.detections_frame(by_model), tmp_path / "d.parquet")
    records.write_parquet_atomic(truth, tmp_path / "t.parquet")
    records.write_parquet_atomic(images, tmp_path / "i.parquet")
    saved, saved_targets, groups = records.read_back(pd.read_parquet(tmp_path / "d.parquet"),
                                                     pd.read_parquet(tmp_path / "t.parquet"),
                                                     pd.read_parquet(tmp_path / "i.parquet"), ["ours", "empty"])
    assert groups.tolist() == [k // 2 for k in range(12)]
    assert all(len(p["scores"]) == 0 for p in saved["empty"])
    a = bootstrap.detection_intervals(predictions, targets, 4, groups=groups, n_boot=100)
    b = bootstrap.detection_intervals(saved["ours"], saved_targets, 4, groups=groups, n_boot=100)
    assert a == b


def test_freeze1_and_freeze2_share_their_common_frozen_segments_exactly():
    from mammo_core.detection.backbone import FusedFeatureMaps
    from mammo_core.models.fused import FusedDenseNet

    body = FusedFeatureMaps(FusedDenseNet(2, seed=0), [0.4, 0.4, 0.3]).eval()
    assert body.shared_segments() == [(-1, 0), (0, 2), (-1, 0)]  # transition2 + denseblock3 layers 1-19

    def unshared(x):
        t = body.fused.trunk_output(x)
        ms = [b[:-1](t) for b in body.fused.branches.values()]
        fs = [b[-1](m) for b, m in zip(body.fused.branches.values(), ms, strict=True)]
        w = body.fusion_weights
        return [t, sum(w[k] * ms[k] for k in range(3)), sum(w[k] * fs[k] for k in range(3))]

    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        for a, b in zip(body(x).values(), unshared(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        next(body.fused.branches["freeze2"][1].children()).conv1.weight.mul_(1.01)  # other frozen weights
        assert body.shared_segments()[1] == (0, 1)  # the plan follows the weights, never serves stale maps
        for a, b in zip(body(x).values(), unshared(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        # a replaced module (no tensor of the old one changed) is seen too: Freeze1's own conv shares again
        twin = next(body.fused.branches["freeze1"][1].children()).conv1
        next(body.fused.branches["freeze2"][1].children()).conv1 = copy.deepcopy(twin)
        assert body.shared_segments()[1] == (0, 2)

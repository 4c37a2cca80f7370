"""ROI masks: identification by content, fitting to the full image, boxes per connected region."""

from __future__ import annotations

import numpy as np
import pytest

from mammo_core.data.masks import choose_mask, fit_mask_to_image, is_binary_mask, mask_to_boxes
from mammo_core.errors import BadItem

FULL = (60, 40)  # rows x columns of the "full mammogram"


def _two_regions(shape=FULL, value=255, dtype=np.uint8) -> np.ndarray:
    mask = np.zeros(shape, dtype)
    mask[5:15, 3:10] = value  # region A: x 3..10, y 5..15
    mask[30:41, 20:36] = value  # region B: x 20..36, y 30..41
    mask[30, 20] = 0  # not a rectangle: B's box is still its extent
    return mask


def _half_mask() -> np.ndarray:
    """A 30x20 mask: half the size of FULL, same aspect."""
    half = np.zeros((30, 20), np.uint8)
    half[2:7, 1:5] = 255
    half[15:20, 10:18] = 255
    return half


def _crop(shape=(12, 9)) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 65535, size=shape, dtype=np.uint16)


def test_is_binary_mask():
    assert is_binary_mask(_two_regions())
    assert is_binary_mask(_two_regions(value=1, dtype=np.uint16))
    assert is_binary_mask(_two_regions(value=65535, dtype=np.uint16))
    assert is_binary_mask(_two_regions() > 0)
    assert is_binary_mask(np.full((3, 3), 255, np.uint8))  # one value: the whole image is the ROI
    assert not is_binary_mask(np.zeros((3, 3), np.uint8))  # empty
    assert not is_binary_mask(np.zeros((3, 3), bool))
    three = _two_regions()
    three[0, 0] = 128
    assert not is_binary_mask(three)
    assert not is_binary_mask(np.array([[3, 7], [3, 7]], np.uint8))  # two values but no zero
    assert not is_binary_mask(_crop())


def test_two_regions_two_boxes_exact():
    assert mask_to_boxes(_two_regions()) == [(3, 5, 10, 15), (20, 30, 36, 41)]


def test_boxes_eight_connected_sorted_and_specks_dropped():
    mask = np.zeros((20, 20), bool)
    mask[10:12, 10:12] = True  # 4 px, kept at min_area 4
    mask[12, 12] = True  # diagonal neighbour: same 8-connected region
    mask[2:4, 15:18] = True  # upper region, listed first
    mask[18, 1] = True  # 1 px speck
    assert mask_to_boxes(mask) == [(15, 2, 18, 4), (10, 10, 13, 13)]
    assert mask_to_boxes(mask, min_area_px=1)[-1] == (1, 18, 2, 19)
    assert mask_to_boxes(mask, min_area_px=6) == [(15, 2, 18, 4)]
    assert mask_to_boxes(np.zeros((5, 5), np.uint8)) == []


def test_half_size_mask_maps_boxes_scaled_by_two():
    half = _half_mask()
    full = fit_mask_to_image(half, FULL)
    assert full.shape == FULL and full.dtype == bool
    assert full.sum() == 4 * np.count_nonzero(half)
    assert mask_to_boxes(full) == [(2, 4, 10, 14), (20, 30, 36, 40)]
    assert [tuple(v // 2 for v in b) for b in mask_to_boxes(full)] == mask_to_boxes(half)


def test_same_size_fit_is_identity_and_wrong_aspect_rejected():
    mask = _two_regions()
    assert np.array_equal(fit_mask_to_image(mask, FULL), mask > 0)
    with pytest.raises(BadItem) as info:
        fit_mask_to_image(np.ones((30, 30), np.uint8), FULL)
    assert info.value.reason == "mask size 30x30 does not match image 60x40 and aspect differs"
    # within 1 %: 60x40 vs 61x40 (1.7 %) is rejected, 3000x2000 vs 3010x2000 (0.3 %) accepted
    with pytest.raises(BadItem):
        fit_mask_to_image(np.ones((61, 40), np.uint8), FULL)
    assert fit_mask_to_image(np.ones((3010, 2000), np.uint8), (3000, 2000)).all()


@pytest.mark.parametrize("mask_first", [True, False])
def test_choose_mask_by_content_in_either_order(mask_first):
    mask = _two_regions()
    candidates = [("000000.dcm", mask), ("000001.dcm", _crop())]
    if not mask_first:
        candidates.reverse()
    name, chosen = choose_mask(candidates, FULL)
    assert name == "000000.dcm" and chosen is mask


def test_choose_mask_same_aspect_when_no_full_size():
    half = _half_mask()
    name, chosen = choose_mask([("crop", _crop((30, 20))), ("small", half)], FULL)
    assert name == "small" and chosen.shape == (30, 20)
    # a full-size binary mask beats a same-aspect one
    name, _ = choose_mask([("small", half), ("full", _two_regions())], FULL)
    assert name == "full"


def test_choose_mask_failures():
    with pytest.raises(BadItem) as info:
        choose_mask([("a.dcm", _crop()), ("b.dcm", _crop((60, 40)))], FULL)
    assert info.value.reason == "no binary mask among a.dcm, b.dcm"
    with pytest.raises(BadItem) as info:
        choose_mask([("a.dcm", _crop()), ("b.dcm", np.zeros(FULL, np.uint8))], FULL)
    assert info.value.reason == "mask is empty"
    with pytest.raises(BadItem) as info:
        choose_mask([("a.dcm", _crop()), ("b.dcm", np.pad(_half_mask(), ((5, 5), (10, 10))))], FULL)
    assert info.value.reason == "mask size 40x40 does not match image 60x40 and aspect differs"
    other = _two_regions()
    other[0, 0] = 255
    with pytest.raises(BadItem, match="several different binary masks"):
        choose_mask([("a", _two_regions()), ("b", other)], FULL)
    with pytest.raises(BadItem, match="no binary mask"):
        choose_mask([], FULL)
    # duplicates of one mask are not ambiguous
    assert choose_mask([("a", _two_regions()), ("b", _two_regions())], FULL)[0] == "a"


def test_large_mask_is_fast():
    import time

    mask = np.zeros((5000, 3000), np.uint8)
    mask[2000:2300, 1000:1400] = 255
    mask[4000:4010, 10:20] = 255
    start = time.perf_counter()
    assert is_binary_mask(mask)
    boxes = mask_to_boxes(fit_mask_to_image(mask[::2, ::2], mask.shape))
    elapsed = time.perf_counter() - start
    assert boxes == [(1000, 2000, 1400, 2300), (10, 4000, 20, 4010)]
    assert elapsed < 2.0

"""Figures are written atomically as real PNGs, sized by their content; a failed save leaves nothing behind."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from mammo_core.evaluation import figures


def test_confusion_matrix_is_a_png_that_grows_with_the_classes(tmp_path) -> None:
    small = figures.confusion_matrix_figure(np.array([[5, 1], [0, 4]]), ["BENIGN", "MALIGNANT"], "two",
                                            tmp_path / "two.png")
    names = [f"CLASS_{i}" for i in range(7)]
    large = figures.confusion_matrix_figure(np.eye(7, dtype=int) * 3, names, "seven", tmp_path / "seven.png")
    with Image.open(small) as a, Image.open(large) as b:
        assert a.format == b.format == "PNG"
        assert b.size[0] > a.size[0] and b.size[1] > a.size[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seven.png", "two.png"]  # no temporaries


def test_curves_and_series_write_their_file(tmp_path) -> None:
    curves = figures.curves_figure({"freeze1": [0.2, 0.4, 0.5], "freeze2": [0.3, 0.3]}, "val", tmp_path / "c.png")
    series = figures.series_figure({"hash": [0.5, 0.6]}, [12, 24], "MAP", tmp_path / "s.png", "bits", "MAP")
    for path in (curves, series):
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100


def test_a_failed_save_leaves_no_file_and_no_temporary(tmp_path) -> None:
    fig, _ = plt.subplots()
    with pytest.raises(ValueError, match="not supported"):
        figures.save_figure(fig, tmp_path / "figure.unknownformat")
    assert list(tmp_path.iterdir()) == []
    assert not plt.fignum_exists(fig.number)  # closed even when the save failed

"""weight_sources finds torchvision's files without torch: the same folder and names the libraries use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from mammo_core.sources import weight_sources


@pytest.mark.parametrize("env", [
    {},
    {"XDG_CACHE_HOME": "{tmp}/xdg"},
    {"TORCH_HOME": "{tmp}/th", "XDG_CACHE_HOME": "{tmp}/ignored"},
    {"TORCH_HOME": "~/relative-to-home"},
])
def test_the_hub_folder_is_torch_hubs(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    assert weight_sources.hub_checkpoints_dir() == Path(torch.hub.get_dir()) / "checkpoints"


def test_the_file_names_are_the_last_part_of_torchvisions_urls() -> None:
    m = torchvision.models
    urls = {"densenet121": m.DenseNet121_Weights.IMAGENET1K_V1.url, "resnet50": m.ResNet50_Weights.IMAGENET1K_V1.url,
            "vgg16": m.VGG16_Weights.IMAGENET1K_V1.url, "inception_v3": m.Inception_V3_Weights.IMAGENET1K_V1.url,
            "frcnn_r50": m.detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.url}
    assert {name: url.rsplit("/", 1)[1] for name, url in urls.items()} == weight_sources.HUB_FILE_NAMES


def test_each_params_value_resolves_to_the_file_its_loader_reads(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    hub = tmp_path / "hub" / "checkpoints"
    assert weight_sources.backbone_file("imagenet") == hub / "densenet121-a639ec97.pth"
    assert weight_sources.backbone_file("none") is None
    assert weight_sources.backbone_file("/w/mine.pth") == Path("/w/mine.pth")
    assert weight_sources.r50_detector_file("coco") == hub / "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"
    assert weight_sources.r50_detector_file("imagenet") == hub / "resnet50-0676ba61.pth"
    assert weight_sources.r50_detector_file("none") is None
    with pytest.raises(ValueError, match="'alexnet'.*known: densenet121"):
        weight_sources.hub_file("alexnet")

"""The one device chooser: explicit devices pass through, a scheduler's GPU slot is honoured, bad pins refused."""

from __future__ import annotations

import pytest
import torch

from mammo_core.training import devices


def test_explicit_devices_pass_through_whatever_the_worker() -> None:
    assert devices.choose_device("cpu", worker_name=3, env={}) == torch.device("cpu")
    assert devices.choose_device("cuda:1", worker_name=0, env={}) == torch.device("cuda", 1)


def test_auto_takes_the_assigned_gpu_slot_or_the_cpu() -> None:
    visible = torch.cuda.device_count()
    expected = torch.device("cuda", 2 % visible) if visible else torch.device("cpu")
    assert devices.choose_device("auto", worker_name=2, env={}) == expected
    assert devices.choose_device("auto", worker_name="not-a-slot", env={"MAMMO_GPU": "2"}) == expected


def test_a_pin_that_is_not_an_index_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="MAMMO_GPU must be a GPU index"):
        devices.choose_device("auto", env={"MAMMO_GPU": "first"})

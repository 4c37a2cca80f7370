"""Dense blocks computed in bands of rows on one-thread workers (mammo_core.detection.row_bands, used by the
inference copies' BufferedDenseLayers): the same maps as the whole-map forward, on the workers, and only
where the layers allow it."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from mammo_core.detection import inference
from mammo_core.detection.row_bands import MIN_BAND_ROWS, row_bands
from mammo_core.models.fused import FusedDenseNet
from mammo_core.runtime import openmp_wait


@pytest.fixture
def sleeping_two_threads(monkeypatch):
    monkeypatch.setattr(openmp_wait, "threads_sleep", lambda values=None: True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def trained_block() -> nn.Module:
    """Dense block 2 of the trunk with non-trivial BatchNorms, rewritten as the inference copy rewrites it."""
    block = FusedDenseNet(2, seed=0).trunk.denseblock2
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.running_mean.numel()
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
    return block.eval()


def test_bands_cover_the_rows_once_in_near_equal_parts():
    assert row_bands(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert row_bands(48, 2) == [(0, 24), (24, 48)]
    assert row_bands(3, 8) == [(0, 1), (1, 2), (2, 3)]
    assert row_bands(7, 1) == [(0, 7)]


@pytest.mark.timeout(120)
def test_a_banded_block_gives_the_whole_maps_forward_on_two_workers(sleeping_two_threads):
    block = trained_block()
    holder = nn.Sequential(copy.deepcopy(block))
    counts = inference.rewrite_for_inference(holder)
    assert counts["dense_blocks_buffered"] == 1 and counts["batchnorm_relus_folded"] == 12  # floors, not BN + ReLU
    buffered = holder[0]
    assert buffered.halo == 1
    threads: set[str] = set()
    for layer in buffered.layers:
        layer.conv2.register_forward_pre_hook(lambda *_: threads.add(threading.current_thread().name))
    x = torch.randn(1, 128, 2 * MIN_BAND_ROWS + 3, 20, generator=torch.Generator().manual_seed(5))  # 2 bands
    with torch.inference_mode():
        expected = block(x)
        got = buffered(x)
    assert len(threads) == 2 and all(name.startswith("mammo-worker") for name in threads), threads
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert torch.equal(got[:, :128], x)  # the block's input passes through untouched


def test_too_few_rows_one_thread_or_autograd_run_on_the_callers_thread(sleeping_two_threads):
    buffered = inference.BufferedDenseLayers(trained_block())
    threads: set[str] = set()
    buffered.layers[0].conv2.register_forward_pre_hook(lambda *_: threads.add(threading.current_thread().name))
    with torch.inference_mode():
        buffered(torch.rand(1, 128, 2 * MIN_BAND_ROWS - 1, 8))  # one band's worth of rows
        torch.set_num_threads(1)
        buffered(torch.rand(1, 128, 4 * MIN_BAND_ROWS, 8))
    torch.set_num_threads(2)
    buffered(torch.rand(1, 128, 4 * MIN_BAND_ROWS, 8))  # autograd on: the layers' weights still train
    assert threads == {threading.current_thread().name}


def test_layers_whose_last_convolution_is_not_size_preserving_are_never_banded():
    block = trained_block()
    strided = copy.deepcopy(block)
    strided.denselayer3.conv2.stride = (2, 2)
    assert inference.BufferedDenseLayers(block).halo == 1
    assert inference.BufferedDenseLayers(strided).halo is None


@pytest.mark.timeout(120)
def test_a_failing_layer_in_one_band_raises_and_leaves_no_worker_waiting(sleeping_two_threads):
    buffered = inference.BufferedDenseLayers(trained_block())
    conv = buffered.layers[4].conv2

    failed: list[str] = []

    def fail_in_one_band(module, args):
        if threading.current_thread().name.startswith("mammo-worker") and not failed:
            failed.append(threading.current_thread().name)
            raise RuntimeError("layer 5 failed in one band")

    handle = conv.register_forward_pre_hook(fail_in_one_band)
    x = torch.rand(1, 128, 2 * MIN_BAND_ROWS, 8)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="layer 5 failed"):
        buffered(x)
    handle.remove()
    with torch.inference_mode():  # the workers are free again
        torch.testing.assert_close(buffered(x), trained_block()(x), rtol=1e-5, atol=1e-4)


class InterleavingPool:
    """The worker pool, except that the first band submitted waits (up to 2 s) until another band is submitted.

    Without callers taking turns, a second caller's bands then queue between the first caller's: both
    workers hold a band at a barrier whose partner waits behind them.
    """

    def __init__(self, pool):
        self.pool, self.count, self.lock, self.another = pool, 0, threading.Lock(), threading.Event()

    def submit(self, fn, *args):
        with self.lock:
            n = self.count
            self.count += 1
        future = self.pool.submit(fn, *args)
        if n == 0:
            self.another.wait(2.0)
        elif n == 1:
            self.another.set()
        return future


@pytest.mark.timeout(120)
def test_two_callers_at_once_take_turns_and_both_finish_with_the_same_maps(sleeping_two_threads, monkeypatch):
    from mammo_core.detection import row_bands

    buffered = inference.BufferedDenseLayers(trained_block())
    x = torch.rand(1, 128, 2 * MIN_BAND_ROWS, 8, generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        expected = buffered(x)
    pool = InterleavingPool(row_bands.single_thread_workers(2))
    monkeypatch.setattr(row_bands, "single_thread_workers", lambda count: pool)
    monkeypatch.setattr(row_bands, "BARRIER_TIMEOUT_S", 5.0)  # a deadlock fails the test instead of hanging it
    got: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def call() -> None:
        torch.set_num_threads(2)
        try:
            with torch.inference_mode():
                got.append(buffered(x))
        except BaseException as exc:
            errors.append(exc)

    callers = [threading.Thread(target=call) for _ in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in callers), errors
    assert len(got) == 2 and all(torch.equal(g, expected) for g in got)

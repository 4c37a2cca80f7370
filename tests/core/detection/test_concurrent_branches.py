"""The fused extractor's branch segments run concurrently on one-thread workers, and compute the same maps
(mammo_core.detection.concurrent_branches); elsewhere the wrapped module runs as it is."""

from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import sys
import threading

import pytest
import torch

from mammo_core.detection import worker_pool
from mammo_core.detection.backbone import FusedFeatureMaps
from mammo_core.detection.concurrent_branches import TRUNK, ConcurrentBranchMaps, branch_tasks, segment_producers
from mammo_core.models.fused import FusedDenseNet
from mammo_core.runtime import openmp_wait
from tests.helpers.paths import REPO


def trained_extractor() -> FusedFeatureMaps:
    """Ours' extractor with its trainable weights moved (so that only the really frozen segments are shared),
    then frozen, in eval: as the detect stage holds it."""
    maps = FusedFeatureMaps(FusedDenseNet(2, seed=0), (0.5, 0.3, 0.2))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in maps.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            p.requires_grad_(False)
    return maps.eval()


@pytest.fixture
def sleeping_waits(monkeypatch):
    """Whatever the test process's environment says: the concurrent path is taken under sleeping waits."""
    monkeypatch.setattr(openmp_wait, "threads_sleep", lambda values=None: True)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def segment_threads(maps: FusedFeatureMaps) -> list[str]:
    """Record, per branch segment call, the name of the thread that ran it."""
    names: list[str] = []
    for branch in maps.fused.branches.values():
        for segment in branch.children():
            segment.register_forward_pre_hook(lambda *_: names.append(threading.current_thread().name))
    return names


@pytest.mark.parametrize(("plan", "producers"), [
    ([(-1, 0), (0, 2), (-1, 0)], {(1, 0): (0, 0), (1, 1): (0, 1)}),
    ([(-1, 0), (-1, 0), (1, 3)], {(2, 0): (1, 0), (2, 1): (1, 1), (2, 2): (1, 2)}),
    ([(-1, 0), (-1, 0), (-1, 0)], {}),
    ([(-1, 0), (0, 1), (1, 2)], {(1, 0): (0, 0), (2, 0): (0, 0), (2, 1): (1, 1)}),
])
def test_a_reused_segment_is_computed_by_the_branch_it_is_reused_from(plan, producers):
    """Branch 2 reusing two of branch 1's segments, which reuses one of branch 0's, reads branch 0's first map."""
    got = segment_producers(plan, [4, 4, 4])
    assert {k: v for k, v in got.items() if k != v} == producers
    assert all(got[(b, i)] == (b, i) for b in range(3) for i in range(4) if (b, i) not in producers)


def test_the_tasks_are_the_segments_not_reused_and_the_two_fusion_sums():
    maps = trained_extractor()
    plan = maps.shared_segments()
    segments = [list(branch.children()) for branch in maps.fused.branches.values()]
    tasks = {t.name: t for t in branch_tasks(plan, segments, maps.fusion_weights)}
    computed = {(b, i) for b in range(len(segments)) for i in range(len(segments[b])) if i >= plan[b][1]}
    assert set(tasks) == computed | {"middle", "final"}
    producer = segment_producers(plan, [len(s) for s in segments])
    assert set(tasks["final"].after) == {producer[(b, len(s) - 1)] for b, s in enumerate(segments)}
    for b, i in computed:  # each segment waits for the map before it (the first: the graph's input, the trunk)
        assert tasks[(b, i)].after == ((TRUNK,) if i == 0 else (producer[(b, i - 1)],))


def test_branches_run_on_one_thread_workers_and_give_the_same_maps(sleeping_waits, two_threads):
    maps = trained_extractor()
    wrapped = ConcurrentBranchMaps(maps)
    x = torch.rand(1, 3, 96, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = maps(x)
        threads = segment_threads(maps)
        got = wrapped(x)
        assert wrapped.workers_for(x) == 2
    ran = set(threads)
    assert ran and all(name.startswith("mammo-worker") for name in ran), ran  # none on the caller's thread
    assert list(got) == ["trunk", "middle", "final"]
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5 * float(expected[name].abs().max()))
    pool = worker_pool.single_thread_workers(2)
    assert pool.submit(torch.get_num_threads).result() == 1
    assert torch.get_num_threads() == 2  # the caller's count is its own again


@pytest.mark.timeout(300)
def test_the_inference_copy_runs_the_trunk_in_bands_and_the_branches_as_tasks(sleeping_waits, two_threads):
    """The whole rewritten extractor on workers (trunk maps of 36 rows: two bands) gives the as-built maps."""
    from mammo_core.detection.inference import BufferedDenseLayers, inference_copy

    maps = trained_extractor()
    fast = inference_copy(maps)
    trunk_blocks = [m for m in fast.maps.fused.trunk.modules() if isinstance(m, BufferedDenseLayers)]
    assert len(trunk_blocks) == 2
    trunk_threads: set[str] = set()
    for block in trunk_blocks:
        block.layers[0].conv2.register_forward_pre_hook(lambda *_: trunk_threads.add(threading.current_thread().name))
    branch_threads = segment_threads(fast.maps)
    x = torch.rand(1, 3, 288, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = maps(x)
        got = fast(x)
    assert len(trunk_threads) == 2 and all(n.startswith("mammo-worker") for n in trunk_threads), trunk_threads
    assert set(branch_threads) and all(n.startswith("mammo-worker") for n in branch_threads)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4 * float(expected[name].abs().max()))


@pytest.mark.parametrize("case", ["one thread", "autograd", "spinning waits"])
def test_otherwise_the_wrapped_module_runs_on_the_callers_thread(case, monkeypatch, two_threads):
    """A one-thread latency must stay one thread; autograd and spinning waits gain nothing from workers."""
    if case == "one thread":
        torch.set_num_threads(1)
        monkeypatch.setattr(openmp_wait, "threads_sleep", lambda values=None: True)
    elif case == "spinning waits":
        monkeypatch.setattr(openmp_wait, "threads_sleep", lambda values=None: False)
    else:
        monkeypatch.setattr(openmp_wait, "threads_sleep", lambda values=None: True)
    maps = trained_extractor()
    wrapped = ConcurrentBranchMaps(maps)
    x = torch.rand(1, 3, 64, 64)
    threads = segment_threads(maps)
    with contextlib.nullcontext() if case == "autograd" else torch.inference_mode():
        wrapped(x)
        assert wrapped.workers_for(x) == 1
    assert set(threads) == {threading.current_thread().name}


def test_starting_the_workers_leaves_the_callers_thread_count_and_the_one_new_threads_inherit():
    """torch.set_num_threads in a worker also sets the count of threads started later; that is undone."""
    probe = (
        "import json, threading, torch\n"
        "from mammo_core.detection import worker_pool\n"
        "torch.set_num_threads(2)\n"
        "pool = worker_pool.single_thread_workers(2)\n"
        "later = []\n"
        "t = threading.Thread(target=lambda: later.append(torch.get_num_threads())); t.start(); t.join()\n"
        "workers = sorted(pool.submit(torch.get_num_threads).result() for _ in range(4))\n"
        "print(json.dumps({'caller': torch.get_num_threads(), 'new_thread': later[0], 'workers': workers}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True,
                         timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"caller": 2, "new_thread": 2, "workers": [1] * 4}


def test_the_inference_copy_of_the_extractor_alone_is_wrapped():
    """The feature cache copies the extractor itself, not a detector holding it."""
    from mammo_core.detection.inference import inference_copy

    copy = inference_copy(trained_extractor())
    assert isinstance(copy, ConcurrentBranchMaps) and isinstance(copy.maps, FusedFeatureMaps)


def test_branch_workers_says_what_an_inference_call_uses(monkeypatch, two_threads):
    from mammo_core.detection.concurrent_branches import branch_workers

    wrapped = ConcurrentBranchMaps(trained_extractor())
    monkeypatch.setattr(openmp_wait, "threads_sleep", lambda values=None: True)
    assert branch_workers(wrapped) == 2 and branch_workers(torch.nn.Sequential(torch.nn.ReLU())) == 0
    torch.set_num_threads(1)
    assert branch_workers(wrapped) == 1
    torch.set_num_threads(2)
    monkeypatch.setattr(openmp_wait, "threads_sleep", lambda values=None: False)
    assert branch_workers(wrapped) == 1


@pytest.mark.timeout(300)
def test_fpn_and_rpn_head_levels_run_in_the_task_graph_and_give_the_same_detections(sleeping_waits, two_threads):
    from mammo_core.detection import builders
    from mammo_core.detection.concurrent_pyramid import ConcurrentFusedBackbone
    from mammo_core.detection.inference import inference_copy

    model = builders.build_detector(builders.DetectorConfig(model="ours", classes=["mass"], input_size=288))[0]
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in model.backbone.body.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    builders.freeze_feature_extractor(model)
    model.eval()
    fast = inference_copy(model)
    assert isinstance(fast.backbone, ConcurrentFusedBackbone)
    fpn_threads: set[str] = set()
    for block in (*fast.backbone.fpn.inner_blocks, *fast.backbone.fpn.layer_blocks):
        block.register_forward_pre_hook(lambda *_: fpn_threads.add(threading.current_thread().name))
    x = torch.rand(1, 3, 288, 96, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = model.backbone(x)
        got = fast.backbone(x)
    assert fpn_threads and all(n.startswith("mammo-worker") for n in fpn_threads), fpn_threads
    assert list(got) == list(expected) == ["0", "1", "2", "pool"]
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4 * float(expected[name].abs().max()))
    head_inputs: list[int] = []  # the RPN takes the graph's head outputs: the head itself sees only the pool level
    fast.rpn.head.head.register_forward_pre_hook(lambda module, args: head_inputs.append(len(args[0])))
    image = x[0].clamp(0, 1)
    with torch.inference_mode():
        want, have = model([image])[0], fast([image])[0]
    assert head_inputs == [1]
    assert len(want["boxes"]) > 0 and torch.equal(have["labels"], want["labels"])
    torch.testing.assert_close(have["boxes"], want["boxes"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(have["scores"], want["scores"], rtol=1e-4, atol=1e-5)
    torch.set_num_threads(1)  # one thread: the plain FPN on the caller, the same pyramid
    with torch.inference_mode():
        single = fast.backbone(x)
    for name, value in expected.items():
        torch.testing.assert_close(single[name], value, rtol=1e-4, atol=1e-4 * float(value.abs().max()))


def test_the_rpn_head_returns_offered_outputs_once_for_the_same_maps_on_the_same_thread():
    from torchvision.models.detection.rpn import RPNHead

    from mammo_core.detection.concurrent_pyramid import PrecomputedRPNHead

    head = PrecomputedRPNHead(RPNHead(4, 3))
    maps = [torch.rand(1, 4, 6, 5), torch.rand(1, 4, 3, 3)]
    offered = ([torch.zeros(1)], [torch.ones(1)])
    head.offer(maps, offered)
    other: list = []
    t = threading.Thread(target=lambda: other.append(head(maps)))  # another thread: nothing offered to it
    t.start()
    t.join()
    assert other[0][0][0].shape == (1, 3, 6, 5)
    assert head([maps[0].clone(), maps[1]])[0][0].shape == (1, 3, 6, 5)  # other tensors: computed (and offer spent)
    head.offer(maps, offered)
    assert head(maps) is offered
    assert head(maps)[0][0].shape == (1, 3, 6, 5)  # an offer is taken once


def test_a_copy_of_the_inference_detector_can_be_made_and_runs():
    """The head's per-thread offer is not copied: deepcopy works, and the copy computes its own outputs."""
    from torchvision.models.detection.rpn import RPNHead

    from mammo_core.detection.concurrent_pyramid import PrecomputedRPNHead

    head = PrecomputedRPNHead(RPNHead(4, 3))
    maps = [torch.rand(1, 4, 6, 5)]
    head.offer(maps, ([torch.zeros(1)], [torch.ones(1)]))
    twin = copy.deepcopy(head)
    assert twin(maps)[0][0].shape == (1, 3, 6, 5)

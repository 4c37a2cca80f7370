"""A detector's backbone replayed from a CUDA graph at inference (batch-1 latency on a GPU).

Why: on a GPU at batch 1 the fused DenseNet extractor is launch-bound, not arithmetic-bound. It runs
three branches of dense layers, each a handful of small kernels, so the CPU spends longer issuing
kernels than the GPU spends running them (the ResNet-50 FPN issues far fewer, larger ones). A CUDA graph
records every kernel of one call once and replays them with a single launch. The backbone (extractor +
FPN) is the part with static shapes at a fixed input size; the RPN and the box heads keep data-dependent
shapes (proposal counts, NMS), so they stay eager.

The wrapper is applied alike to every detector of a comparison (:func:`graph_backbone`), so that a
latency ratio never compares a graphed model with an eager one. It is for inference copies only: no
autograd, weights fixed after capture (a graph replays the kernels on the buffers it captured; changing
a parameter in place is seen, replacing it is not).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

WARMUP_CALLS = 3  # eager calls on a side stream before capture (cuDNN picks its algorithms, allocator settles)


@dataclass
class _Captured:
    """One input shape's graph, the input buffer it reads and the output buffers it writes."""

    graph: torch.cuda.CUDAGraph
    static_input: Tensor
    static_output: OrderedDict[str, Tensor]


def graphable(x: Tensor, module: nn.Module | None = None) -> bool:
    """A call a graph can replay: a CUDA tensor, outside autograd (a graph does not record a backward): with
    grad mode on, neither the input nor a parameter of ``module`` may require a gradient."""
    if not x.is_cuda:
        return False
    if not torch.is_grad_enabled():
        return True
    return not x.requires_grad and (module is None or not any(p.requires_grad for p in module.parameters()))


class GraphedBackbone(nn.Module):
    """``backbone`` computed by replaying a CUDA graph captured per input shape (at most ``max_shapes``).

    Calls on the CPU, with autograd, or of a shape beyond ``max_shapes`` run the wrapped module eagerly.
    The outputs are copies of the graph's buffers, so a caller may keep them across calls.
    """

    def __init__(self, backbone: nn.Module, max_shapes: int = 4):
        super().__init__()
        self.backbone = backbone
        self.out_channels = backbone.out_channels
        self.max_shapes = max_shapes
        self._captured: dict[tuple, _Captured] = {}

    @property
    def captured_shapes(self) -> list[tuple[int, ...]]:
        return [key[0] for key in self._captured]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        if not graphable(x, self):
            return self.backbone(x)
        key = (tuple(x.shape), x.dtype, x.device)
        captured = self._captured.get(key)
        if captured is None:
            if len(self._captured) >= self.max_shapes:
                return self.backbone(x)
            captured = self._capture(x)
            self._captured[key] = captured
        captured.static_input.copy_(x)
        captured.graph.replay()
        return OrderedDict((name, t.clone()) for name, t in captured.static_output.items())

    def _capture(self, x: Tensor) -> _Captured:
        """Warm up on a side stream (as torch.cuda.graphs' documentation asks), then record one call."""
        with torch.inference_mode(False):
            static_input = x.clone()  # a normal tensor: copy_ into it works in and out of inference mode
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.backbone(static_input)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = self.backbone(static_input)
        return _Captured(graph, static_input, OrderedDict(static_output))


def graph_backbone(model: nn.Module) -> int:
    """Wrap ``model.backbone`` in :class:`GraphedBackbone` in place; returns 1 if wrapped, 0 if it was already."""
    if isinstance(model.backbone, GraphedBackbone):
        return 0
    model.backbone = GraphedBackbone(model.backbone)
    return 1

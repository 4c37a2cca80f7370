"""Inference copies of the detectors: the same function, computed with less work (serving and latency).

A trained detector's weights are fixed at inference, so several steps that training needs are dead
weight there. :func:`inference_copy` returns a deep copy (the trained model is untouched) rewritten as
follows; each rewrite computes the same numbers as the model it replaces, up to float rounding (tested
against the unrewritten model):

* **BatchNorm folded into the convolution before it** (``fold_batchnorms``): in eval a BatchNorm is the
  per-channel affine map ``x * s + t``, so ``bn(conv(x))`` is one convolution with weights ``w * s`` and
  bias ``b * s + t``. Applies to every conv -> BN pair: DenseNet's stem and each dense layer's bottleneck
  (``conv1`` -> ``norm2``), and every conv of torchvision's ResNet-50 (its ``FrozenBatchNorm2d`` too).
  A BN that follows a ReLU, pooling or concatenation (DenseNet's ``norm1``, transitions) cannot fold.
* **BatchNorm + ReLU before a 1x1 convolution become a per-channel floor** (``relu_floor_and_conv``): with
  the BN's scale s > 0 and shift t, ``relu(s x + t) = s max(x, -t/s) + t``, and a 1x1 convolution without
  padding (after an average pool, too: both are linear and keep constants) takes ``s`` into its weights and
  ``t`` into its bias. One ``maximum`` pass replaces BN and ReLU: DenseNet's ``norm1``/``relu1`` before every
  bottleneck, which re-normalises the whole channel prefix in every layer, and its transitions. A channel
  with s <= 0 keeps its layer as it was.
* **Dense blocks write into one preallocated tensor** (``BufferedDenseLayers``): torchvision's dense layer
  concatenates all earlier outputs again in every layer (quadratic copying: 16% of our detector's CPU
  time at batch 1 in a 2-thread profile); here each layer reads a channel prefix of one buffer and writes its 32
  new channels after it, which is what the concatenation held.
* **Average pooling before the 1x1 convolution in DenseNet's transitions**: a 1x1 convolution and a 2x2
  average are both linear, so they commute; pooling first runs the convolution on a quarter of the pixels.
* **Attention blocks that are the identity are removed**: ``x + gamma * a`` with ``gamma == 0`` (the value
  every attention block inside a frozen prefix keeps, see ``mammo_core.models.densenet_parts``) is ``x``.
* **The hash head's decoder folded** (``FoldedHashDecoder``): its input standardisation and the BatchNorm
  of its 50q layer are affine maps around a linear one, so they fold into that layer's weights, and its
  fixed permutation becomes an order of the weight rows; the slices are then contiguous (no gather).
* **Max and average pooling from strided views** (``mammo_core.detection.strided_pools``): PyTorch's CPU
  pooling kernels are slow on NCHW maps (the stem's max pool cost 12 ms at batch 1); separable maxima and
  sums of strided views compute the same windows in a tenth of that.
* **One-thread workers instead of a sleeping intra-op team** (``mammo_core.detection.worker_pool``): on the
  CPU with sleeping OpenMP waits and two or more threads, the trunk's dense blocks run in bands of rows
  (``row_bands``), and the branch segments, the fusion sums (in branch order), ours' FPN levels and RPN head
  levels run as one task graph (``concurrent_branches``, ``concurrent_pyramid``, ``task_graph``) instead
  of every small op waking the other intra-op thread; same ops.

The ResNet-50 baseline gets every rewrite that applies to it (BatchNorm folding, its stem's max pool), so that a latency
comparison between the two never compares an optimised model with an unoptimised one.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.densenet import _DenseLayer
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from mammo_core.detection import row_bands
from mammo_core.detection.backbone import FusedFeatureMaps
from mammo_core.detection.concurrent_branches import ConcurrentBranchMaps, run_branches_concurrently
from mammo_core.detection.concurrent_pyramid import run_pyramid_concurrently
from mammo_core.detection.strided_pools import strided_equivalent
from mammo_core.models.densenet_parts import AttentionBlock, DenseLayers
from mammo_core.models.hashing import SLICE_WIDTH, HashDecoder, piecewise_threshold

# (module type, convolution attribute, BatchNorm attribute) pairs that modules call one after the other
NAMED_CONV_BN = (
    (_DenseLayer, "conv1", "norm2"),
    (Bottleneck, "conv1", "bn1"), (Bottleneck, "conv2", "bn2"), (Bottleneck, "conv3", "bn3"),
    (BasicBlock, "conv1", "bn1"), (BasicBlock, "conv2", "bn2"),
)
# containers whose forward calls their children one after the other, in order
_IN_ORDER = (nn.Sequential, IntermediateLayerGetter)
_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def foldable_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """``bn``'s affine weight and bias (1 and 0 where it has none), once it is known to be a fixed affine map.

    ValueError for a BatchNorm in training mode or without running statistics: it normalises with the
    statistics of its input, which no fold can know.
    """
    if isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) and (bn.training or not bn.track_running_stats):
        raise ValueError("only a BatchNorm in eval with running statistics is an affine map that can fold")
    weight = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
    bias = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    return weight, bias


def folded_conv(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """One convolution computing ``bn(conv(x))`` with ``bn`` in eval (running statistics)."""
    weight, bias = foldable_affine(bn)
    fused = copy.deepcopy(conv)
    w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, weight, bias)
    fused.weight, fused.bias = w, b
    fused.weight.requires_grad_(False)
    fused.bias.requires_grad_(False)
    return fused


def fold_batchnorms(model: nn.Module) -> int:
    """Fold, in place, every BatchNorm that directly follows a convolution; returns how many were folded.

    Pairs are found in containers that call their children in order (``nn.Sequential``, torchvision's
    ``IntermediateLayerGetter``) (a Conv2d child followed by a BN child) and at the
    attribute pairs of :data:`NAMED_CONV_BN`, where the module's forward calls one on the other's output.
    The BN is replaced by ``nn.Identity``.
    """
    folded = 0
    for module in list(model.modules()):
        if isinstance(module, _IN_ORDER):
            names = list(module._modules)
            for first, second in zip(names, names[1:], strict=False):
                conv, bn = module._modules[first], module._modules[second]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, _NORMS):
                    setattr(module, first, folded_conv(conv, bn))
                    setattr(module, second, nn.Identity())
                    folded += 1
        for kind, conv_name, bn_name in NAMED_CONV_BN:
            if isinstance(module, kind) and isinstance(getattr(module, bn_name, None), _NORMS):
                setattr(module, conv_name, folded_conv(getattr(module, conv_name), getattr(module, bn_name)))
                setattr(module, bn_name, nn.Identity())
                folded += 1
    return folded


class ReluFloor(nn.Module):
    """``max(x, floor)`` per channel: what BatchNorm + ReLU leave once the next convolution took their affine map."""

    def __init__(self, floor: Tensor):
        super().__init__()
        self.register_buffer("floor", floor.detach().reshape(1, -1, 1, 1).clone())

    def forward(self, x: Tensor) -> Tensor:
        return torch.maximum(x, self.floor)


def relu_floor_and_conv(bn: nn.Module, conv: nn.Conv2d) -> tuple[ReluFloor, nn.Conv2d] | None:
    """``(floor, conv')`` with ``conv'(floor(x)) == conv(relu(bn(x)))``, or None where that does not hold.

    It holds for a BatchNorm in eval whose every scale ``s`` is positive and a 1x1 convolution without
    padding or groups: ``relu(s x + t) = s max(x, -t/s) + t``, the scales multiply the convolution's input
    channels and the constant ``t`` adds ``W t`` to its bias (padding would see 0 instead of ``t``).
    """
    if not (isinstance(bn, _NORMS) and isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
            and conv.padding == (0, 0) and conv.groups == 1 and conv.in_channels == bn.running_mean.numel()):
        return None
    try:
        weight, bias = foldable_affine(bn)
    except ValueError:
        return None
    scale = weight / torch.sqrt(bn.running_var + bn.eps)
    if not bool(torch.all(scale > 0)):
        return None
    shift = bias - bn.running_mean * scale
    floor = -shift / scale
    if not bool(torch.all(torch.isfinite(floor))):  # a scale so small that -t/s overflows
        return None
    new = copy.deepcopy(conv)
    w = conv.weight.detach()
    b = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=w.dtype, device=w.device)
    new.weight = nn.Parameter(w * scale.reshape(1, -1, 1, 1), requires_grad=False)
    new.bias = nn.Parameter(b + w[:, :, 0, 0] @ shift, requires_grad=False)
    return ReluFloor(floor), new


def _linear_pool(module: nn.Module) -> bool:
    """An average pool without padding: linear, and it maps a per-channel constant to itself."""
    return (isinstance(module, nn.AvgPool2d) and module.padding in (0, (0, 0)) and not module.ceil_mode
            and module.divisor_override is None)


def fold_batchnorm_relus(model: nn.Module) -> int:
    """Rewrite, in place, every BN -> ReLU -> (average pool) -> 1x1 conv run that :func:`relu_floor_and_conv` takes.

    Runs are found in dense layers (``norm1``, ``relu1``, ``conv1``) and in ``nn.Sequential`` children;
    returns how many were rewritten.
    """
    folded = 0
    for module in list(model.modules()):
        if isinstance(module, _DenseLayer) and isinstance(module.relu1, nn.ReLU):
            pair = relu_floor_and_conv(module.norm1, module.conv1)
            if pair is not None:
                module.norm1, module.conv1 = pair
                module.relu1 = nn.Identity()
                folded += 1
        elif isinstance(module, nn.Sequential):
            names = list(module._modules)
            for i in range(len(names) - 2):
                if not isinstance(module._modules[names[i + 1]], nn.ReLU):
                    continue
                j = i + 2
                while j < len(names) - 1 and _linear_pool(module._modules[names[j]]):
                    j += 1
                pair = relu_floor_and_conv(module._modules[names[i]], module._modules[names[j]])
                if pair is not None:
                    setattr(module, names[i], pair[0])
                    setattr(module, names[i + 1], nn.Identity())
                    setattr(module, names[j], pair[1])
                    folded += 1
    return folded


class BufferedDenseLayers(nn.Module):
    """:class:`DenseLayers`' forward without re-concatenating: every layer writes into one output tensor.

    Layer k reads the first ``c_k`` channels of the buffer (the input and the k-1 earlier outputs, exactly
    what torchvision's layer concatenates) and writes its own output behind them. Where
    :func:`~mammo_core.detection.row_bands.bands_for` gives more than one band (CPU inference on two or more
    threads under sleeping OpenMP waits), each layer is computed band by band of rows on one-thread
    workers (:mod:`mammo_core.detection.row_bands`): a layer is pointwise up to its last convolution, whose
    padding is the halo a band reads beyond its rows.
    """

    def __init__(self, block: DenseLayers):
        super().__init__()
        self.layers = nn.ModuleList(block.values())
        for layer in self.layers:
            if getattr(layer, "drop_rate", 0.0):
                raise ValueError("dense layers with dropout are not inference-equivalent here")
        self.growth = [int(layer.conv2.out_channels) for layer in self.layers]
        self.halo = _band_halo(self.layers)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        layout = torch.channels_last if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last) else torch.contiguous_format
        out = torch.empty((n, c + sum(self.growth), h, w), dtype=x.dtype, device=x.device, memory_format=layout)
        out[:, :c] = x
        bands = row_bands.bands_for(x, h) if self.halo is not None else [(0, h)]
        if len(bands) > 1:
            starts = [c + sum(self.growth[:k]) for k in range(len(self.layers))]
            row_bands.run_in_bands(lambda k, r0, r1: self._layer_rows(out, k, starts[k], r0, r1), len(self.layers),
                                   bands, torch.is_inference_mode_enabled())
            return out
        for layer, g in zip(self.layers, self.growth, strict=True):
            bottleneck = layer.conv1(layer.relu1(layer.norm1(out[:, :c])))
            out[:, c:c + g] = layer.conv2(layer.relu2(layer.norm2(bottleneck)))
            c += g
        return out

    def _layer_rows(self, out: Tensor, k: int, c: int, r0: int, r1: int) -> None:
        """Layer ``k``'s output rows ``r0:r1`` from the buffer's first ``c`` channels, rows ``r0-halo:r1+halo``."""
        layer, halo = self.layers[k], int(self.halo or 0)
        lo, hi = max(r0 - halo, 0), min(r1 + halo, out.shape[2])
        bottleneck = layer.conv1(layer.relu1(layer.norm1(out[:, :c, lo:hi])))
        rows = layer.conv2(layer.relu2(layer.norm2(bottleneck)))
        out[:, c:c + self.growth[k], r0:r1] = rows[:, :, r0 - lo:r1 - lo]


_POINTWISE = (nn.Identity, nn.ReLU, ReluFloor, *_NORMS)


def _band_halo(layers: nn.ModuleList) -> int | None:
    """Rows a band of dense-layer outputs reads beyond its own, or None when the layers cannot run in bands.

    They can when everything before the last convolution is pointwise (per-pixel norms, ReLUs, floors and
    a 1x1 convolution) and the last convolution keeps the map's size (stride 1, no dilation, odd kernel
    padded by half its height): its padding is then the halo, and the zero rows it pads at the map's top
    and bottom are the ones the whole map would see.
    """
    halos = set()
    for layer in layers:
        conv1, conv2 = getattr(layer, "conv1", None), getattr(layer, "conv2", None)
        pointwise = all(isinstance(getattr(layer, name, None), _POINTWISE)
                        for name in ("norm1", "relu1", "norm2", "relu2"))
        if not (pointwise and isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d)
                and conv1.kernel_size == (1, 1) and conv1.stride == (1, 1) and conv1.padding == (0, 0)
                and conv2.stride == (1, 1) and conv2.dilation == (1, 1) and conv2.kernel_size[0] % 2 == 1
                and conv2.padding[0] == conv2.kernel_size[0] // 2 and conv2.padding_mode == "zeros"):
            return None
        halos.add(int(conv2.padding[0]))
    return max(halos, default=0)


class FoldedHashDecoder(nn.Module):
    """:class:`HashDecoder`'s relaxed codes from one linear layer whose rows are already in slice order.

    ``relu(bn((x - mean) / scale @ W.T + b))[:, perm]`` is ``relu(x @ W'.T + b')`` with the standardisation
    and the (eval) BatchNorm folded into ``W', b'`` and their rows taken in ``perm`` order; each bit's 50
    features are then one contiguous slice, weighted by the decoder's own slice weights.
    """

    def __init__(self, decoder: HashDecoder):
        super().__init__()
        norm = decoder.projection_norm
        norm_weight, norm_bias = foldable_affine(norm)
        weight = decoder.projection.weight / decoder.input_scale
        bias = decoder.projection.bias - weight @ decoder.input_mean
        weight, bias = fuse_linear_bn_weights(weight, bias, norm.running_mean, norm.running_var, norm.eps,
                                              norm_weight, norm_bias)
        self.weight = nn.Parameter(weight[decoder.permutation].detach(), requires_grad=False)
        self.bias = nn.Parameter(bias[decoder.permutation].detach(), requires_grad=False)
        self.slice_weight = nn.Parameter(decoder.slice_weight.detach().clone(), requires_grad=False)
        self.q, self.beta, self.eps = decoder.q, decoder.beta, decoder.eps

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(F.linear(x, self.weight, self.bias)).view(-1, self.q, SLICE_WIDTH)
        logits = (h * self.slice_weight).sum(dim=-1)
        return piecewise_threshold(torch.sigmoid(self.beta * logits), self.eps)


def _pool_first(module: nn.Sequential) -> bool:
    """Whether ``module`` ends in a 1x1 stride-1 convolution then a 2x2/stride-2 average (a transition)."""
    names = list(module._modules)
    if len(names) < 2:
        return False
    conv, pool = module._modules[names[-2]], module._modules[names[-1]]
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.groups == 1 and isinstance(pool, nn.AvgPool2d)
            and pool.padding == 0 and not pool.ceil_mode)


def rewrite_for_inference(model: nn.Module) -> dict[str, int]:
    """Apply every rewrite of this module's docstring in place; returns how many of each were made."""
    counts = {"batchnorms_folded": fold_batchnorms(model), "dense_blocks_buffered": 0, "transitions_pooled_first": 0,
              "identity_attention_removed": 0, "hash_decoders_folded": 0}
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, DenseLayers):
                setattr(module, name, BufferedDenseLayers(child))
                counts["dense_blocks_buffered"] += 1
            elif type(child) is HashDecoder:
                setattr(module, name, FoldedHashDecoder(child))
                counts["hash_decoders_folded"] += 1
            elif isinstance(child, AttentionBlock) and bool(torch.all(child.gamma == 0)):
                setattr(module, name, nn.Identity())
                counts["identity_attention_removed"] += 1
            elif isinstance(child, nn.Sequential) and _pool_first(child):
                names = list(child._modules)
                order = names[:-2] + [names[-1], names[-2]]
                setattr(module, name, nn.Sequential(*(child._modules[k] for k in order)))
                counts["transitions_pooled_first"] += 1
    counts["batchnorm_relus_folded"] = fold_batchnorm_relus(model)  # after the BN -> conv folds (conv1 -> norm2)
    counts["pools_strided"] = use_strided_pools(model)  # after the reordering, which rebuilds transitions
    counts["pyramids_concurrent"] = run_pyramid_concurrently(model)  # last: they wrap the rewritten extractor
    counts["branch_maps_concurrent"] = run_branches_concurrently(model)
    return counts


def use_strided_pools(model: nn.Module) -> int:
    """Replace, in place, every pooling module that :func:`strided_equivalent` covers; returns how many."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            strided = strided_equivalent(child)
            if strided is not None:
                setattr(module, name, strided)
                replaced += 1
    return replaced


def inference_copy(model: nn.Module) -> nn.Module:
    """A rewritten deep copy of ``model`` in eval mode with gradients off (``model`` is left as it is)."""
    fast = copy.deepcopy(model).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    rewrite_for_inference(fast)
    if isinstance(fast, FusedFeatureMaps):  # the extractor alone (the feature cache): its wrapper is the copy
        return ConcurrentBranchMaps(fast)
    return fast

"""The DenseNet parts the paper adds: attention that starts as the identity, a closing transition, split blocks."""

from __future__ import annotations

import torch
from torchvision.models import densenet121

from mammo_core.models.densenet_parts import AttentionBlock, ClosingTransition, DenseLayers


def test_attention_is_the_exact_identity_until_gamma_moves() -> None:
    torch.manual_seed(0)
    block, x = AttentionBlock(32).eval(), torch.randn(2, 32, 9, 9)
    assert torch.equal(block(x), x)
    with torch.no_grad():
        block.gamma.fill_(1.0)
    out = block(x)
    assert out.shape == x.shape and not torch.allclose(out, x)


def test_closing_transition_maps_channels_and_halves_the_side_rounding_up() -> None:
    out = ClosingTransition(16, 8).eval()(torch.randn(1, 16, 7, 7))
    assert out.shape == (1, 8, 4, 4)


def test_a_dense_block_split_in_two_runs_bit_identical_to_the_whole() -> None:
    torch.manual_seed(0)
    block = densenet121(weights=None).features.denseblock1.eval()
    layers = list(block.named_children())
    first, rest = DenseLayers(layers[:2]), DenseLayers(layers[2:])
    x = torch.randn(1, 64, 16, 16)
    with torch.no_grad():
        whole = block(x)
        split = rest(first(x))
    assert whole.shape == (1, 64 + 6 * 32, 16, 16)
    assert torch.equal(split, whole)

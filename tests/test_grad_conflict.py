"""The gradient-conflict monitor and the hybrid loss, in one process."""

import pytest
import torch
from torch import nn

from pretrain.methods.grad_conflict import block_gradient_cosines, plot_cosines
from tests.test_train import tiny


def toy():
    torch.manual_seed(0)
    blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 1)])
    x = torch.randn(16, 8)
    out = blocks[2](torch.tanh(blocks[1](torch.tanh(blocks[0](x)))))
    return blocks, out


def test_identical_losses_agree_everywhere():
    blocks, out = toy()
    loss = (out**2).mean()
    assert block_gradient_cosines(loss, loss, blocks) == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)


def test_opposite_losses_conflict_everywhere():
    blocks, out = toy()
    loss = (out**2).mean()
    assert block_gradient_cosines(loss, -3 * loss, blocks) == pytest.approx([-1.0, -1.0, -1.0], abs=1e-6)


def test_measuring_leaves_the_gradients_alone():
    blocks, out = toy()
    loss = (out**2).mean()
    block_gradient_cosines(loss, out.mean(), blocks)
    assert all(p.grad is None for p in blocks.parameters())
    loss.backward()  # the graph is still there for the training step
    assert all(p.grad is not None for p in blocks.parameters())


def test_plot_is_an_image():
    picture = plot_cosines([0.5, -0.25, 1.0])
    assert picture.dtype == torch.uint8 and picture.shape == (3, 160, 320)


def test_hybrid_loss_weights_the_two_losses():
    hybrid = tiny("hybrid", "hybrid.weight=0.3")
    views = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    torch.manual_seed(5)
    out = hybrid(views)
    assert out["loss"].item() == pytest.approx(
        0.7 * out["loss_mim"].item() + 0.3 * out["loss_cl"].item(), rel=1e-5
    )
    names = [name for name, _ in hybrid.named_parameters()]
    assert names[0].startswith("encoder.") and not any(
        n.startswith(("mae.encoder", "moco.encoder")) for n in names
    )
    scalars, pictures = hybrid.diagnostics(views)
    assert len(scalars) == 12 and all(-1 <= v <= 1 for v in scalars.values())
    assert "grad_cosine_per_block" in pictures

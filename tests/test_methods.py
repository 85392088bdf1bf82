"""The methods beyond MAE and MoCo v3, in one process: losses against plain re-implementations, masks,
the momentum branch, and the gradient of the all-gather SimCLR uses (2 gloo processes)."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pretrain.config import load_config
from pretrain.core.distributed import all_gather_with_grad
from pretrain.methods import OBJECTIVES, build_objective
from pretrain.methods.momentum import MomentumBranch
from pretrain.models import block_mask, create_encoder, enable_block_checkpointing
from tests.conftest import TINY

TWO_VIEWS = {"mocov3", "simclr", "byol", "simsiam", "cmae", "conmim"}


def tiny(method, *extra):
    torch.manual_seed(0)
    return build_objective(load_config(None, [f"method={method}", *TINY, *extra]))


def batch(method, n=8):
    views = 3 if method == "hybrid" else 2 if method in TWO_VIEWS else 1
    images = [torch.randn(n, 3, 32, 32) for _ in range(views)]
    return images if views > 1 else images[0]


@pytest.mark.parametrize("method", sorted(set(OBJECTIVES) - {"linprobe"}))  # a probe's encoder is frozen
def test_every_method_gives_a_finite_loss_and_trains_its_encoder(method):
    objective = tiny(method)
    images = batch(method)
    outputs = objective(images, torch.arange(len(images)) % 4) if objective.uses_labels else objective(images)
    assert math.isfinite(outputs["loss"].item())
    outputs["loss"].backward()
    grads = [p.grad for p in objective.encoder.blocks.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(
        g.abs().sum() > 0 for g in grads
    )
    assert all(p.grad is None for name, p in objective.named_parameters() if not p.requires_grad)


def test_simclr_is_nt_xent_over_both_views():
    simclr = tiny("simclr")
    first, second = batch("simclr")
    loss = simclr([first, second])["loss"]
    z = F.normalize(torch.cat([simclr.projector(simclr.encoder(v)) for v in (first, second)]), dim=1)
    n = len(first)
    similarity = z @ z.T / simclr.temperature
    reference = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        others = torch.cat([similarity[i, :i], similarity[i, i + 1 :]])
        reference += -(similarity[i, positive] - torch.logsumexp(others, 0))
    assert torch.allclose(loss, reference / (2 * n), atol=1e-5)


def test_simsiam_and_byol_stop_the_gradient_at_the_target():
    simsiam = tiny("simsiam")
    first, second = batch("simsiam")
    loss = simsiam([first, second])["loss"]
    z1, z2 = simsiam.projector(simsiam.encoder(first)), simsiam.projector(simsiam.encoder(second))
    p1, p2 = simsiam.predictor(z1), simsiam.predictor(z2)
    cos = lambda p, z: F.cosine_similarity(p, z, dim=-1).mean()
    assert torch.allclose(loss, -(cos(p1, z2) + cos(p2, z1)) / 2, atol=1e-6)
    gradient = lambda value: torch.autograd.grad(value, simsiam.projector[0].weight, retain_graph=True)[0]
    detached = -(cos(p1, z2.detach()) + cos(p2, z1.detach())) / 2
    assert torch.allclose(gradient(loss), gradient(detached), atol=1e-6)
    assert not torch.allclose(gradient(loss), gradient(-(cos(p1, z2) + cos(p2, z1)) / 2), atol=1e-6)
    byol = tiny("byol")
    before = [p.clone() for p in byol.target.branch.parameters()]
    byol(batch("byol"))["loss"].backward()
    assert all(torch.equal(a, b) for a, b in zip(before, byol.target.branch.parameters()))
    assert all(p.grad is None for p in byol.target.branch.parameters())


def test_block_mask_masks_whole_squares_at_the_ratio():
    torch.manual_seed(0)
    mask = block_mask(5, (8, 8), 2, 0.6).view(5, 8, 8)
    assert mask.sum(dim=(1, 2)).tolist() == [round(0.6 * 16) * 4] * 5
    squares = mask.view(5, 4, 2, 4, 2)
    assert torch.equal(squares.amin(dim=(2, 4)), squares.amax(dim=(2, 4))), "2x2 squares are masked whole"
    assert not torch.equal(mask[0], mask[1])


@pytest.mark.parametrize("method", ["simmim", "conmim"])
def test_masked_methods_score_only_masked_patches(method):
    """The encoder's tokens change with the pixels of the visible patches of the online input and not
    with those of the masked ones; SimMIM's loss does change with the masked pixels: they are its targets."""
    objective = tiny(method)
    images = batch(method, n=4)
    online = images if method == "simmim" else images[0]
    torch.manual_seed(1)
    mask = block_mask(4, (4, 4), 2, objective.mask_ratio)
    from pretrain.models import unpatchify

    masked_pixels = unpatchify(mask[..., None].expand(-1, -1, 192), 8)
    changed = online + masked_pixels * torch.randn_like(online)
    torch.manual_seed(1)
    tokens, used_mask = objective.masked_tokens(online)
    torch.manual_seed(1)
    tokens_changed, _ = objective.masked_tokens(changed)
    assert torch.equal(used_mask, mask)
    assert torch.allclose(tokens, tokens_changed, atol=1e-5), "masked pixels must not reach the encoder"
    torch.manual_seed(1)
    visible_changed = online + (1 - masked_pixels) * torch.randn_like(online)
    tokens_visible_changed, _ = objective.masked_tokens(visible_changed)
    assert (tokens_visible_changed - tokens).abs().amax() > 1e-2, "the visible pixels do reach it"
    if method == "simmim":  # the loss: the masked pixels are SimMIM's targets, the visible ones are not
        torch.manual_seed(1)
        loss = objective(online)["loss"]
        torch.manual_seed(1)
        assert not torch.allclose(objective(changed)["loss"], loss), "masked pixels are the targets"


def test_cmae_target_sees_the_whole_image_and_is_constant_momentum():
    cmae = tiny("cmae", "cmae.contrast_weight=0.3")
    assert cmae.mae.mask_ratio == 0.75 and not cmae.target.cosine and cmae.contrast_weight == 0.3
    source, shifted = batch("cmae")
    out = cmae([source, shifted])
    assert {"loss_reconstruction", "loss_contrast"} <= set(out)
    assert torch.allclose(out["loss"], out["loss_reconstruction"] + 0.3 * out["loss_contrast"])
    cmae.after_step(5, 10)
    assert cmae.target.momentum == 0.996


def test_momentum_branch_must_be_copied_before_block_checkpointing():
    encoder = create_encoder("vit_tiny", 32, 8)
    enable_block_checkpointing(encoder.blocks)
    with pytest.raises(ValueError, match="before enabling block checkpointing"):
        MomentumBranch({"encoder": encoder}, 0.99)


def _gather_worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x = torch.full((3, 2), float(rank + 1), requires_grad=True)
    weights = torch.arange(12, dtype=torch.float32).view(6, 2) * (rank + 1)  # a different loss per rank
    (all_gather_with_grad(x) * weights).sum().backward()
    results[rank] = x.grad.clone()
    dist.destroy_process_group()


def test_all_gather_with_grad_gives_each_rank_the_gradient_of_every_ranks_loss():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_gather_worker, args=(port, results), nprocs=2)
    # D/dx of the sum of both ranks' losses.
    total = torch.arange(12, dtype=torch.float32).view(6, 2) * (1 + 2)
    assert torch.equal(results[0], total[:3]) and torch.equal(results[1], total[3:])


def test_pair_metrics_tell_agreement_spread_and_collapse():
    from pretrain.methods.pair_metrics import pair_metrics

    torch.manual_seed(0)
    spread = torch.randn(64, 16)
    same = pair_metrics(spread, spread)
    assert same["repr/pair_top1"] == 1 and same["repr/alignment"] == 0
    assert same["repr/uniformity"] < -2 and same["repr/std"] == pytest.approx(16**-0.5, rel=0.2)
    shuffled = pair_metrics(spread, spread[torch.randperm(64)])
    assert shuffled["repr/pair_top1"] < 0.1 and shuffled["repr/alignment"] > 1.5
    collapsed = pair_metrics(torch.ones(64, 16), torch.ones(64, 16))
    assert (
        collapsed["repr/uniformity"] == 0 and collapsed["repr/std"] == 0 and collapsed["repr/alignment"] == 0
    )


@pytest.mark.parametrize("method", ["mocov3", "simclr", "byol", "simsiam"])
def test_two_view_methods_log_the_pair_metrics(method):
    outputs = tiny(method)(batch(method))
    assert {"repr/pair_top1", "repr/alignment", "repr/uniformity", "repr/std"} <= set(outputs)


def test_global_pool_avg_feeds_the_heads_the_mean_patch_token_and_keeps_timms_names():
    from pretrain.models import pool_tokens

    token, avg = (
        tiny("mocov3"),
        build_objective(load_config(None, ["method=mocov3", *TINY, "model.global_pool=avg"])),
    )
    assert list(token.encoder.state_dict()) == list(avg.encoder.state_dict()), (
        "exports load into the token model"
    )
    images = torch.randn(4, 3, 32, 32)
    avg.eval()
    assert torch.allclose(
        avg.encoder(images), pool_tokens(avg.encoder, avg.encoder.forward_features(images), "mean")
    )
    assert avg.target.branch["encoder"].global_pool == "avg", "the momentum encoder reads the same token"

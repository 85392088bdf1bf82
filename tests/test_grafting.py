"""Layer-grafted pretraining in one process: lr rules, starting weights (MAE's release format), L1 pull."""

import json

import pytest
import torch

from pretrain.config import load_config
from pretrain.core.errors import UserError
from pretrain.graft.auto_split import choose_split, decide_split, read_cosines, with_split
from pretrain.graft.param_groups import graft_rule, objective_param_groups
from pretrain.graft.start_weights import grafted_objective
from pretrain.training.ds_config import deepspeed_config
from tests.conftest import TINY


def rule(name, depth=12, *overrides):
    return graft_rule(load_config(None, [f"graft.rule={name}", *overrides]).graft, depth)


def test_list_rule_spreads_the_official_scales_evenly_over_the_blocks():
    scales = [rule("list")(layer) for layer in range(14)]
    assert scales == [0.1] * 9 + [1.0] * 5  # embeddings + blocks 0-7 | blocks 8-11 + heads
    large = [rule("list", 24)(layer) for layer in range(26)]
    assert large == [0.1] * 17 + [1.0] * 9  # ViT-L: blocks 0-15 | 16-23 + heads
    uneven = [rule("list", 12, "graft.scales=[0.2, 0.5, 1.0, 2.0, 3.0]")(layer) for layer in range(14)]
    assert uneven[0] == 0.2 and uneven[-1] == 3.0 and uneven == sorted(uneven)


def test_split_ramp_and_freeze_rules():
    assert [rule("split", 12, "graft.split=4")(layer) for layer in (0, 4, 5, 13)] == [0.1, 0.1, 1.0, 1.0]
    ramp = [rule("ramp")(layer) for layer in range(14)]
    assert (
        ramp == sorted(ramp)
        and ramp[0] == pytest.approx(0.1, rel=1e-3)
        and ramp[-1] == pytest.approx(1.0, rel=0.05)
    )
    assert ramp[8] < 0.1**0.5 < ramp[9], "the ramp crosses the geometric mean between block 7 and block 8"
    assert [rule("freeze")(layer) for layer in (0, 8, 9, 13)] == [0.0, 0.0, 1.0, 1.0]


def test_freeze_leaves_the_lower_layers_out_of_the_optimizer():
    config = load_config(None, ["method=mocov3", *TINY, "graft.rule=freeze", "graft.split=6"])
    objective = grafted_objective(config)
    groups = objective_param_groups(objective, config)
    trained = {n for g in groups for n in g["names"]}
    assert not any(
        n.startswith(("encoder.blocks.0.", "encoder.blocks.5.", "encoder.cls_token")) for n in trained
    )
    assert any(n.startswith("encoder.blocks.6.") for n in trained)
    assert not objective.encoder.blocks[0].attn.qkv.weight.requires_grad


def mae_release_file(path, arch_overrides=(), drop=None):
    """A checkpoint in MAE's release layout: {'model': state_dict} with timm names, decoder keys included."""
    config = load_config(None, ["method=mae", *TINY, *arch_overrides])
    torch.manual_seed(7)
    mae = grafted_objective(config)
    # Decoder_embed, decoder_blocks, ... as in models_mae.py.
    release_name = lambda name: (
        name.replace("encoder.", "", 1)
        .replace("decoder.mask_token", "mask_token")
        .replace("decoder.", "decoder_")
    )
    state = {release_name(name): tensor for name, tensor in mae.state_dict().items()}
    if drop:
        del state[drop]
    torch.save({"model": state}, path)
    return state


def test_mae_release_format_initializes_both_moco_encoders(tmp_path):
    state = mae_release_file(tmp_path / "mae_pretrain.pth")
    assert "decoder_embed.weight" in state and "mask_token" in state and "blocks.0.attn.qkv.weight" in state
    moco = grafted_objective(
        load_config(None, ["method=mocov3", *TINY, f"graft.init={tmp_path / 'mae_pretrain.pth'}"])
    )
    for name, tensor in moco.encoder.state_dict().items():
        assert torch.equal(tensor, state[name]), name
        assert torch.equal(moco.target.branch["encoder"].state_dict()[name], state[name]), name


@pytest.mark.parametrize(
    "case, message",
    [
        ("other_arch", "cls_token has shape (1, 1, 384), this encoder needs (1, 1, 192)"),
        ("missing", "has no 'blocks.3.attn.qkv.weight'"),
        ("nowhere", "does not exist"),
    ],
)
def test_a_mismatched_start_is_a_clear_error(tmp_path, case, message):
    path = tmp_path / "start.pth"
    if case == "other_arch":
        mae_release_file(path, ["model.arch=vit_small"])
    elif case == "missing":
        mae_release_file(path, drop="blocks.3.attn.qkv.weight")
    else:
        path = tmp_path / "nowhere.pth"
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        grafted_objective(load_config(None, ["method=mocov3", *TINY, f"graft.init={path}"]))


def test_l1_pull_measures_the_distance_of_the_lower_layers(tmp_path):
    mae_release_file(tmp_path / "start.pth")
    config = load_config(
        None,
        [
            "method=mocov3",
            *TINY,
            f"graft.init={tmp_path / 'start.pth'}",
            "graft.l1_weight=0.5",
            "graft.l1_to_layer=2",
        ],
    )
    moco = grafted_objective(config)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    assert moco(views)["loss_l1_pull"] == 0
    with torch.no_grad():
        moco.encoder.blocks[1].attn.qkv.weight.add_(0.01)  # layer 2: pulled
        moco.encoder.blocks[2].attn.qkv.weight.add_(1.0)  # layer 3: not pulled
    expected = 0.5 * 0.01 * moco.encoder.blocks[1].attn.qkv.weight.numel()
    assert moco(views)["loss_l1_pull"].item() == pytest.approx(expected, rel=1e-3)


def test_l1_pull_is_refused_under_zero3():
    config = load_config(None, ["graft.l1_weight=1e-5", "deepspeed.config=ds_configs/zero3.json"])
    with pytest.raises(UserError, match="graft.l1_weight needs whole parameters"):
        deepspeed_config(config, 2)


def test_graft_and_layer_decay_are_exclusive():
    with pytest.raises(UserError, match="graft.rule"):
        load_config(None, ["graft.rule=list", "optim.layer_decay=0.75"])


def test_cl_to_mim_starts_mae_from_a_moco_style_checkpoint(tmp_path):
    """The reverse order: MAE from a MoCo v3 file (`state_dict` with `module.base_encoder.` names)."""
    torch.manual_seed(3)
    moco = grafted_objective(load_config(None, ["method=mocov3", *TINY]))
    wrapped = {f"module.base_encoder.{name}": tensor for name, tensor in moco.encoder.state_dict().items()}
    wrapped.update(
        {f"module.predictor.{name}": tensor for name, tensor in moco.predictor.state_dict().items()}
    )
    torch.save({"state_dict": wrapped, "epoch": 300}, tmp_path / "moco.pth.tar")
    mae = grafted_objective(
        load_config(None, ["method=mae", *TINY, f"graft.init={tmp_path / 'moco.pth.tar'}"])
    )
    for name, tensor in moco.encoder.state_dict().items():
        assert torch.equal(mae.encoder.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    "cosines, split",
    [
        ([0.6, 0.5, 0.3, 0.1, -0.2, -0.4], 4),
        ([0.6, 0.5, -0.1, 0.2, -0.2, -0.4], 4),  # one dip: the best step still puts it in the lower part
        ([0.5, 0.4, 0.3], 3),  # all agree: every block lower
        ([-0.1, -0.3], 0),  # all conflict
    ],
)
def test_auto_split_is_the_best_step_from_agreement_to_conflict(cosines, split):
    assert choose_split(cosines) == split


def test_auto_split_ignores_cosines_within_the_noise_and_says_when_it_cannot_tell():
    cosines = [0.6, 0.5, 0.02, -0.01, -0.3, -0.5]
    errors = [0.05, 0.05, 0.05, 0.05, 0.05, 0.05]  # blocks 2 and 3 are within 2 standard errors of 0
    assert choose_split(cosines, 0.0, errors, 2.0) == 4, "undecided blocks go with the deeper split"
    assert choose_split(cosines, 0.0, errors, 0.0) == 3, "without the guard block 3 counts as conflict"
    noise = [0.033, -0.040, -0.020, 0.008, -0.023]  # the digits' short probe: every |cosine| < 0.04
    assert choose_split(noise, 0.0, [0.03] * 5, 2.0) is None


def test_auto_split_reads_a_saved_monitor_log(tmp_path, capsys):
    """graft.auto_from: a hybrid run's TensorBoard log; the later half of its measurements decides."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "hybrid" / "tb"))
    for step in range(10, 90, 10):
        early = step <= 40  # the first half is noise from untrained heads; it must not count
        wobble = 0.01 if step % 20 else -0.01  # measurements scatter: a standard error to compare with
        for block in range(12):
            writer.add_scalar(
                f"grad_cosine/block_{block:02d}", -0.9 if early else 0.55 - 0.1 * block + wobble, step
            )
    writer.close()
    cosines, steps, errors = read_cosines(tmp_path / "hybrid")
    assert cosines == pytest.approx([0.55 - 0.1 * b for b in range(12)]) and steps == [50, 60, 70, 80]
    assert errors == pytest.approx([0.02 / 3**0.5 / 2] * 12)
    config = load_config(
        None,
        [
            "method=mocov3",
            *TINY,
            "graft.rule=auto",
            f"graft.auto_from={tmp_path / 'hybrid'}",
            f"run.dir={tmp_path / 'run'}",
        ],
    )
    configured = config.graft.split
    curve, _ = decide_split(config, train=None)
    decided = with_split(config, curve)
    assert decided.graft.split == curve["split"] == 6  # blocks 0-5 agree (block 5: 0.05), block 6 on conflict
    assert config.graft.split == configured, "deciding changes no config: the run trains the decided copy"
    assert json.loads((tmp_path / "run" / "graft_auto.json").read_text())["split"] == 6
    groups = objective_param_groups(grafted_objective(decided), decided)
    scales = {layer: g["lr_scale"] for g in groups for layer in g["layer_ids"]}
    assert scales[6] == 0.1 and scales[7] == 1.0  # layer id = block + 1
    noisy = load_config(
        None,
        [
            "method=mocov3",
            *TINY,
            "graft.rule=auto",
            f"graft.auto_from={tmp_path / 'noise'}",
            f"run.dir={tmp_path / 'run2'}",
            "graft.split=5",
        ],
    )
    writer = SummaryWriter(str(tmp_path / "noise" / "tb"))
    for step, sign in zip(range(10, 90, 10), (1, -1) * 4):
        for block in range(12):
            writer.add_scalar(f"grad_cosine/block_{block:02d}", sign * 0.02, step)
    writer.close()
    curve, _ = decide_split(noisy, train=None)
    assert not curve["decided"] and curve["split"] == with_split(noisy, curve).graft.split == 5, (
        "a probe that cannot tell keeps graft.split"
    )
    with pytest.raises(UserError, match="has no grad_cosine/block_NN scalars"):
        read_cosines(tmp_path / "run")
    with pytest.raises(UserError, match="graft.rule = 'auto' must be auto only with graft.init"):
        load_config(None, ["graft.rule=auto"])


def test_weight_errors_name_the_source_as_its_caller_knows_it(tmp_path):
    """Grafting says graft.init, evaluation says encoder: both read through pretrain.core.weights."""
    from pretrain.evaluation.features import encoder_from

    bad = tmp_path / "start.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"^graft.init: .*start.pth is not a readable PyTorch checkpoint"):
        grafted_objective(load_config(None, ["method=mocov3", *TINY, f"graft.init={bad}"]))
    with pytest.raises(UserError, match=r"^encoder: .*start.pth is not a readable PyTorch checkpoint"):
        encoder_from(bad, "vit_tiny", 32, 8)
    with pytest.raises(UserError, match=r"^encoder: .*nowhere does not exist"):
        encoder_from(tmp_path / "nowhere", "vit_tiny", 32, 8)

"""The trainer's pieces in one process: config, parameter groups, schedule, MAE, MoCo v3, views."""

import math

import pytest
import torch

from pretrain.config import load_config
from pretrain.core.errors import UserError
from pretrain.data.views import IMAGENET_MEAN, normalize
from pretrain.graft.param_groups import format_param_groups, layer_id, objective_param_groups, param_groups
from pretrain.graft.start_weights import grafted_objective
from pretrain.models import patchify, unpatchify
from pretrain.training.schedules import cosine_lr_factor
from tests.conftest import REPO, TINY, run_cli, write_file


def tiny(method, *extra):
    torch.manual_seed(0)
    return grafted_objective(load_config(None, [f"method={method}", *TINY, *extra]))


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.arhc=vit_tiny", "unknown config key model.arhc"),
        ("optim.epochs=many", "config key optim.epochs must be float"),
        ("mae.mask_ratio=1.0", "config key mae.mask_ratio = 1.0 must be between 0 and 1"),
        ("data.img_size=30", "must be a multiple of the patch size 16"),
        ("method=swav", "config key method = 'swav' must be one of"),
        ("optim.warmup_epochs=900", "must be between 0 and optim.epochs"),
        (
            "method=simmim simmim.mask_patch_size=24",
            "simmim.mask_patch_size = 24 must be a multiple of the patch size 16",
        ),
    ],
)
def test_bad_config_is_a_named_error(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, override.split())


def test_config_file_errors_name_the_file(tmp_path):
    path = write_file(
        tmp_path / "run.yaml", b"optim:\n  base_lr: 1e-4\n  betas: [0.9, 0.95]\n  weight_dcay: 0.1\n"
    )
    with pytest.raises(UserError, match=f"{path}: unknown config key optim.weight_dcay"):
        load_config(path)
    assert load_config(REPO / "configs" / "demo.yaml", ["optim.base_lr=1e-4"]).optim.base_lr == 1e-4


@pytest.mark.parametrize("name", sorted(path.stem for path in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    config = load_config(REPO / "configs" / f"{name}.yaml")
    assert (REPO / config.deepspeed.config).is_file()


def test_cli_rejects_bad_config_before_work():
    result = run_cli("pretrain.train", "--config", REPO / "configs" / "demo.yaml", "optim.base_lr=-1")
    assert result.returncode == 2 and "optim.base_lr" in result.stderr and "Traceback" not in result.stderr


def test_layer_ids():
    assert [
        layer_id(n, 12)
        for n in (
            "encoder.cls_token",
            "encoder.pos_embed",
            "encoder.patch_embed.proj.weight",
            "encoder.blocks.0.attn.qkv.weight",
            "encoder.blocks.11.mlp.fc2.bias",
            "encoder.norm.weight",
            "decoder.blocks.0.attn.qkv.weight",
            "decoder.mask_token",
            "projector.0.weight",
        )
    ] == [0, 0, 0, 1, 12, 13, 13, 13, 13]


def test_param_groups_decay_rules_and_frozen_parameters():
    objective = tiny("mocov3")
    groups = param_groups(objective, 12, 0.1)
    assert [(g["lr_scale"], g["weight_decay"]) for g in groups] == [(1.0, 0.0), (1.0, 0.1)]
    no_decay = set(groups[0]["names"])
    assert {
        "encoder.cls_token",
        "encoder.blocks.0.norm1.weight",
        "encoder.blocks.0.attn.qkv.bias",
    } <= no_decay
    assert "encoder.blocks.0.attn.qkv.weight" in groups[1]["names"]
    every = {n for g in groups for n in g["names"]}
    assert "encoder.patch_embed.proj.weight" not in every and "encoder.pos_embed" not in every  # frozen
    trainable = {n for n, p in objective.named_parameters() if p.requires_grad}
    assert every == trainable


def test_layer_decay_groups_and_printout():
    config = load_config(None, ["method=mae", *TINY, "optim.layer_decay=0.5"])
    groups = objective_param_groups(grafted_objective(config), config)
    scales = {g["layer_ids"][0]: g["lr_scale"] for g in groups}
    assert scales[13] == 1.0 and scales[12] == 0.5 and scales[0] == 0.5**13
    table = format_param_groups(groups).splitlines()
    assert table[0].split() == ["group", "layer", "ids", "lr_scale", "weight_decay", "params", "tensors"]
    assert len(table) == len(groups) + 1


def test_print_param_groups_command():
    result = run_cli("pretrain.train", "--config", REPO / "configs" / "demo.yaml", "--print-param-groups")
    assert result.returncode == 0, result.stderr
    rows = result.stdout.strip().splitlines()
    rows = rows[next(i for i, row in enumerate(rows) if row.split()[:1] == ["group"]) :]
    assert rows[1].split()[:4] == ["0", "0-13", "1", "0"] and rows[2].split()[:4] == [
        "1",
        "0-13",
        "1",
        "0.05",
    ]


def test_cosine_schedule():
    assert cosine_lr_factor(0, 10, 110) == 0 and cosine_lr_factor(5, 10, 110) == 0.5
    assert cosine_lr_factor(10, 10, 110) == 1 and math.isclose(cosine_lr_factor(60, 10, 110), 0.5)
    assert math.isclose(cosine_lr_factor(110, 10, 110, min_ratio=0.1), 0.1)


def test_patchify_round_trip():
    images = torch.randn(2, 3, 32, 32)
    patches = patchify(images, 8)
    assert patches.shape == (2, 16, 192) and torch.equal(
        patches[0, 1], images[0, :, :8, 8:16].permute(1, 2, 0).flatten()
    )
    assert torch.equal(unpatchify(patches, 8), images)


def test_mae_encoder_sees_only_visible_patches_and_scores_masked_ones():
    mae = tiny("mae")
    images = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    latent, mask, _ = mae.forward_encoder(images)
    assert latent.shape == (4, 1 + 4, 192) and mask.sum(1).tolist() == [12.0] * 4
    assert not torch.equal(mask[0], mask[1]), "each sample gets its own random mask"
    masked_pixels = unpatchify(mask[..., None].expand(-1, -1, 192), 8)
    changed = images + masked_pixels * torch.randn_like(images)  # alter only the masked patches
    torch.manual_seed(1)
    latent_changed, mask_changed, _ = mae.forward_encoder(changed)
    assert torch.equal(mask_changed, mask) and torch.allclose(latent_changed, latent, atol=1e-6)
    losses = []
    for batch in (images, changed):
        torch.manual_seed(1)
        losses.append(mae(batch)["loss"].item())
    assert losses[0] != losses[1], "the masked patches are the targets"
    assert torch.allclose(mae.target(images).mean(-1), torch.zeros(4, 16), atol=1e-5)  # norm_pix_loss


def test_mae_reconstruction_grid_shows_the_input_its_visible_patches_and_the_reconstruction():
    """Rows: the input; the input with its masked patches blanked (the mean colour, 0 once normalized);
    the visible patches pasted over the reconstruction. All in [0, 1], as TensorBoard shows them."""
    mae = tiny("mae")
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(0)
    grid = mae.images_to_log(normalize(pixels), count=2)
    assert grid.shape == (6, 3, 32, 32) and grid.min() >= 0 and grid.max() <= 1
    original, masked, pasted = (patchify(rows, 8) for rows in grid.split(2))
    assert torch.allclose(original, patchify(pixels.float() / 255, 8), atol=1e-5)
    blank = patchify(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).expand(2, 3, 32, 32), 8)
    hidden = (masked - blank).abs().amax(-1) < 1e-5
    assert hidden.sum(1).tolist() == [12, 12], "75 % of the 16 patches of each image are masked"
    assert torch.allclose(masked[~hidden], original[~hidden], atol=1e-5)
    assert torch.allclose(pasted[~hidden], original[~hidden], atol=1e-5), "visible patches pasted back"
    assert (pasted[hidden] - original[hidden]).abs().mean() > 0.05, "masked patches: the reconstruction"


def test_mocov3_loss_and_momentum_update():
    moco = tiny("mocov3")
    views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)]
    out = moco(views)
    assert out["loss"].requires_grad and 0 < out["loss"].item() < 2 * 2 * 0.2 * math.log(8) + 1
    assert not any(name.startswith("target") for name in dict(moco.named_modules())), (
        "the momentum branch stays outside the engine"
    )
    targets = lambda: [p for name in ("encoder", "projector") for p in moco.target.branch[name].parameters()]
    online = [*moco.encoder.parameters(), *moco.projector.parameters()]
    before = [p.clone() for p in targets()]
    with torch.no_grad():
        for p in online:
            p.add_(1.0)
    moco.after_step(1, 100)
    m = 1 - 0.01 * (1 + math.cos(math.pi / 100)) / 2
    assert math.isclose(moco.target.momentum, m)
    for old, new, current in zip(before, targets(), online):
        assert torch.allclose(new, m * old + (1 - m) * current)
    moco.after_step(100, 100)
    assert moco.target.momentum == 1.0


def test_frozen_patch_embedding_gets_no_gradient():
    moco = tiny("mocov3")
    moco([torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)])["loss"].backward()
    assert moco.encoder.patch_embed.proj.weight.grad is None
    assert moco.encoder.blocks[0].attn.qkv.weight.grad is not None


def test_block_checkpointing_keeps_names_and_gradients():
    plain, checkpointed = tiny("mae"), tiny("mae", "model.grad_checkpointing=true")
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in checkpointed.named_parameters()]
    images = torch.randn(2, 3, 32, 32)
    for model in (plain, checkpointed):
        torch.manual_seed(3)
        model(images)["loss"].backward()
    assert torch.allclose(
        plain.encoder.blocks[0].attn.qkv.weight.grad,
        checkpointed.encoder.blocks[0].attn.qkv.weight.grad,
        atol=1e-6,
    )


def test_resuming_accepts_keys_added_to_the_config_later():
    from pretrain.config import to_dict
    from pretrain.training.resume import check_resumable

    config = load_config(None, TINY)
    saved = to_dict(config)
    del saved["graft"]  # a checkpoint from before the graft section existed
    check_resumable({"world_size": 2, "config": saved}, config, 2)
    with pytest.raises(UserError, match="graft.rule: 'none' -> 'list'"):
        check_resumable({"world_size": 2, "config": saved}, load_config(None, [*TINY, "graft.rule=list"]), 2)


@pytest.mark.parametrize(
    "method, ignored, compared",
    [
        ("mae", "simclr.temperature=0.5", "mae.mask_ratio=0.6"),
        ("mocov3", "mae.mask_ratio=0.6", "moco.temperature=0.1"),
        ("hybrid", "byol.momentum=0.9", "moco.temperature=0.1"),  # hybrid reads mae, moco and hybrid
        ("linprobe", "moco.temperature=0.1", "finetune.pool=token"),  # linprobe reads finetune's keys
    ],
)
def test_resuming_compares_the_shared_sections_and_the_methods_own(method, ignored, compared):
    """Another method's section may differ (a default changed since the checkpoint); the run's method's
    sections, the shared ones and the method itself may not."""
    from pretrain.config import to_dict
    from pretrain.training.resume import check_resumable

    config = load_config(None, [*TINY, f"method={method}"])
    saved = {"world_size": 2, "config": to_dict(load_config(None, [*TINY, f"method={method}", ignored]))}
    check_resumable(saved, config, 2)
    key = compared.split("=")[0]
    saved = {"world_size": 2, "config": to_dict(load_config(None, [*TINY, f"method={method}", compared]))}
    with pytest.raises(UserError, match=f"the config differs from the checkpoint's \\({key}: "):
        check_resumable(saved, config, 2)
    other_method = "simclr" if method != "simclr" else "mae"
    for shared in ("optim.base_lr=0.5", "data.img_size=64", f"method={other_method}"):
        saved = {"world_size": 2, "config": to_dict(load_config(None, [*TINY, f"method={method}", shared]))}
        with pytest.raises(UserError, match=shared.split("=")[0]):
            check_resumable(saved, config, 2)

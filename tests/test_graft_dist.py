"""Layer-grafted MoCo v3 for real: 2 processes, ZeRO-2, started from an MAE run directory."""

import json
import math

import pytest
import torch

from pretrain.config import load_config
from pretrain.core.checkpoint import tag_of
from pretrain.core.weights import consolidated_state_dict
from pretrain.graft.auto_split import choose_split, read_cosines
from pretrain.graft.param_groups import graft_rule
from pretrain.training.schedules import cosine_lr_factor
from tests.conftest import pretrain, scalar_values, tensorboard

pytestmark = pytest.mark.dist
STEPS = 3
RULES = {
    "list": [],
    "split": ["graft.split=4", "graft.l1_weight=1e-3", "graft.l1_to_layer=4"],
    "ramp": ["graft.split=6", "graft.ramp_width=2"],
    "freeze": ["graft.split=6"],
    "auto": ["graft.probe_steps=4", "graft.probe_every=1"],
}


@pytest.fixture(scope="module")
def manifest(demo_shards):
    return demo_shards / "train.json"


@pytest.fixture(scope="module")
def mae_run(manifest, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mae_start")
    result = pretrain(
        run_dir,
        manifest,
        "method=mae",
        "deepspeed.config=ds_configs/zero1.json",
        "deepspeed.precision=fp32",
        "run.max_steps=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def graft_run(manifest, mae_run, tmp_path_factory):
    runs = {}

    def run(rule):
        if rule not in runs:
            run_dir = tmp_path_factory.mktemp(f"graft_{rule}")
            overrides = [
                "method=mocov3",
                "deepspeed.config=ds_configs/zero2.json",
                "deepspeed.precision=fp32",
                f"run.max_steps={STEPS}",
                f"graft.init={mae_run}",
                f"graft.rule={rule}",
                *RULES[rule],
            ]
            result = pretrain(run_dir, manifest, *overrides)
            assert result.returncode == 0, result.stderr[-3000:]
            runs[rule] = (run_dir, load_config(run_dir / "config.yaml"))
        return runs[rule]

    return run


def encoder_weights(run_dir, step):
    state = consolidated_state_dict(run_dir / "ckpt", tag_of(step))
    return {name[len("encoder.") :]: tensor for name, tensor in state.items() if name.startswith("encoder.")}


@pytest.mark.parametrize("rule", list(RULES))
def test_every_layer_group_gets_the_schedule_times_its_scale(graft_run, rule):
    run_dir, config = graft_run(rule)
    scale_of = graft_rule(config.graft, 12)
    base = config.optim.base_lr * 32 / 256
    steps_per_epoch = 1438 // 32
    warmup, total = (
        round(config.optim.warmup_epochs * steps_per_epoch),
        round(config.optim.epochs * steps_per_epoch),
    )
    events = tensorboard(run_dir)
    tags = [tag for tag in events.Tags()["scalars"] if tag.startswith("lr/layers_")]
    spans = {tag: tag[len("lr/layers_") :] for tag in tags}
    assert len(tags) == len({scale_of(layer) for layer in range(14)} - {0.0})
    for tag in tags:
        first_layer = int(spans[tag].replace(",", "-").split("-")[0])
        for event in events.Scalars(tag):
            expected = base * cosine_lr_factor(event.step, warmup, total) * scale_of(first_layer)
            assert math.isclose(event.value, expected, rel_tol=1e-6), (tag, event.step, event.value, expected)


def test_grafted_weights_start_from_mae_and_lower_layers_move_less(graft_run, mae_run):
    run_dir, _ = graft_run("list")
    start, end = encoder_weights(mae_run, 2), encoder_weights(run_dir, STEPS)

    def moved(prefixes):
        names = [n for n in start if n.startswith(prefixes) and "weight" in n]
        return sum((end[n] - start[n]).norm() / start[n].norm() for n in names) / len(names)

    lower, upper = (
        moved(tuple(f"blocks.{i}." for i in range(8))),
        moved(tuple(f"blocks.{i}." for i in range(8, 12))),
    )
    assert 0 < lower < upper / 3, (lower, upper)
    # MAE's, frozen (MoCo v3)
    assert torch.equal(start["patch_embed.proj.weight"], end["patch_embed.proj.weight"])


def test_freeze_keeps_the_lower_layers_exactly(graft_run, mae_run):
    run_dir, _ = graft_run("freeze")
    start, end = encoder_weights(mae_run, 2), encoder_weights(run_dir, STEPS)
    for name in start:
        lower = name.startswith(("cls_token", "pos_embed", "patch_embed")) or (
            name.startswith("blocks.") and int(name.split(".")[1]) < 6
        )
        assert torch.equal(start[name], end[name]) == lower, name


def test_l1_pull_is_logged(graft_run):
    run_dir, _ = graft_run("split")
    pulls = scalar_values(run_dir, "loss_l1_pull")
    assert len(pulls) == STEPS and pulls[0] == 0 < pulls[-1]


def test_auto_rule_probes_the_gradient_cosine_and_splits_where_it_turns(graft_run):
    """The probe is a real hybrid run in RUN_DIR/graft_probe; the split is the one its logged curve gives."""
    run_dir, config = graft_run("auto")
    probe = run_dir / "graft_probe"
    assert load_config(probe / "config.yaml").method == "hybrid"
    assert len(scalar_values(probe, "grad_cosine/block_00")) == 4
    cosines, steps, errors = read_cosines(probe)
    # Measured at 0, 1, 2, 3.
    assert len(cosines) == 12 and steps == [2, 3] and all(-1 <= c <= 1 for c in cosines)
    chosen = json.loads((run_dir / "graft_auto.json").read_text())
    expected = choose_split(cosines, 0.0, errors, config.graft.auto_confidence)
    assert chosen["split"] == config.graft.split and chosen["cosines"] == cosines
    assert expected is None or chosen["split"] == expected, (
        "decided: the split the curve gives; else graft.split"
    )
    assert chosen["decided"] == (expected is not None) and chosen["errors"] == errors
    events = tensorboard(run_dir)
    assert scalar_values(run_dir, "graft/auto_split") == [config.graft.split]
    assert events.Images("graft/probe_cosines")[0].width == 320

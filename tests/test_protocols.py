"""The papers' evaluation protocols: MAE's and MoCo v3's linear probes and MAE's whole fine-tuning
recipe, as units against the official code's arithmetic and as real 2-process runs on the demo shards."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from pretrain.config import load_config
from pretrain.core.errors import UserError
from pretrain.core.weights import consolidated_state_dict
from pretrain.data.views import TimmRandAugment, finetune_view
from pretrain.graft.param_groups import objective_param_groups
from pretrain.graft.start_weights import grafted_objective
from pretrain.methods.finetune import FineTune
from pretrain.methods.linprobe import LinearProbe
from pretrain.train import main as train_main
from pretrain.training.optimizers import make_optimizer
from tests.conftest import REPO, TRAIN_ENV, run_cli, tensorboard
from tests.test_eval import exported_encoder

TINY_CLASSIFIER = ["finetune.num_classes=10", "model.arch=vit_tiny", "data.img_size=32", "model.patch_size=8"]


def maes_lars_step(params, state, lr, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
    """One step of MAE's util/lars.py LARS, written out: parameters of 2+ dims are adapted by the trust
    ratio, the others (BatchNorm, biases) are not."""
    for p in params:
        dp = p.grad
        if p.ndim > 1:
            dp = dp.add(p, alpha=weight_decay)
            param_norm, update_norm = torch.norm(p), torch.norm(dp)
            one = torch.ones_like(param_norm)
            q = torch.where(
                param_norm > 0.0,
                torch.where(update_norm > 0, trust_coefficient * param_norm / update_norm, one),
                one,
            )
            dp = dp.mul(q)
        mu = state.setdefault(id(p), torch.zeros_like(p))
        mu.mul_(momentum).add_(dp)
        p.data.add_(mu, alpha=-lr)


def test_lars_is_maes_lars_and_leaves_biases_unadapted():
    """timm's Lars through make_optimizer == MAE's LARS on the MAE probe's head (BatchNorm without affine,
    then Linear), step for step; the weight's group adapts, the bias's does not."""
    config = load_config(REPO / "configs" / "linprobe_mae_vit_b.yaml", TINY_CLASSIFIER)
    probe = grafted_objective(config)
    groups = objective_param_groups(probe, config)
    assert [n for g in groups for n in g["names"]] == ["encoder.head.1.weight", "encoder.head.1.bias"]
    optimizer = make_optimizer(
        [{"params": g["params"], "weight_decay": g["weight_decay"], "lr_scale": 1.0} for g in groups],
        6.4,
        config.optim,
    )
    assert isinstance(optimizer, timm.optim.Lars)
    assert [(len(g["params"]), g["params"][0].ndim, g["always_adapt"]) for g in optimizer.param_groups] == [
        (1, 2, True),
        (1, 1, False),
    ]
    torch.manual_seed(0)
    head = probe.encoder.head
    with torch.no_grad():
        head[1].bias.normal_()  # a non-zero bias: the unadapted update is visible
    reference = [p.detach().clone().requires_grad_(True) for p in (head[1].weight, head[1].bias)]
    features, labels, state = torch.randn(64, 192), torch.randint(0, 10, (64,)), {}
    for _ in range(5):
        normed = nn.functional.batch_norm(features, None, None, training=True, eps=1e-6)
        optimizer.zero_grad()
        nn.functional.cross_entropy(head(features), labels).backward()
        for p in reference:
            p.grad = None
        nn.functional.cross_entropy(normed @ reference[0].T + reference[1], labels).backward()
        optimizer.step()
        with torch.no_grad():
            maes_lars_step(reference, state, 6.4)
    assert torch.allclose(head[1].weight, reference[0], atol=1e-6, rtol=1e-5)
    assert torch.allclose(head[1].bias, reference[1], atol=1e-6, rtol=1e-5)


def test_mixup_and_cutmix_give_distributions_over_the_mirrored_pairs():
    """timm's Mixup in batch mode pairs image i with image n-1-i: mixup blends the pixels by lam, cutmix
    pastes a box; the targets are distributions (label smoothing included) that weigh the two labels by
    the mixed amounts."""
    images = torch.randn(8, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0)):
        model = FineTune(
            dict(arch="vit_tiny", img_size=32, patch_size=8, num_classes=10, pool="mean"),
            label_smoothing=0.1,
            mixup=mixup,
            cutmix=cutmix,
        )
        random.seed(3), np.random.seed(3)
        mixed, targets = model.augment(images.clone(), labels)  # timm mixes in place
        assert targets.shape == (8, 10) and torch.allclose(targets.sum(dim=1), torch.ones(8))
        off = 0.1 / 10
        lam = (targets[0, 0] - off) / (1 - 0.1)  # the share of the image's own label
        assert 0.05 < lam < 0.95
        for i in range(8):
            j = 7 - i
            assert torch.isclose(targets[i, labels[i]], lam * 0.9 + off, atol=1e-6)
            assert torch.isclose(targets[i, labels[j]], (1 - lam) * 0.9 + off, atol=1e-6)
            if mixup:
                assert torch.allclose(mixed[i], lam * images[i] + (1 - lam) * images[j], atol=1e-5)
            else:
                own = (mixed[i] == images[i]).all(dim=0)
                assert ((mixed[i] == images[j]).all(dim=0) | own).all()  # every pixel from one of the pair
                assert torch.isclose(own.float().mean(), lam, atol=1e-6)  # lam = the area kept (correct_lam)


def test_random_erasing_and_rand_augment_are_timms_and_seeded():
    model = FineTune(
        dict(arch="vit_tiny", img_size=32, patch_size=8, num_classes=10, pool="mean"), random_erasing=1.0
    )
    images = torch.zeros(4, 3, 32, 32)
    random.seed(0), torch.manual_seed(0)
    erased, _ = model.augment(images, torch.arange(4))
    assert all((erased[i] != 0).any() for i in range(4)) and (erased == 0).any()  # one box of noise per image
    assert (images == 0).all()  # the batch itself is left alone
    view = finetune_view(32, rand_augment="rand-m9-mstd0.5-inc1")
    assert isinstance(view.transforms[-1], TimmRandAugment)
    ops = view.transforms[-1].augment
    assert isinstance(ops, timm.data.auto_augment.RandAugment) and ops.num_layers == 2
    assert {op.name for op in ops.ops} >= {"AutoContrast", "Equalize", "Rotate", "SolarizeIncreasing"}  # inc1
    assert all(op.magnitude == 9 and op.magnitude_std == 0.5 for op in ops.ops)
    image = torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8)
    outputs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outputs.append(view(image))
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])


@pytest.mark.parametrize("protocol", ["mae", "mocov3"])
def test_linear_probe_trains_the_head_alone_and_its_folded_head_is_a_timm_classifier(protocol):
    config = load_config(REPO / "configs" / f"linprobe_{protocol}_vit_b.yaml", TINY_CLASSIFIER)
    probe = grafted_objective(config)
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == (
        ["encoder.head.1.weight", "encoder.head.1.bias"]
        if protocol == "mae"
        else ["encoder.head.weight", "encoder.head.bias"]
    )
    if protocol == "mae":
        norm = probe.encoder.head[0]
        assert isinstance(norm, nn.BatchNorm1d) and not norm.affine and norm.eps == 1e-6
    probe.train()
    assert not probe.encoder.blocks[0].training and probe.encoder.head.training
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in probe.parameters() if p.requires_grad], lr=0.5)
    images, labels = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    for _ in range(3):
        optimizer.zero_grad()
        probe(images, labels)["loss"].backward()
        optimizer.step()
    changed = {k for k in before if not torch.equal(before[k], probe.state_dict()[k])}
    assert changed and all(k.startswith("encoder.head.") for k in changed)
    probe.eval()
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, global_pool="token", img_size=32, patch_size=8
    )
    state = {k[len("encoder.") :]: v for k, v in probe.state_dict().items() if k.startswith("encoder.")}
    model.load_state_dict(LinearProbe.classifier_state(state), strict=True)
    assert torch.allclose(model.eval()(images), probe.logits(images), atol=1e-5)


def test_protocol_configs_carry_the_papers_values_and_refuse_what_breaks_them(capsys):
    mae = load_config(REPO / "configs" / "linprobe_mae_vit_b.yaml")
    d = mae.deepspeed
    assert (
        mae.optim.optimizer,
        mae.optim.base_lr,
        mae.optim.weight_decay,
        mae.optim.epochs,
        mae.optim.warmup_epochs,
        d.micro_batch_size * d.grad_accum * 8,
        mae.finetune.interpolation,
    ) == ("lars", 0.1, 0.0, 90, 10, 16384, "bicubic")
    moco = load_config(REPO / "configs" / "linprobe_mocov3_vit_b.yaml")
    assert (
        moco.optim.optimizer,
        moco.optim.momentum,
        moco.optim.base_lr,
        moco.optim.weight_decay,
        moco.optim.epochs,
        moco.optim.warmup_epochs,
        moco.deepspeed.micro_batch_size * 8,
        moco.finetune.interpolation,
    ) == ("sgd", 0.9, 3.0, 0.0, 90, 0, 1024, "bilinear")
    recipes = {
        name: load_config(REPO / "configs" / f"{name}.yaml")
        for name in ("finetune_vit_b", "finetune_vit_l", "finetune_graft_vit_b", "finetune_graft_vit_l")
    }
    assert {
        name: (c.optim.base_lr, c.optim.layer_decay, c.model.drop_path, c.optim.epochs)
        for name, c in recipes.items()
    } == {
        "finetune_vit_b": (5e-4, 0.65, 0.1, 100),
        "finetune_vit_l": (1e-3, 0.75, 0.2, 50),
        "finetune_graft_vit_b": (5e-4, 0.6, 0.1, 100),
        "finetune_graft_vit_l": (5e-4, 0.8, 0.2, 50),
    }
    for c in recipes.values():
        f = c.finetune
        assert (
            f.mixup,
            f.cutmix,
            f.mix_switch_prob,
            f.label_smoothing,
            f.random_erasing,
            f.rand_augment,
            f.pool,
            c.optim.weight_decay,
            tuple(c.optim.betas),
            c.optim.warmup_epochs,
        ) == (0.8, 1.0, 0.5, 0.1, 0.25, "rand-m9-mstd0.5-inc1", "mean", 0.05, (0.9, 0.999), 5)
        assert c.deepspeed.micro_batch_size * c.deepspeed.grad_accum * 8 == 1024
    with pytest.raises(UserError, match="deepspeed.micro_batch_size"):
        load_config(REPO / "configs" / "finetune_vit_b.yaml", ["deepspeed.micro_batch_size=3"])
    for name, optimizer, frozen in (
        ("linprobe_mae_vit_l", "lars (momentum 0.9)", "303,301,632"),
        ("linprobe_mocov3_vit_b", "sgd (momentum 0.9)", "85,798,656"),
        ("finetune_graft_vit_b", "adamw (betas (0.9, 0.999))", "0"),
    ):
        assert (
            train_main(
                [
                    "--config",
                    str(REPO / "configs" / f"{name}.yaml"),
                    "--print-param-groups",
                    "finetune.num_classes=1000",
                ]
            )
            == 0
        )
        printed = capsys.readouterr().out
        assert f"optimizer {optimizer}; {frozen} parameters frozen" in printed and "lr_scale" in printed
    with pytest.raises(UserError, match="optim.optimizer"):
        load_config(None, ["optim.optimizer=adam"])
    with pytest.raises(UserError, match="finetune.rand_augment"):
        load_config(None, ["finetune.rand_augment=9"])


def lg_eval(protocol, encoder, shards, run_dir, *overrides, linear=None, config=None):
    extra = ["--protocol", linear] if linear else []
    config = config or REPO / "configs" / (f"linprobe_{linear}_demo.yaml" if linear else "finetune_demo.yaml")
    return run_cli(
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "pretrain.eval",
        protocol,
        encoder,
        *extra,
        "--train",
        shards / "train.json",
        "--val",
        shards / "val.json",
        "--config",
        config,
        "deepspeed.micro_batch_size=16",
        "run.log_every=1",
        f"run.dir={run_dir}",
        *overrides,
        env=TRAIN_ENV,
        timeout=600,
    )


@pytest.mark.dist
def test_mae_linear_probe_on_two_processes_keeps_the_encoder_bit_identical(demo_shards, tmp_path):
    """The real engine, 2 processes: a few LARS steps with val measured every 2 steps; the frozen weights
    in the checkpoint equal the encoder file's bit for bit, only the head and its BatchNorm statistics
    moved."""
    encoder = exported_encoder(tmp_path / "encoder.pth")
    result = lg_eval(
        "linear",
        encoder,
        demo_shards,
        tmp_path / "lp",
        "run.max_steps=8",
        "finetune.eval_every=0.09",
        "--out",
        tmp_path / "result.json",
        linear="mae",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reported = json.loads((tmp_path / "lp" / "eval_linprobe.json").read_text())
    assert reported == json.loads((tmp_path / "result.json").read_text())
    assert (reported["protocol"], reported["method"], reported["steps"], reported["val_samples"]) == (
        "mae",
        "linprobe",
        8,
        359,
    )
    assert reported["frozen_unchanged"] is True
    # The periodic measurement of the live model and the final one of classifier.pth (its BatchNorm folded)
    # agree (every rank measures rank 0's statistics: test_every_rank_measures_rank_0s_batchnorm_statistics).
    assert [r["step"] for r in reported["history"]] == [4, 8] and reported["history"][-1]["top1"] == reported[
        "top1"
    ]
    assert reported["best"] == max(reported["history"], key=lambda r: r["top1"])
    events = tensorboard(tmp_path / "lp")
    assert [e.step for e in events.Scalars("eval/val_top1")] == [4, 8]
    assert "val top-1" in result.stderr and "best" in result.stderr
    trained = consolidated_state_dict(tmp_path / "lp" / "ckpt", "step000000008")
    start = torch.load(encoder, weights_only=True)
    assert all(torch.equal(trained[f"encoder.{k}"], v) for k, v in start.items())
    moved = {k for k in trained if k.startswith("encoder.head.")}
    assert moved == {
        "encoder.head.0.running_mean",
        "encoder.head.0.running_var",
        "encoder.head.0.num_batches_tracked",
        "encoder.head.1.weight",
        "encoder.head.1.bias",
    }
    for name in ("classifier.pth", "classifier_best.pth"):
        model = timm.create_model(**json.loads((tmp_path / "lp" / "classifier.json").read_text())["timm"])
        model.load_state_dict(torch.load(tmp_path / "lp" / name, weights_only=True), strict=True)


@pytest.mark.slow
def test_mocov3_linear_probe_resumes_exactly(demo_shards, tmp_path):
    """SGD with momentum, 2 processes: 6 steps straight == 3 steps, stop, resume to 6 (weights, momentum
    buffers and the val history)."""
    encoder = exported_encoder(tmp_path / "encoder.pth")
    common = ["run.save_every=3", "finetune.eval_every=0.05"]
    straight = lg_eval(
        "linear", encoder, demo_shards, tmp_path / "straight", *common, "run.max_steps=6", linear="mocov3"
    )
    first = lg_eval(
        "linear", encoder, demo_shards, tmp_path / "split", *common, "run.max_steps=3", linear="mocov3"
    )
    second = lg_eval(
        "linear", encoder, demo_shards, tmp_path / "split", *common, "run.max_steps=6", linear="mocov3"
    )
    assert straight.returncode == first.returncode == second.returncode == 0, second.stderr[-3000:]
    assert "resumed" in second.stderr
    expected, actual = (
        torch.load(run / "ckpt" / "step000000006" / "mp_rank_00_model_states.pt", weights_only=False)
        for run in (tmp_path / "straight", tmp_path / "split")
    )
    assert all(torch.equal(expected["module"][k], actual["module"][k]) for k in expected["module"])
    momentum = [s["momentum_buffer"] for s in expected["optimizer"]["state"].values()]
    assert momentum and all(
        torch.equal(a, s["momentum_buffer"]) for a, s in zip(momentum, actual["optimizer"]["state"].values())
    )
    histories = [
        json.loads((run / "eval_linprobe.json").read_text())["history"]
        for run in (tmp_path / "straight", tmp_path / "split")
    ]
    assert histories[0] == histories[1] and [r["step"] for r in histories[0]] == [2, 4, 6]


@pytest.mark.slow
def test_finetune_with_maes_whole_recipe_resumes_exactly_with_its_ema(demo_shards, tmp_path):
    """RandAugment, RandomErasing, Mixup / CutMix and the EMA on, 2 processes: 4 steps straight == 2,
    stop, resume to 4 — the mixing draws from NumPy and Python, seeded per step — and the EMA is
    measured beside the weights."""
    encoder = exported_encoder(tmp_path / "encoder.pth")
    common = [
        "run.save_every=2",
        "finetune.rand_augment=rand-m9-mstd0.5-inc1",
        "finetune.random_erasing=0.25",
        "finetune.mixup=0.8",
        "finetune.cutmix=1.0",
        "finetune.flip=true",
        "finetune.ema_decay=0.9",
        "finetune.eval_every=0.05",
    ]
    straight = lg_eval("finetune", encoder, demo_shards, tmp_path / "straight", *common, "run.max_steps=4")
    first = lg_eval("finetune", encoder, demo_shards, tmp_path / "split", *common, "run.max_steps=2")
    second = lg_eval("finetune", encoder, demo_shards, tmp_path / "split", *common, "run.max_steps=4")
    assert straight.returncode == first.returncode == second.returncode == 0, second.stderr[-3000:]
    expected, actual = (
        torch.load(run / "ckpt" / "step000000004" / "mp_rank_00_model_states.pt", weights_only=False)
        for run in (tmp_path / "straight", tmp_path / "split")
    )
    assert all(torch.equal(expected["module"][k], actual["module"][k]) for k in expected["module"])
    ema = expected["objective"]["ema"]
    assert ema and all(torch.equal(v, actual["objective"]["ema"][k]) for k, v in ema.items())
    assert not torch.equal(ema["head.weight"], expected["module"]["encoder.head.weight"])
    reported = json.loads((tmp_path / "split" / "eval_finetune.json").read_text())
    assert reported["history"] and all("top1_ema" in r for r in reported["history"])
    assert (
        reported["history"]
        == json.loads((tmp_path / "straight" / "eval_finetune.json").read_text())["history"]
    )


def _measure_with_rank_statistics(rank, init_file, val, results):
    """One rank of test_every_rank_measures_rank_0s_batchnorm_statistics."""
    import torch.distributed as dist

    from pretrain.evaluation.validation import ValMonitor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    config = load_config(
        REPO / "configs" / "linprobe_mae_demo.yaml",
        [
            *TINY_CLASSIFIER,
            f"finetune.val={val}",
            "deepspeed.micro_batch_size=32",
            "data.num_workers=0",
            f"run.dir={Path(init_file).parent}",
        ],
    )
    probe = grafted_objective(config).eval()
    norm = probe.encoder.head[0]
    with torch.no_grad():  # each rank's own statistics, as per-rank batches leave them
        norm.running_mean.copy_(torch.randn(192, generator=torch.Generator().manual_seed(rank)))
        norm.running_var.fill_(0.01 + rank)
        # The same, informative.
        probe.encoder.head[1].weight.normal_(generator=torch.Generator().manual_seed(0))
    measured = ValMonitor(config, probe, torch.device("cpu")).measure(1, 0.0)["top1"]
    from pretrain.evaluation.validation import top1_counts

    if rank == 0:  # rank 0's model alone, measured on the whole split
        dist.destroy_process_group()
        correct, seen = top1_counts([probe.encoder], val, 32, 32, 0, torch.device("cpu"))
        results.put((measured, round(100 * correct / seen, 2)))
    else:
        results.put((measured, None))
        dist.destroy_process_group()


@pytest.mark.dist
def test_every_rank_measures_rank_0s_batchnorm_statistics(demo_shards, tmp_path):
    """A probe's BatchNorm statistics are each rank's own; the periodic measurement uses rank 0's (the
    checkpoint's) on every rank, so it equals rank 0's model measured alone."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(
            target=_measure_with_rank_statistics,
            args=(rank, tmp_path / "init", demo_shards / "val.json", results),
        )
        for rank in (0, 1)
    ]
    for process in processes:
        process.start()
    try:
        outcomes = [results.get(timeout=120) for _ in processes]
    finally:  # a rank that hangs fails the test and does not outlive it
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    reference = next(alone for _, alone in outcomes if alone is not None)
    assert [measured for measured, _ in outcomes] == [reference, reference]

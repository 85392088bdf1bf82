"""The training loop: a DeepSpeed engine around an `Objective`, fed by the WebDataset loader.

One optimizer step = `grad_accum` micro-batches per rank. Everything random in a step (masking, drop
path) is seeded from (seed, rank, step), and the loader's batches are a function of (seed, epoch, rank,
step), so a run resumed from a checkpoint continues exactly as it would have without the interruption.
The optimizer is torch's AdamW (DeepSpeed's fused/CPU Adam differ by ~1e-6 after a resume) and the
schedule a client LambdaLR, which keeps each group's lr_scale (DeepSpeed's WarmupLR sets every group
to one learning rate).
"""
import json
import logging
import signal
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from data_prep.manifest import Manifest
from pretrain import auto_split, checkpoint
from pretrain.config import Config, dump_config, to_dict
from pretrain.data import make_loader, mix_seed
from pretrain.distributed import rank, world_size
from pretrain.errors import UserError
from pretrain.grad_conflict import plot_cosines
from pretrain.knn_monitor import KNNMonitor
from pretrain.methods import build_objective
from pretrain.monitor import Monitor, memory_bytes
from pretrain.param_groups import format_param_groups, layer_span, objective_param_groups
from pretrain.schedules import cosine_lr_factor
from pretrain.views import normalize

log = logging.getLogger("lg-pretrain")
REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
        "min_loss_scale": 1}
# Settings that may change between a run and its resumption; any other difference is refused.
RESUMABLE_CHANGES = ("run.log_every", "run.image_every", "run.save_every", "run.keep_last", "run.max_steps",
                     "data.num_workers", "data.train", "run.knn_every", "run.knn_pool", "data.knn_train",
                     "data.knn_val", "data.knn_per_class")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint stays `latest`."""


def deepspeed_config(config, world):
    """The effective DeepSpeed config: the JSON file named by the run config, plus batch sizes,
    precision and clipping from the run config (saved as RUN_DIR/ds_config.json)."""
    path = Path(config.deepspeed.config)
    if not path.is_file() and (REPO / path).is_file():
        path = REPO / path
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config key deepspeed.config: {path} does not exist") from None
    except ValueError as error:
        raise UserError(f"{path} is not valid JSON: {error}") from None
    for owned in ("optimizer", "scheduler", "bf16", "fp16", "train_batch_size", "gradient_clipping"):
        if owned in ds:
            raise UserError(f"{path}: remove {owned!r}; the run config sets it (optim.*, deepspeed.*)")
    d = config.deepspeed
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    from deepspeed.accelerator import get_accelerator

    if d.precision == "fp16" and not get_accelerator().is_fp16_supported():
        raise UserError(f"deepspeed.precision=fp16 is not supported by DeepSpeed's {get_accelerator().device_name()} "
                        "accelerator; use bf16 or fp32 here")
    if config.graft.l1_weight > 0 and stage == 3:
        raise UserError("graft.l1_weight needs whole parameters on every rank; use ZeRO stage <= 2 with it")
    if d.precision == "bf16" and stage == 0:
        raise UserError("bf16 with ZeRO stage 0 trains through DeepSpeed's fp16-style optimizer and drifts "
                        "from fp32; use ds_configs/zero1.json or higher for bf16")
    ds.update(train_micro_batch_size_per_gpu=d.micro_batch_size, gradient_accumulation_steps=d.grad_accum,
              train_batch_size=d.micro_batch_size * d.grad_accum * world, gradient_clipping=config.optim.clip_grad,
              steps_per_print=10 ** 12, wall_clock_breakdown=False)
    if d.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif d.precision == "fp16":
        ds["fp16"] = dict(FP16)
    return ds


def check_resumable(saved, config, world):
    if saved["world_size"] != world:
        raise UserError(f"the checkpoint was written by {saved['world_size']} processes and this run has {world}; "
                        "resume with the same world size (ZeRO partitions are per rank)")
    current, before = _flatten(to_dict(config)), _flatten(saved["config"])
    # A key the checkpoint does not know was added to the config later: it changes nothing at its default.
    before = {**{k: v for k, v in _flatten(to_dict(Config())).items() if k not in before}, **before}
    changed = [k for k in sorted(current) if current[k] != before.get(k, current[k]) and k not in RESUMABLE_CHANGES]
    if changed:
        details = ", ".join(f"{k}: {before.get(k)!r} -> {current.get(k)!r}" for k in changed[:6])
        raise UserError(f"the config differs from the checkpoint's ({details}); use a new run.dir to start over")


def _flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def match_batchnorm_statistics(module, dtype):
    """DeepSpeed casts parameters to bf16/fp16 but keeps buffers in fp32, and BatchNorm refuses weights and
    running statistics of different dtypes. The heads' BatchNorms only ever run in training mode, so their
    running statistics are never read: casting them costs nothing."""
    for child in module.modules():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and child.affine and child.track_running_stats:
            child.running_mean.data = child.running_mean.data.to(dtype)
            child.running_var.data = child.running_var.data.to(dtype)


class StopFlag:
    """Set by SIGTERM, SIGUSR1 or SIGUSR2 (Slurm's warning signals; submitit asks for USR2); the loop
    checkpoints and stops. `restore()` puts back the handlers that were there before (submitit's)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.signum, self.received = 0, set()
        self.previous = {signum: signal.signal(signum, self._set) for signum in self.SIGNALS}

    def _set(self, signum, frame):
        self.signum = signum
        self.received.add(signum)

    def reason(self):
        """The signal to report: USR2 (a requeue request) before the others."""
        return signal.SIGUSR2 if signal.SIGUSR2 in self.received else self.signum

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def train(config):
    """Run (or resume) the training that `config` describes. Returns (last step, signal number that
    stopped it or 0)."""
    stop = StopFlag()
    try:
        return _train(config, stop)
    finally:
        stop.restore()


def _train(config, stop):
    deepspeed.init_distributed()
    world, is_main = world_size(), rank() == 0
    run_dir, ckpt_dir = Path(config.run.dir), Path(config.run.dir) / "ckpt"

    auto_curve = None
    if config.graft.rule == "auto":  # decide the split first (may run the probe, a hybrid run of its own)
        auto_curve, signum = auto_split.resolve(config, train)
        if signum:
            return 0, signum

    torch.manual_seed(config.run.seed)  # the same initial weights on every rank, in every run
    objective = build_objective(config)
    groups = objective_param_groups(objective, config)
    d = config.deepspeed
    global_batch = d.micro_batch_size * d.grad_accum * world
    lr = config.optim.base_lr * global_batch / 256
    layers_of_scale = {}  # TensorBoard logs one learning rate per lr_scale, named by its layers
    for g in groups:
        layers_of_scale.setdefault(g["lr_scale"], set()).update(g["layer_ids"])
    optimizer = torch.optim.AdamW(
        [{"params": g["params"], "weight_decay": g["weight_decay"], "lr": lr * g["lr_scale"], "lr_scale": g["lr_scale"],
          "layers": layer_span(sorted(layers_of_scale[g["lr_scale"]]))} for g in groups],
        lr=lr, betas=tuple(config.optim.betas))

    manifest = Manifest.load(config.data.train)
    steps_per_epoch = max(1, manifest.num_samples // global_batch)
    loader = make_loader(manifest, d.micro_batch_size, view=objective.view, img_size=config.data.img_size,
                         mode="resampled", num_workers=config.data.num_workers, seed=config.run.seed,
                         shuffle_buffer=config.data.shuffle_buffer, steps_per_epoch=steps_per_epoch * d.grad_accum,
                         pin_memory=torch.cuda.is_available())
    total_steps = max(1, round(config.optim.epochs * steps_per_epoch))
    warmup_steps = round(config.optim.warmup_epochs * steps_per_epoch)
    min_ratio = config.optim.min_lr / lr
    scheduler = LambdaLR(optimizer, lambda step: cosine_lr_factor(step, warmup_steps, total_steps, min_ratio))

    ds_config = deepspeed_config(config, world)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=objective, optimizer=optimizer,
                                                           lr_scheduler=scheduler, config=ds_config)
    dtype, device = DTYPES[d.precision], engine.device
    match_batchnorm_statistics(objective, dtype)

    state = {"step": 0, "bad_samples": 0}
    if checkpoint.latest_tag(ckpt_dir):
        check_resumable(checkpoint.run_state(ckpt_dir), config, world)
        saved = checkpoint.load(engine, ckpt_dir)
        objective.load_extra_state(saved["objective"])
        state.update(step=saved["step"], bad_samples=saved["bad_samples"])
        if is_main:
            log.info("resumed %s at step %d", ckpt_dir / checkpoint.latest_tag(ckpt_dir), state["step"])
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(config))
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=1))
        log.info("%d processes, global batch %d, lr %.3g, %d steps (%d per epoch, %d warmup)\n%s", world,
                 global_batch, lr, total_steps, steps_per_epoch, warmup_steps, format_param_groups(groups))
    monitor = Monitor(run_dir, is_main, total_steps, global_batch)
    monitor.config(dump_config(config))
    if auto_curve:
        cosines = auto_curve["cosines"]
        monitor.extra(0, {"graft/auto_split": auto_curve["split"],
                          **{f"graft/probe_cosine/block_{i:02d}": c for i, c in enumerate(cosines)}},
                      {"graft/probe_cosines": plot_cosines(cosines, split=auto_curve["split"])})

    def save(step):
        client_state = {"step": step, "bad_samples": state["bad_samples"], "objective": objective.extra_state()}
        run_state = {"step": step, "world_size": world, "steps_per_epoch": steps_per_epoch, "config": to_dict(config)}
        tag = checkpoint.save(engine, ckpt_dir, step, client_state, run_state, config.run.keep_last)
        if is_main:
            log.info("saved checkpoint %s", ckpt_dir / tag)

    knn = KNNMonitor(config, objective.encoder, device, d.micro_batch_size) if config.run.knn_every else None

    def measure_knn(step):
        top1 = knn.measure()
        if is_main:
            monitor.extra(step, {"eval/knn_top1": top1}, {})
            log.info("step %d  kNN top-1 %.2f %% (%s)", step, top1, config.data.knn_val)

    last_step = min(total_steps, config.run.max_steps or total_steps)
    batches, step, sums, stopped_by = None, state["step"], {}, 0
    if knn and step == 0:
        measure_knn(0)  # the untrained encoder: where the curve starts
    engine.train()
    while step < last_step:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        if batches is None or step_in_epoch == 0:
            batches = loader.epoch(epoch, step_in_epoch * d.grad_accum)
        for micro in range(d.grad_accum):
            batch = next(batches)
            images = batch["images"]
            images = [normalize(v, device).to(dtype) for v in images] if isinstance(images, list) \
                else normalize(images, device).to(dtype)
            if micro == 0 and config.run.diagnostics_every and step % config.run.diagnostics_every == 0:
                torch.manual_seed(mix_seed(config.run.seed, rank(), step, -1))
                monitor.extra(step, *objective.diagnostics(images))
            torch.manual_seed(mix_seed(config.run.seed, rank(), step, micro))
            outputs = engine(images, batch["labels"].to(device)) if objective.uses_labels else engine(images)
            # One small all-reduce per micro-batch: the mean loss, a non-finite flag and the stop signal,
            # so that every rank takes the same decision at the same step.
            status = torch.tensor([outputs["loss"].detach().float(), float(not torch.isfinite(outputs["loss"])),
                                   float(stop.signum), float(batch["bad_samples"])], device=device)
            dist.all_reduce(status)
            if status[1] > 0:
                raise TrainingDiverged(f"loss is {outputs['loss'].item()} at step {step} on at least one rank; "
                                       f"the last good checkpoint is {checkpoint.latest_tag(ckpt_dir)} in {ckpt_dir}")
            engine.backward(outputs["loss"])
            engine.step()
            state["bad_samples"] += int(status[3])
            for name, value in outputs.items():
                value = status[0] / world if name == "loss" else value.detach().float()
                sums[name] = sums.get(name, 0.0) + float(value) / d.grad_accum
        step += 1
        objective.after_step(step, total_steps)
        monitor.step_done()

        if step % config.run.log_every == 0 or step == last_step:
            scalars = {name: value / monitor.window_steps for name, value in sums.items()}
            lrs = [group["lr"] for group in optimizer.param_groups]
            grad_norm = engine.get_global_grad_norm()
            scalars.update({f"lr/layers_{group['layers']}": group["lr"] for group in optimizer.param_groups})
            scalars.update({"lr/first_group": lrs[0], "lr/last_group": lrs[-1],
                            "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                            "data/samples_seen": step * global_batch, "data/bad_samples": state["bad_samples"],
                            "memory/bytes": memory_bytes(device), "epoch": step / steps_per_epoch})
            monitor.report(step, scalars)
            sums = {}
        if knn and step % config.run.knn_every == 0:
            measure_knn(step)
        if config.run.image_every and step % config.run.image_every == 0:
            monitor.images(step, "reconstruction", objective.images_to_log(images))
        stopped_by = (stop.reason() or signal.SIGTERM) if status[2] > 0 else 0
        if step % config.run.save_every == 0 or step == last_step or stopped_by:
            save(step)
        if stopped_by:
            log.info("stopped at step %d on signal %d; run the same command again to resume", step, stopped_by)
            break
    monitor.close()
    return step, stopped_by

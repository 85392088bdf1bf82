"""The training loop: a DeepSpeed engine around an `Objective`, fed by the WebDataset loader.

One optimizer step = `grad_accum` micro-batches per rank. Everything random in a step (masking, drop
path, mixing) is seeded from (seed, rank, step), and the loader's batches are a function of (seed,
epoch, rank, step), so a run resumed from a checkpoint continues exactly as it would have without the
interruption (pretrain.training.resume refuses a resumption that would not). The optimizer is a client
one (pretrain.training.optimizers: torch's AdamW by default; DeepSpeed's fused/CPU Adam differ by ~1e-6
after a resume) and the schedule a client LambdaLR, which keeps each group's lr_scale (DeepSpeed's
WarmupLR sets every group to one learning rate).
"""

import json
import logging
import random
import signal
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from pretrain.config import dump_config, to_dict
from pretrain.core import checkpoint
from pretrain.core.distributed import rank, set_collective_timeout, world_size
from pretrain.core.errors import TrainingDiverged
from pretrain.data.loader import make_loader, mix_seed
from pretrain.data.manifest import Manifest
from pretrain.data.views import normalize
from pretrain.evaluation.knn_monitor import KNNMonitor
from pretrain.evaluation.validation import ValMonitor
from pretrain.graft.param_groups import format_param_groups, layer_span, objective_param_groups
from pretrain.graft.start_weights import grafted_objective
from pretrain.methods.grad_conflict import plot_cosines
from pretrain.training.divergence import DivergenceWatch
from pretrain.training.ds_config import deepspeed_config
from pretrain.training.monitor import Monitor, memory_bytes
from pretrain.training.optimizers import make_optimizer
from pretrain.training.resume import check_resumable, data_fingerprint
from pretrain.training.run_lock import lock_run_dir
from pretrain.training.schedules import cosine_lr_factor

log = logging.getLogger("lg-pretrain")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What the loader counts (pretrain.data.loader): samples replaced, samples lost with their shards, shards
# skipped.
DATA_COUNTS = ("bad_samples", "lost_samples", "skipped_shards")


def seed_step(seed):
    """Seed every generator a step may draw from: torch's (masks, drop path, erasing's noise), and
    Python's and NumPy's (timm's Mixup and RandomErasing draw their parameters there)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def match_batchnorm_statistics(module, dtype):
    """DeepSpeed casts parameters to bf16/fp16 but keeps buffers in fp32, and BatchNorm refuses weights and
    running statistics of different dtypes. The heads' BatchNorms only ever run in training mode, so their
    running statistics are never read: casting them costs nothing."""
    for child in module.modules():
        if (
            isinstance(child, torch.nn.modules.batchnorm._BatchNorm)
            and child.affine
            and child.track_running_stats
        ):
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


def train(config, auto_curve=None):
    """Run (or resume) the training that `config` describes. Returns (last step, signal number that
    stopped it or 0). With graft.rule=auto, `auto_curve` is the measurement that chose config.graft.split
    (pretrain.graft.auto_split.decide_split, a step before this one), logged at step 0."""
    stop = StopFlag()
    try:
        return _train(config, stop, auto_curve)
    finally:
        stop.restore()


def _train(config, stop, auto_curve):
    deepspeed.init_distributed(timeout=set_collective_timeout(config.run.collective_timeout))
    lock = lock_run_dir(config.run.dir)  # before anything is written there
    try:
        return _train_locked(config, stop, auto_curve)
    finally:
        lock.release()


def grouped_optimizer(groups, lr, optim):
    """The client optimizer over the parameter groups (pretrain.graft.param_groups). Each group is named by
    the layers of its lr_scale, which is how TensorBoard logs one learning rate per scale (lr/layers_0-8)."""
    layers_of_scale = {}
    for g in groups:
        layers_of_scale.setdefault(g["lr_scale"], set()).update(g["layer_ids"])
    named = [
        {
            "params": g["params"],
            "weight_decay": g["weight_decay"],
            "lr_scale": g["lr_scale"],
            "layers": layer_span(sorted(layers_of_scale[g["lr_scale"]])),
        }
        for g in groups
    ]
    return make_optimizer(named, lr, optim)


def training_loader(manifest, view, steps_per_epoch, config):
    """The endless (resampled) loader of data.train: an epoch is steps_per_epoch optimizer steps of
    grad_accum micro-batches each, so the batches of a step depend only on (seed, epoch, rank, step)."""
    d, data = config.deepspeed, config.data
    return make_loader(
        manifest,
        d.micro_batch_size,
        view=view,
        img_size=data.img_size,
        mode="resampled",
        num_workers=data.num_workers,
        seed=config.run.seed,
        shuffle_buffer=data.shuffle_buffer,
        steps_per_epoch=steps_per_epoch * d.grad_accum,
        pin_memory=torch.cuda.is_available(),
        max_bad_shards=data.max_bad_shards,
        verify_shards=data.verify_shards,
        url_retries=data.url_retries,
        scaled_decoding=data.scaled_decoding,
        colour_ops=data.colour_ops,
    )


def _train_locked(config, stop, auto_curve):
    world, is_main = world_size(), rank() == 0
    run_dir, ckpt_dir = Path(config.run.dir), Path(config.run.dir) / "ckpt"
    torch.manual_seed(config.run.seed)  # the same initial weights on every rank, in every run
    objective = grafted_objective(config)
    groups = objective_param_groups(objective, config)
    d = config.deepspeed
    global_batch = d.micro_batch_size * d.grad_accum * world
    lr = config.optim.base_lr * global_batch / 256
    optimizer = grouped_optimizer(groups, lr, config.optim)

    manifest = Manifest.load(config.data.train)
    steps_per_epoch = max(1, manifest.num_samples // global_batch)
    loader = training_loader(manifest, objective.view, steps_per_epoch, config)
    total_steps = max(1, round(config.optim.epochs * steps_per_epoch))
    warmup_steps = round(config.optim.warmup_epochs * steps_per_epoch)
    min_ratio = config.optim.min_lr / lr
    lr_factor = config.run.lr_factor
    scheduler = LambdaLR(
        optimizer, lambda step: lr_factor * cosine_lr_factor(step, warmup_steps, total_steps, min_ratio)
    )

    ds_config = deepspeed_config(config, world)
    # The tag is verified and checked before the engine is built.
    tag, rewound = checkpoint.resume_tag(ckpt_dir, config.run.resume_tag)
    if tag:
        check_resumable(
            checkpoint.run_state(ckpt_dir, tag),
            config,
            world,
            data_fingerprint(manifest),
            ds_config,
            steps_per_epoch,
        )
    if is_main:
        log.info(
            "starting DeepSpeed (ZeRO stage %d); its first use on a machine compiles its ops into "
            "TORCH_EXTENSIONS_DIR, which takes minutes",
            ds_config.get("zero_optimization", {}).get("stage", 0),
        )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=objective, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    dtype, device = DTYPES[d.precision], engine.device
    match_batchnorm_statistics(objective, dtype)

    # data_offset: batches skipped by run.skip_batches so far; step s trains on the batch of step s + offset.
    state = {"step": 0, "data_offset": 0, **{count: 0 for count in DATA_COUNTS}}
    watch = DivergenceWatch(config.run.loss_spike, config.run.grad_norm_spike)
    if tag:
        saved = checkpoint.load(engine, ckpt_dir, tag)
        objective.load_extra_state(saved["objective"])
        state.update({key: saved.get(key, 0) for key in state})
        if "divergence" in saved:
            watch.load_state_dict(saved["divergence"])
        if rewound and config.run.skip_batches:
            state["data_offset"] += config.run.skip_batches
        # The optimizer comes back with the learning rates of the run that saved it; the next step must
        # have this run's (run.lr_factor may have changed): the same expression LambdaLR evaluates.
        for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(scheduler.last_epoch)
        if is_main:
            log.info(
                "resumed %s at step %d%s",
                ckpt_dir / tag,
                state["step"],
                f", skipping the batches of {config.run.skip_batches} steps"
                if rewound and config.run.skip_batches
                else "",
            )
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(config))
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=1))
        log.info(
            "%d processes, global batch %d, lr %.3g, %d steps (%d per epoch, %d warmup)\n%s",
            world,
            global_batch,
            lr,
            total_steps,
            steps_per_epoch,
            warmup_steps,
            format_param_groups(groups),
        )
    last_step = min(total_steps, config.run.max_steps or total_steps)  # run.max_steps may stop it early
    monitor = Monitor(run_dir, is_main, last_step, global_batch)  # the console's step/total and eta
    monitor.config(dump_config(config))
    if auto_curve:
        cosines = auto_curve["cosines"]
        monitor.extra(
            0,
            {
                "graft/auto_split": auto_curve["split"],
                **{f"graft/probe_cosine/block_{i:02d}": c for i, c in enumerate(cosines)},
            },
            {"graft/probe_cosines": plot_cosines(cosines, split=auto_curve["split"])},
        )

    def save(step):
        client_state = {
            **state,
            "step": step,
            "objective": objective.extra_state(),
            "divergence": watch.state_dict(),
            "val": val.state_dict() if val else {},
        }
        run_state = {
            "step": step,
            "world_size": world,
            "steps_per_epoch": steps_per_epoch,
            "config": to_dict(config),
            "data": data_fingerprint(manifest),
            "ds_config": ds_config,
        }
        tag = checkpoint.save(engine, ckpt_dir, step, client_state, run_state, config.run.keep_last)
        if is_main:
            log.info("saved checkpoint %s", ckpt_dir / tag)

    def diverged(problem):
        """Stop: the weights after `step` updates gave a bad loss or gradient, so a checkpoint of exactly
        those weights is set aside (TAG.diverged) and `latest` goes back to the one before."""
        kept = checkpoint.latest_tag(ckpt_dir)
        if kept == checkpoint.tag_of(step):
            kept = checkpoint.set_aside(ckpt_dir, kept, "diverged")
        raise TrainingDiverged(
            f"{problem} at step {step + 1}; the checkpoint from before it is {kept or 'none'} in "
            f"{ckpt_dir}. To recover, resume from it or an earlier tag (run.resume_tag=TAG), skipping the "
            "batches that blew up (run.skip_batches=N) and/or at a lower learning rate (run.lr_factor=0.5)"
        )

    knn = KNNMonitor(config, objective.encoder, device, d.micro_batch_size) if config.run.knn_every else None
    val = (
        ValMonitor(config, objective, device)
        if objective.uses_labels and config.finetune.val and config.finetune.eval_every
        else None
    )
    val_every = max(1, round(config.finetune.eval_every * steps_per_epoch))
    if val and tag:
        val.load_state_dict(saved.get("val", {}))

    def measure_knn(step):
        top1 = knn.measure()
        if is_main:
            monitor.extra(step, {"eval/knn_top1": top1}, {})
            log.info("step %d  kNN top-1 %.2f %% (%s)", step, top1, config.data.knn_val)

    batches, step, sums, stopped_by = None, state["step"], {}, 0
    if knn and step == 0:
        measure_knn(0)  # the untrained encoder: where the curve starts
    engine.train()
    try:
        while step < last_step:
            epoch, step_in_epoch = divmod(step + state["data_offset"], steps_per_epoch)
            if batches is None or step_in_epoch == 0:
                batches = loader.epoch(epoch, step_in_epoch * d.grad_accum)
            step_loss = 0.0
            for micro in range(d.grad_accum):
                batch = next(batches)
                images = batch["images"]
                images = (
                    [normalize(v, device).to(dtype) for v in images]
                    if isinstance(images, list)
                    else normalize(images, device).to(dtype)
                )
                if micro == 0 and config.run.diagnostics_every and step % config.run.diagnostics_every == 0:
                    seed_step(mix_seed(config.run.seed, rank(), step, -1))
                    monitor.extra(step, *objective.diagnostics(images))
                seed_step(mix_seed(config.run.seed, rank(), step, micro))
                outputs = (
                    engine(images, batch["labels"].to(device)) if objective.uses_labels else engine(images)
                )
                # One small all-reduce per micro-batch: the mean loss, a non-finite flag and the stop signal,
                # so that every rank takes the same decision at the same step.
                local = {
                    "loss": outputs["loss"].detach().float(),
                    "non_finite": float(not torch.isfinite(outputs["loss"])),
                    "stop_signal": float(stop.signum),
                    **{count: float(batch[count]) for count in DATA_COUNTS},
                }
                summed = torch.tensor(list(local.values()), device=device)
                dist.all_reduce(summed)
                status = dict(zip(local, summed.tolist()))
                if status["non_finite"] > 0:
                    diverged(f"the loss is {outputs['loss'].item()} on at least one rank")
                engine.backward(outputs["loss"])
                engine.step()
                for count in DATA_COUNTS:
                    state[count] += int(status[count])
                step_loss += status["loss"] / world / d.grad_accum
                for name, value in outputs.items():
                    value = status["loss"] / world if name == "loss" else value.detach().float()
                    sums[name] = sums.get(name, 0.0) + float(value) / d.grad_accum
            grad_norm = engine.get_global_grad_norm()  # every rank has the same, so every rank stops alike
            grad_norm = None if grad_norm is None else float(grad_norm)
            problem = watch.check(step_loss, grad_norm)
            if problem:
                diverged(problem)
            step += 1
            objective.after_step(step, total_steps)
            monitor.step_done()

            if step % config.run.log_every == 0 or step == last_step:
                scalars = {name: value / monitor.window_steps for name, value in sums.items()}
                lrs = [group["lr"] for group in optimizer.param_groups]
                scalars.update(
                    {f"lr/layers_{group['layers']}": group["lr"] for group in optimizer.param_groups}
                )
                scalars.update(
                    {
                        "lr/first_group": lrs[0],
                        "lr/last_group": lrs[-1],
                        "grad_norm": grad_norm if grad_norm is not None else 0.0,
                        "data/samples_seen": step * global_batch,
                        **{f"data/{count}": state[count] for count in DATA_COUNTS},
                        "memory/bytes": memory_bytes(device),
                        "epoch": step / steps_per_epoch,
                    }
                )
                monitor.report(step, scalars)
                sums = {}
            if knn and (step % config.run.knn_every == 0 or step == total_steps):
                measure_knn(step)
            if val and (step % val_every == 0 or step == total_steps):
                record = val.measure(step, step / steps_per_epoch)
                if is_main:
                    monitor.extra(
                        step, {f"eval/val_{k}": v for k, v in record.items() if k.startswith("top1")}, {}
                    )
            if config.run.image_every and step % config.run.image_every == 0:
                monitor.images(step, "reconstruction", objective.images_to_log(images))
            stopped_by = (stop.reason() or signal.SIGTERM) if status["stop_signal"] > 0 else 0
            if step % config.run.save_every == 0 or step == last_step or stopped_by:
                save(step)
            if stopped_by:
                log.info(
                    "stopped at step %d on signal %d; run the same command again to resume", step, stopped_by
                )
                break
    finally:  # an error must not leave the loader's workers behind: they would hold up the exit
        if batches is not None:
            batches.close()
    monitor.close()
    return step, stopped_by

"""Checkpoints in a run directory: DeepSpeed tags under RUN_DIR/ckpt, a `latest` file that moves only
after every rank has finished writing, and the last K tags kept. Each tag also holds `run_state.json`
(step, world size, config), which a resuming run checks before DeepSpeed reads any shard."""
import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from pretrain.distributed import rank

LATEST = "latest"
RUN_STATE = "run_state.json"


def tag_of(step):
    return f"step{step:09d}"


def latest_tag(ckpt_dir):
    path = Path(ckpt_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def save(engine, ckpt_dir, step, client_state, run_state, keep_last):
    """Save tag `step`, then point `latest` at it (atomically, after a barrier), then prune old tags."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_of(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if rank() == 0:
        (ckpt_dir / tag / RUN_STATE).write_text(json.dumps(run_state, indent=1))
        temporary = ckpt_dir / f".{LATEST}.tmp"
        temporary.write_text(tag)
        os.replace(temporary, ckpt_dir / LATEST)
        tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[:-keep_last] if keep_last > 0 else []:
            if old != tag:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()
    return tag


def run_state(ckpt_dir):
    """The run_state.json of the `latest` tag, or None if the run has no checkpoint yet."""
    tag = latest_tag(ckpt_dir)
    return None if tag is None else json.loads((Path(ckpt_dir) / tag / RUN_STATE).read_text())


def load(engine, ckpt_dir):
    """Load the `latest` tag into the engine (module, optimizer, scheduler); return its client state,
    or None if the run has no checkpoint yet."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(ckpt_dir) / tag}")
    return client_state

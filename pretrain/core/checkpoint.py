"""Checkpoints in a run directory: DeepSpeed tags under RUN_DIR/ckpt, a `latest` file that moves only
after every rank has finished writing, and the last K tags kept.

Each tag also holds `run_state.json` (step, world size, config), which a resuming run checks before
DeepSpeed reads any shard, and `checksums.json`: the size and SHA-256 of every file of the tag, written
before `latest` moves. A resuming run verifies the tag against it (every rank hashes its share of the
files); when `latest` is damaged it says so and falls back to the newest intact tag, and when none is
intact it stops with exit code 2. lg-export and every consolidation verify too. Tags written before
checksums were recorded are used unverified, with a warning.
"""

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch.distributed as dist

from pretrain.core.distributed import is_distributed, rank, rank0_value, world_size
from pretrain.core.errors import UserError
from pretrain.core.files import sha256_of_file, write_atomic

log = logging.getLogger(__name__)
LATEST = "latest"
RUN_STATE = "run_state.json"
CHECKSUMS = "checksums.json"
RESUMED_FROM = "resumed_from"  # the run.resume_tag already honoured
PathLike = str | os.PathLike
TAG = re.compile(r"step\d{9}$")


def tag_of(step: int) -> str:
    return f"step{step:09d}"


def latest_tag(ckpt_dir: PathLike) -> str | None:
    path = Path(ckpt_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def tags(ckpt_dir: PathLike) -> list[str]:
    """The step tags in `ckpt_dir`, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    return (
        sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG.match(p.name))
        if ckpt_dir.is_dir()
        else []
    )


def tag_files(tag_dir: PathLike) -> list[str]:
    """Every file of a tag except its checksums, as sorted paths relative to the tag."""
    tag_dir = Path(tag_dir)
    return sorted(
        p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS
    )


def _share(items, collective):
    """This rank's part of `items` when the work is shared by every rank, else all of them."""
    return items[rank() :: world_size()] if collective and is_distributed() else items


def _merge(part, collective):
    """The union over ranks of each rank's dict `part` (a collective when `collective`)."""
    if not (collective and is_distributed()):
        return part
    parts = [None] * world_size()
    dist.all_gather_object(parts, part)
    return {key: value for p in parts for key, value in p.items()}


def checksums(tag_dir: PathLike, collective: bool = False) -> dict:
    """{file: {"bytes", "sha256"}} of every file of a tag; with `collective`, each rank hashes its share."""
    tag_dir = Path(tag_dir)
    mine = {
        name: {"bytes": (tag_dir / name).stat().st_size, "sha256": sha256_of_file(tag_dir / name)}
        for name in _share(tag_files(tag_dir), collective)
    }
    return dict(sorted(_merge(mine, collective).items()))


def problem_with(tag_dir: PathLike, collective: bool = False) -> str | None:
    """Why the tag cannot be used (one line), or None if it is intact. A tag without checksums (written
    before they were recorded) counts as intact, with a warning."""
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        return f"{tag_dir} does not exist"
    try:
        recorded = json.loads((tag_dir / CHECKSUMS).read_text())
    except FileNotFoundError:
        if rank() == 0:
            log.warning(
                "checkpoint %s has no %s (written before checksums were recorded, or its save was cut "
                "short): it is used unverified",
                tag_dir,
                CHECKSUMS,
            )
        return None
    except ValueError:
        return f"its {CHECKSUMS} is not valid JSON"
    present = set(tag_files(tag_dir))
    missing = sorted(set(recorded) - present)
    if missing:
        return f"{missing[0]} is missing" + (
            f" (and {len(missing) - 1} more files)" if len(missing) > 1 else ""
        )
    problems = {}
    for name in _share(sorted(recorded), collective):
        size = (tag_dir / name).stat().st_size
        if size != recorded[name]["bytes"]:
            problems[name] = f"{name} has {size} bytes, {recorded[name]['bytes']} when it was written"
        elif sha256_of_file(tag_dir / name) != recorded[name]["sha256"]:
            problems[name] = f"{name} does not match the SHA-256 recorded when it was written"
    problems = _merge(problems, collective)
    return problems[min(problems)] if problems else None


def tag_bytes(tag_dir: PathLike) -> int:
    return sum((Path(tag_dir) / name).stat().st_size for name in tag_files(tag_dir))


def _space_problem(ckpt_dir, needed):
    free = shutil.disk_usage(ckpt_dir).free
    if free < needed:
        return (
            f"the disk holding {ckpt_dir} is full: {free / 2**20:.0f} MiB free, a checkpoint needs "
            f"{needed / 2**20:.0f} MiB; free some space (or lower run.keep_last) and run the same command "
            "again to resume from the last checkpoint"
        )
    return None


def save(engine, ckpt_dir: PathLike, step: int, client_state: dict, run_state: dict, keep_last: int) -> str:
    """Save tag `step` with its run state and checksums, then point `latest` at it (atomically, after a
    barrier), then prune old tags. Every rank calls it.

    Before writing, the free space is compared with the size of the last checkpoint; a full disk stops the
    run with a UserError naming it, `latest` on the previous tag (a failed write is reported the same way,
    and its partial tag removed)."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_of(step)
    previous = latest_tag(ckpt_dir)
    problem = None
    if rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if previous and (ckpt_dir / previous).is_dir():
            problem = _space_problem(ckpt_dir, tag_bytes(ckpt_dir / previous))
    problem = rank0_value(problem)
    if problem:
        raise UserError(problem)
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    except Exception as error:
        space = _space_problem(ckpt_dir, 1 << 20)  # under a MiB left: the write ran out of space
        if space is None:
            raise
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        raise UserError(
            f"writing checkpoint {ckpt_dir / tag} failed ({type(error).__name__}), {space}"
        ) from None
    if rank() == 0:
        write_atomic(ckpt_dir / tag / RUN_STATE, json.dumps(run_state, indent=1))
    dist.barrier()
    sums = checksums(ckpt_dir / tag, collective=True)
    if rank() == 0:
        write_atomic(ckpt_dir / tag / CHECKSUMS, json.dumps(sums, indent=1))
        write_atomic(ckpt_dir / LATEST, tag)
        for old in tags(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
            if old != tag:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()
    return tag


def resume_tag(ckpt_dir: PathLike, wanted: str = "") -> tuple[str | None, bool]:
    """(tag, rewound): the tag a run resumes from, and whether it goes back to `wanted` this time.

    The tag is `latest`, or once `wanted` (run.resume_tag: the tags after it are
    renamed TAG.abandoned, kept, and `latest` names it; later restarts of the same command go on from
    `latest`). When `latest` is damaged, the newest intact tag, which `latest` then names (the damaged
    one is renamed TAG.corrupt and kept). (None, False) when the run has no checkpoint; UserError when the tag
    asked for, or every tag, is damaged. A collective."""
    ckpt_dir = Path(ckpt_dir)
    marker = ckpt_dir / RESUMED_FROM
    if wanted and not (marker.is_file() and marker.read_text().strip() == wanted):
        problem = problem_with(ckpt_dir / wanted, collective=True)
        if problem:
            raise UserError(
                f"run.resume_tag={wanted}: checkpoint {ckpt_dir / wanted} cannot be used: {problem}"
            )
        if rank() == 0:
            later = [tag for tag in tags(ckpt_dir) if tag > wanted]
            kept = [aside_name(ckpt_dir, tag, "abandoned") for tag in later]
            for tag, aside in zip(later, kept):
                os.replace(ckpt_dir / tag, aside)
            write_atomic(ckpt_dir / LATEST, wanted)
            write_atomic(marker, wanted)
            log.warning(
                "resuming from %s as run.resume_tag asks%s",
                ckpt_dir / wanted,
                f"; the later tags are kept as {', '.join(p.name for p in kept)}" if kept else "",
            )
        if is_distributed():
            dist.barrier()
        return wanted, True
    latest = latest_tag(ckpt_dir)
    if latest is None:
        return None, False
    problem = problem_with(ckpt_dir / latest, collective=True)
    if problem is None:
        return latest, False
    damaged = [f"{latest}: {problem}"]
    if rank() == 0:
        log.error("checkpoint %s is damaged: %s", ckpt_dir / latest, problem)
    for tag in reversed(tags(ckpt_dir)):
        if tag == latest:
            continue
        if not (ckpt_dir / tag / CHECKSUMS).is_file():
            damaged.append(f"{tag}: no {CHECKSUMS} (its save did not finish)")
            continue
        problem = problem_with(ckpt_dir / tag, collective=True)
        if problem:
            damaged.append(f"{tag}: {problem}")
            continue
        if rank() == 0:
            aside = aside_name(ckpt_dir, latest, "corrupt")
            if (ckpt_dir / latest).is_dir():
                os.replace(ckpt_dir / latest, aside)
            write_atomic(ckpt_dir / LATEST, tag)
            log.warning(
                "falling back to checkpoint %s, the newest intact one (the damaged one is kept as %s)",
                ckpt_dir / tag,
                aside,
            )
        if is_distributed():
            dist.barrier()
        return tag, False
    raise UserError(
        f"no intact checkpoint in {ckpt_dir} ({'; '.join(damaged)}); use a new run.dir to start over"
    )


def aside_name(ckpt_dir: PathLike, tag: str, suffix: str) -> Path:
    """A free path TAG.suffix (TAG.suffix.2, ... when an earlier one is there) to keep a tag aside under."""
    path, count = Path(ckpt_dir) / f"{tag}.{suffix}", 1
    while path.exists():
        count += 1
        path = Path(ckpt_dir) / f"{tag}.{suffix}.{count}"
    return path


def set_aside(ckpt_dir: PathLike, tag: str, suffix: str) -> str | None:
    """Rename `tag` to TAG.suffix (kept for a look, never resumed from) and point `latest` at the newest
    tag left, or remove it when none is; the tag `latest` names now (None). Rank 0 does it."""
    ckpt_dir = Path(ckpt_dir)
    if rank() != 0 or not (ckpt_dir / tag).is_dir():
        return latest_tag(ckpt_dir)
    os.replace(ckpt_dir / tag, aside_name(ckpt_dir, tag, suffix))
    left = tags(ckpt_dir)
    if left:
        write_atomic(ckpt_dir / LATEST, left[-1])
    else:
        (ckpt_dir / LATEST).unlink(missing_ok=True)
    return left[-1] if left else None


def run_state(ckpt_dir: PathLike, tag: str | None = None) -> dict | None:
    """The run_state.json of `tag` (default: the `latest` one), or None if the run has no checkpoint yet."""
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        return None
    path = Path(ckpt_dir) / tag / RUN_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path} cannot be read ({error})") from None


def load(engine, ckpt_dir: PathLike, tag: str) -> dict:
    """Load `tag` into the engine (module, optimizer, scheduler); return its client state."""
    _, client_state = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(ckpt_dir) / tag}")
    return client_state

"""graft.rule=auto: put the graft split where the measured MIM-vs-CL gradient cosine turns to conflict.

Seed 001 measures, per transformer block, the cosine between the gradients of the MIM and the CL loss
of the hybrid objective: lower blocks agree (cosine > 0), higher blocks conflict. Grafting gives the
lower part a small learning rate so that CL does not undo what MIM learned there; `auto` chooses that
lower part from the measurement instead of by hand search.

1. The curve: the per-block cosines logged by a hybrid run (TensorBoard tags grad_cosine/block_NN),
   averaged over the later half of its measurements (the decoder and heads start from scratch, so
   the first measurements say little). The run is `graft.auto_from`, or else a probe this run makes
   first: `graft.probe_steps` steps of the hybrid loss from the `graft.init` weights, measuring every
   `graft.probe_every` steps, in RUN_DIR/graft_probe (resumable like any run).
2. The split k (blocks 0..k-1 and the embeddings form the lower part) is the step that best separates
   agreement from conflict: the fewest blocks on the wrong side of `graft.auto_threshold` (cosine >=
   threshold below k, < threshold from k on). Ties go to the larger k, keeping more MIM layers at the
   small learning rate. All blocks agreeing gives k = depth; all conflicting, k = 0.
   Only blocks whose mean cosine is more than `graft.auto_confidence` standard errors (over the
   measurements used, at least 3) from the threshold take part; the others are undecided and on no
   wrong side.
   When no block is decided the probe could not tell, and the configured `graft.split` stays (on the
   digits a short probe measures |cosine| < 0.04, noise, from which the rule chose split 1; see
   BENCHMARKS.md, "graft.rule=auto against a grid").
3. The grafted run then trains as rule `split` with that k (and lower_scale / upper_scale); the curve
   and the choice are printed, written to RUN_DIR/graft_auto.json and logged to TensorBoard.
"""

import copy
import json
import logging
import math
import statistics
from pathlib import Path

import torch.distributed as dist

from pretrain.core.distributed import is_distributed, rank
from pretrain.core.errors import UserError
from pretrain.methods.grad_conflict import COSINE_TAG

log = logging.getLogger("lg-pretrain")


def read_cosines(source):
    """Per-block mean cosine over the later half of the measurements in a run's TensorBoard log;
    returns (cosines, steps used, standard errors of the means: None from fewer than 3 measurements,
    too few to estimate one)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    source = Path(source)
    log_dir = source / "tb" if (source / "tb").is_dir() else source
    if not log_dir.is_dir():
        raise UserError(f"graft.auto_from: {source} is not a run directory or TensorBoard log directory")
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = sorted(t for t in events.Tags()["scalars"] if t.startswith(COSINE_TAG))
    if not tags:
        raise UserError(
            f"graft.auto_from: {log_dir} has no {COSINE_TAG}NN scalars (log them with a hybrid run and "
            "run.diagnostics_every > 0)"
        )
    curves = [[e.value for e in events.Scalars(tag)] for tag in tags]
    steps = [e.step for e in events.Scalars(tags[0])]
    later = len(steps) // 2
    used = [values[later:] for values in curves]
    means = [sum(values) / len(values) for values in used]
    errors = [
        statistics.stdev(values) / math.sqrt(len(values)) if len(values) >= 3 else None for values in used
    ]
    return means, steps[later:], errors


def choose_split(cosines, threshold=0.0, errors=None, confidence=0.0):
    """The k in 0..len(cosines) with the fewest decided blocks on the wrong side (ties: the largest k);
    a block is decided when its cosine is more than `confidence` standard errors (`errors`; None:
    unknown) from the threshold, or always with confidence 0. None when no block is decided."""
    errors = errors or [0.0] * len(cosines)
    decided = [
        confidence == 0 or (e is not None and abs(c - threshold) > confidence * e)
        for c, e in zip(cosines, errors)
    ]
    if not any(decided):
        return None

    def wrong(k):
        return sum(d and c < threshold for c, d in zip(cosines[:k], decided[:k])) + sum(
            d and c >= threshold for c, d in zip(cosines[k:], decided[k:])
        )

    return min(range(len(cosines) + 1), key=lambda k: (wrong(k), -k))


def probe_config(config):
    """The probe: the hybrid loss from the graft.init weights, no lr rule, measuring often."""
    probe = copy.deepcopy(config)
    g = config.graft
    probe.method = "hybrid"
    probe.run.dir = str(Path(config.run.dir) / "graft_probe")
    probe.run.max_steps = g.probe_steps
    probe.run.diagnostics_every = g.probe_every
    probe.run.save_every = min(config.run.save_every, g.probe_steps)
    probe.run.image_every = 0
    probe.graft.rule, probe.graft.l1_weight = "none", 0.0
    probe.moco.freeze_patch_embed = False  # MAE's loss trains the patch projection
    return probe


def decide_split(config, train):
    """The split the measured curve chooses (running the probe with `train` first if needed), as the curve
    record (curve["split"]; the configured graft.split when the probe cannot tell); `config` is left as
    it is. Returns (curve, signal number that stopped the probe or 0)."""
    g = config.graft
    source = g.auto_from
    if not source:
        probe = probe_config(config)
        if rank() == 0:
            log.info(
                "graft.rule=auto: probing the MIM-vs-CL gradient cosine, %d hybrid steps in %s",
                g.probe_steps,
                probe.run.dir,
            )
        _, signum = train(probe)
        if signum:
            return None, signum
        if is_distributed():
            dist.barrier()  # rank 0 has closed the probe's TensorBoard log: every rank reads it whole
        source = probe.run.dir
    cosines, steps, errors = read_cosines(source)
    chosen = choose_split(cosines, g.auto_threshold, errors, g.auto_confidence)
    if chosen is None and rank() == 0:
        log.info(
            "graft.rule=auto: no block's cosine is more than %g standard errors from %g: the probe cannot "
            "tell agreement from conflict; keeping graft.split=%d",
            g.auto_confidence,
            g.auto_threshold,
            g.split,
        )
    split = g.split if chosen is None else chosen
    curve = {
        "source": str(source),
        "steps": steps,
        "cosines": cosines,
        "errors": errors,
        "threshold": g.auto_threshold,
        "confidence": g.auto_confidence,
        "decided": chosen is not None,
        "split": split,
    }
    if rank() == 0:
        table = "\n".join(
            f"  block {i:2d}  cosine {c:+.3f} ± {'?' if e is None else f'{e:.3f}'}  "
            f"{'lower' if i < split else 'upper'}"
            for i, (c, e) in enumerate(zip(cosines, errors))
        )
        log.info(
            "graft.rule=auto: split %d (blocks 0-%d at lr_scale %g, the rest at %g), from %s (steps %s):\n%s",
            split,
            split - 1,
            g.lower_scale,
            g.upper_scale,
            source,
            f"{steps[0]}-{steps[-1]}",
            table,
        )
        Path(config.run.dir).mkdir(parents=True, exist_ok=True)
        (Path(config.run.dir) / "graft_auto.json").write_text(json.dumps(curve, indent=1))
    return curve, 0


def with_split(config, curve):
    """A copy of `config` that trains rule `auto` at the split `curve` (decide_split's) chose."""
    decided = copy.deepcopy(config)
    decided.graft.split = curve["split"]
    return decided

"""What a resumption must keep: the rules that refuse a resumed run that would not continue as it began.

A run's checkpoint holds its run state (core.checkpoint.run_state): the world size, the config, the data's
fingerprint, steps per epoch and the effective DeepSpeed config. Only what the run computes with is
compared: the shared config sections and the active method's (another method's section, say a default
that changed since, is not this run's business), what the data holds rather than where it lies, and the
length of an epoch, which the learning-rate schedule is measured in.
"""

import json

from pretrain.config import SHARED_SECTIONS, Config, to_dict
from pretrain.core.errors import UserError
from pretrain.methods import OBJECTIVES

# Settings that may change between a run and its resumption (they change nothing the run computes, or are the
# recovery tools); any other difference is refused. data.num_workers is not one: each worker draws its own
# shards.
RESUMABLE_CHANGES = (
    "run.log_every",
    "run.image_every",
    "run.save_every",
    "run.keep_last",
    "run.max_steps",
    "run.knn_every",
    "run.knn_pool",
    "data.knn_train",
    "data.knn_val",
    "data.knn_per_class",
    "run.collective_timeout",
    "run.resume_tag",
    "run.skip_batches",
    "run.lr_factor",
    "run.loss_spike",
    "run.grad_norm_spike",
    "data.max_bad_shards",
    "data.verify_shards",
    "data.url_retries",
    "finetune.allow_partial",
    "finetune.eval_every",
    "finetune.keep_best",
)
# Where things are, not what they hold: a run directory, data set or DeepSpeed file may move. What they
# hold is compared instead: the data's shards (SHA-256 and sample counts), the effective DeepSpeed config.
# graft.init's weights are read again on resume (the L1 pull's anchor), not compared.
LOCATIONS = ("run.dir", "data.train", "deepspeed.config", "graft.init", "graft.auto_from")


def data_fingerprint(manifest):
    """What a run's data is, wherever it lies: each shard's SHA-256 and sample count, in order."""
    return [[shard.sha256, shard.num_samples] for shard in manifest.shards]


def check_resumable(saved, config, world, data=None, ds_config=None, steps_per_epoch=None):
    """Refuse (UserError) a resumption that would not continue the run exactly; `saved` is the checkpoint's
    run state, the rest is this run's (data_fingerprint, effective DeepSpeed config, steps per epoch)."""
    if saved["world_size"] != world:
        raise UserError(
            f"the checkpoint was written by {saved['world_size']} processes and this run has {world}; "
            "resume with the same world size (ZeRO partitions are per rank)"
        )
    # What the run computes with: the shared sections and its method's; another method's section (say,
    # a default that changed since) is not this run's business.
    compared = {"method", *SHARED_SECTIONS, *OBJECTIVES[config.method].config_sections}
    current, before = (
        {k: v for k, v in _flatten(tree).items() if k.split(".")[0] in compared}
        for tree in (to_dict(config), saved["config"])
    )
    # A key the checkpoint does not know was added to the config later: it changes nothing at its default.
    defaults = _flatten(to_dict(Config()))
    before = {**{k: v for k, v in defaults.items() if k not in before and k in current}, **before}
    # Checkpoints written before the data and the DeepSpeed config were recorded compare their locations.
    ignored = RESUMABLE_CHANGES + tuple(
        k
        for k in LOCATIONS
        if not (k == "data.train" and "data" not in saved)
        and not (k == "deepspeed.config" and "ds_config" not in saved)
    )
    changed = [k for k in sorted(current) if current[k] != before.get(k, current[k]) and k not in ignored]
    if changed:
        details = ", ".join(f"{k}: {before.get(k)!r} -> {current.get(k)!r}" for k in changed[:6])
        raise UserError(
            f"the config differs from the checkpoint's ({details}); the run would not continue as "
            "it began. Undo the change, or use a new run.dir to start over"
        )
    if data is not None and saved.get("data") not in (None, data):
        raise UserError(
            f"data.train {config.data.train} holds other shards than the run was trained on "
            f"({len(data)} shards of {sum(n for _, n in data)} samples; the checkpoint's: "
            f"{len(saved['data'])} of {sum(n for _, n in saved['data'])}), so the run would not "
            "continue as it began; give the run's own data (it may have moved), or a new run.dir"
        )
    if steps_per_epoch is not None and saved.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
        raise UserError(
            f"an epoch is {steps_per_epoch} steps now and was {saved['steps_per_epoch']} in the "
            "checkpoint: the learning-rate schedule would change; resume with the same data and batch"
        )
    # The DeepSpeed config as the checkpoint holds it (through JSON).
    current_ds = None if ds_config is None else json.loads(json.dumps(ds_config))
    if current_ds is not None and saved.get("ds_config") not in (None, current_ds):
        before_ds, now_ds = _flatten(saved["ds_config"]), _flatten(current_ds)
        keys = sorted(k for k in set(before_ds) | set(now_ds) if before_ds.get(k) != now_ds.get(k))
        details = ", ".join(f"{k}: {before_ds.get(k)!r} -> {now_ds.get(k)!r}" for k in keys[:6])
        raise UserError(
            f"the effective DeepSpeed config ({config.deepspeed.config} and deepspeed.*) differs from the "
            f"checkpoint's ({details}); undo the change, or use a new run.dir"
        )


def _flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat

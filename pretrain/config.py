"""The run config: dataclasses, filled from YAML plus `a.b=value` overrides.

The shared sections (run, data, model, optim, graft, deepspeed) are defined here; each method's section
is defined in the method's own file (pretrain/methods/, `@config_section`) and joins `Config` from
there. Unknown keys and values of the wrong type are a `UserError` naming the key (and the file)
before any work starts; `Config.validate` checks the ranges, each method section its own.
"""

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pretrain.core.errors import UserError
from pretrain.core.shipped import resolve_shipped
from pretrain.data.views import COLOUR_OPS, ViewConfig
from pretrain.methods import OBJECTIVES, SECTIONS

# The sections every method reads; each method names its own (Objective.config_sections).
SHARED_SECTIONS = ("run", "data", "model", "optim", "graft", "deepspeed")
ARCHS = ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge")
METHODS = tuple(OBJECTIVES)  # every registered method (pretrain/methods/)
OPTIMIZERS = ("adamw", "lars", "sgd")  # see pretrain.training.optimizers
GRAFT_RULES = ("none", "list", "split", "ramp", "freeze", "auto")
PRECISIONS = ("fp32", "bf16", "fp16")
DECAY_EXEMPTIONS = ("none", "1d", "1d_tokens")  # see pretrain.graft.param_groups.uses_weight_decay


@dataclass
class RunConfig:
    dir: str = "runs/pretrain"  # run directory: config, TensorBoard logs, checkpoints
    seed: int = 0
    log_every: int = 20  # steps between console lines and TensorBoard scalars
    image_every: int = 500  # steps between MAE reconstruction grids
    save_every: int = 1000  # steps between checkpoints (also at the end and on SIGTERM/SIGUSR1)
    keep_last: int = 3  # checkpoints kept
    max_steps: int = 0  # stop after this many steps in total (0: run the whole schedule)
    # steps between a method's extra measurements (hybrid: gradient cosines); 0: off
    diagnostics_every: int = 100
    # steps between online kNN measurements (eval/knn_top1) on data.knn_train/knn_val; 0: off
    knn_every: int = 0
    knn_pool: str = "token"  # the kNN monitor's features: class token | mean (of the patch tokens)
    # Seconds a collective may wait for a silent peer before every rank stops with an error (a dead peer
    # is noticed at once; this catches a hung one). Long enough for the slowest checkpoint write.
    collective_timeout: float = 600.0
    # Resume from this checkpoint tag (e.g. step000004000) instead of the latest one, once: the recovery
    # from a divergence. The later tags are kept, renamed TAG.abandoned.
    resume_tag: str = ""
    skip_batches: int = 0  # with resume_tag: skip this many steps' batches after it (those that blew up)
    # multiplies the learning rate of every group (lower it to recover from a divergence)
    lr_factor: float = 1.0
    # Divergence guards (pretrain/training/divergence.py): stop, keeping the checkpoint from before, when the
    # loss exceeds loss_spike x its running mean, or the gradient norm grad_norm_spike x its own (0: off).
    loss_spike: float = 5.0
    grad_norm_spike: float = 0.0


@dataclass
class DataConfig:
    train: str = "data/imagenet-wds/train.json"  # manifest written by lg-shard
    img_size: int = 224
    num_workers: int = 8
    shuffle_buffer: int = 1000
    knn_train: str = ""  # manifests of the online kNN monitor (run.knn_every): the labelled neighbours ...
    knn_val: str = ""  # ... and the images they classify
    knn_per_class: int = 0  # at most this many images of a class in each (0: all), to keep it cheap
    # Shards in a row that give no sample before the run stops with an error naming the storage (an
    # outage); fewer are skipped and their samples counted as lost (data/lost_samples). 0: never stop.
    max_bad_shards: int = 16
    # Hash each shard before reading it and skip (counting its samples as lost) one whose SHA-256 is not
    # the manifest's: a damaged or replaced file. A fraction of the decoding cost (BENCHMARKS.md).
    verify_shards: bool = True
    # A shard at a URL (http(s)://, pipe:, s3://, gs://) that breaks off is opened again this many times,
    # 1, 2, 4 ... s apart, before the run stops with an error naming it.
    url_retries: int = 3
    # Let a view's random crop decode its JPEG at 1/2, 1/4 or 1/8 scale when the crop is downscaled at
    # least that much (libjpeg's DCT scaling, through PIL): nearly the same pixels (47-52 dB), less decoding.
    # Off: it pays only for large originals (2000x1500 at 224 px: 1.49x the MAE view); on ImageNet-sized
    # JPEGs it never applies at 224 px and costs up to 23 % at smaller sizes (PIL's resize; BENCHMARKS.md).
    scaled_decoding: bool = False
    # How the views' colour steps (jitter, grayscale, blur, solarize) are computed: pil, as the official
    # recipes do (torchvision on PIL images), or tensor: the same random draws on float tensors, about
    # twice as fast, nearly the same pixels (one rounding, a true Gaussian blur; BENCHMARKS.md).
    colour_ops: str = "pil"


@dataclass
class ModelConfig:
    arch: str = "vit_base"
    patch_size: int = 0  # 0: 16, or 14 for vit_huge
    drop_path: float = 0.0
    grad_checkpointing: bool = False  # recompute each transformer block in the backward pass
    # What the contrastive heads read: token (the class token, as MoCo v3) | avg (the mean patch token)
    global_pool: str = "token"

    @property
    def patch(self):
        return self.patch_size or (14 if self.arch == "vit_huge" else 16)


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4  # lr = base_lr x global batch / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    epochs: float = 800
    warmup_epochs: float = 40
    clip_grad: float = 0.0  # global gradient-norm clipping; 0 turns it off
    layer_decay: float = 1.0  # lr_scale = layer_decay ** (depth + 1 - layer_id); 1.0: every layer alike
    # Parameters without weight decay: none | 1d (biases, norms) | 1d_tokens (and position embeddings,
    # class / mask tokens); empty: the method's official recipe (MoCo v3 none, MAE 1d, fine-tuning 1d_tokens).
    decay_exempt: str = ""
    # adamw (betas) | lars (timm's, MAE's linear probe) | sgd (MoCo v3's linear probe)
    optimizer: str = "adamw"
    momentum: float = 0.9  # lars and sgd


@dataclass
class GraftConfig:
    """Layer-grafted pretraining: start the encoder from another run's weights and give the layers
    learning-rate scales by depth. Layer ids: embeddings 0, block i -> i + 1, everything above depth + 1."""

    init: str = ""  # starting weights: a run directory, an lg-export .pth, or MAE's release ({'model': ...})
    rule: str = "none"  # none | list | split | ramp | freeze | auto (split chosen from measurements)
    scales: list[float] = field(default_factory=lambda: [0.1, 0.1, 1.0])  # list: spread evenly over blocks
    split: int = 8  # split / ramp / freeze: blocks 0 .. split-1 (and the embeddings) form the lower part
    lower_scale: float = 0.1  # split / ramp
    upper_scale: float = 1.0  # split / ramp / freeze
    ramp_width: float = 1.0  # ramp: layers over which the scale changes by a factor e^1 of its log-range
    l1_weight: float = 0.0  # pull toward the starting weights: l1_weight * sum |w - w0| ...
    # ... over the parameters of layer ids 0 .. l1_to_layer (12: patch embed + blocks 0-11)
    l1_to_layer: int = 12
    # auto: split from the measured per-block MIM-vs-CL gradient cosine (pretrain/graft/auto_split.py)
    auto_from: str = ""  # a hybrid run whose logged cosines decide; empty: probe first (RUN_DIR/graft_probe)
    probe_steps: int = 300  # hybrid steps of the probe, from graft.init
    probe_every: int = 25  # steps between its measurements
    auto_threshold: float = 0.0  # cosine below which a block counts as conflicting ...
    # ... if this many standard errors away (0: always); if no block is: keep split
    auto_confidence: float = 2.0


@dataclass
class DeepSpeedConfig:
    config: str = "ds_configs/zero1.json"
    precision: str = "bf16"
    micro_batch_size: int = 64  # per process
    grad_accum: int = 1


@dataclass
class SharedConfig:
    method: str = "mae"
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    graft: GraftConfig = field(default_factory=GraftConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def validate(self):
        checks = [
            (self.method in METHODS, "method", f"one of {', '.join(METHODS)}"),
            (self.model.arch in ARCHS, "model.arch", f"one of {', '.join(ARCHS)}"),
            (self.model.global_pool in ("token", "avg"), "model.global_pool", "token or avg"),
            (
                self.deepspeed.precision in PRECISIONS,
                "deepspeed.precision",
                f"one of {', '.join(PRECISIONS)}",
            ),
            (0 <= self.model.drop_path < 1, "model.drop_path", "in [0, 1)"),
            (self.optim.base_lr > 0 and self.optim.min_lr >= 0, "optim.base_lr", "positive (min_lr >= 0)"),
            (
                0 <= self.optim.warmup_epochs <= self.optim.epochs and self.optim.epochs > 0,
                "optim.warmup_epochs",
                "between 0 and optim.epochs (> 0)",
            ),
            (len(self.optim.betas) == 2, "optim.betas", "two numbers"),
            (0 < self.optim.layer_decay <= 1, "optim.layer_decay", "in (0, 1]"),
            (
                self.optim.decay_exempt in ("", *DECAY_EXEMPTIONS),
                "optim.decay_exempt",
                f"empty (the method's recipe) or one of {', '.join(DECAY_EXEMPTIONS)}",
            ),
            (self.optim.optimizer in OPTIMIZERS, "optim.optimizer", f"one of {', '.join(OPTIMIZERS)}"),
            (0 <= self.optim.momentum < 1, "optim.momentum", "in [0, 1)"),
            (self.run.diagnostics_every >= 0, "run.diagnostics_every", ">= 0"),
            (
                self.data.max_bad_shards >= 0 and self.data.url_retries >= 0,
                "data.max_bad_shards",
                ">= 0 (data.url_retries too)",
            ),
            (self.data.colour_ops in COLOUR_OPS, "data.colour_ops", f"one of {', '.join(COLOUR_OPS)}"),
            (self.run.loss_spike == 0 or self.run.loss_spike > 1, "run.loss_spike", "0 (off) or above 1"),
            (
                self.run.grad_norm_spike == 0 or self.run.grad_norm_spike > 1,
                "run.grad_norm_spike",
                "0 (off) or above 1",
            ),
            (self.run.lr_factor > 0, "run.lr_factor", "positive"),
            (self.run.skip_batches >= 0, "run.skip_batches", ">= 0"),
            (
                self.run.skip_batches == 0 or bool(self.run.resume_tag),
                "run.skip_batches",
                "0 unless run.resume_tag names the checkpoint to skip from",
            ),
            (
                self.run.knn_every >= 0 and self.data.knn_per_class >= 0,
                "run.knn_every",
                ">= 0 (data.knn_per_class too)",
            ),
            (
                self.run.knn_every == 0 or bool(self.data.knn_train and self.data.knn_val),
                "run.knn_every",
                "0 unless data.knn_train and data.knn_val name the monitor's manifests",
            ),
            (self.run.knn_pool in ("token", "mean"), "run.knn_pool", "token or mean"),
            (self.graft.rule in GRAFT_RULES, "graft.rule", f"one of {', '.join(GRAFT_RULES)}"),
            (
                self.graft.rule == "none" or self.optim.layer_decay == 1,
                "graft.rule",
                "none when optim.layer_decay is not 1 (one learning-rate rule at a time)",
            ),
            (
                bool(self.graft.scales) and min(self.graft.scales) >= 0,
                "graft.scales",
                "a non-empty list of scales >= 0",
            ),
            (
                self.graft.lower_scale > 0 and self.graft.upper_scale > 0,
                "graft.lower_scale",
                "positive (upper too)",
            ),
            (self.graft.split >= 0 and self.graft.ramp_width > 0, "graft.split", ">= 0 (ramp_width > 0)"),
            (
                self.graft.l1_weight >= 0 and self.graft.auto_confidence >= 0,
                "graft.l1_weight",
                ">= 0 (graft.auto_confidence too)",
            ),
            (
                self.graft.rule != "auto" or bool(self.graft.init or self.graft.auto_from),
                "graft.rule",
                "auto only with graft.init (the probe starts from those weights) or graft.auto_from",
            ),
            (
                self.graft.probe_steps > 0 and self.graft.probe_every > 0,
                "graft.probe_steps",
                "positive (probe_every too)",
            ),
            (
                self.data.img_size % self.model.patch == 0,
                "data.img_size",
                f"a multiple of the patch size {self.model.patch}",
            ),
        ]
        positive = [
            "run.log_every",
            "run.save_every",
            "run.keep_last",
            "data.img_size",
            "deepspeed.micro_batch_size",
            "deepspeed.grad_accum",
            "data.shuffle_buffer",
            "run.collective_timeout",
        ]
        checks += [(get_key(self, key) > 0, key, "positive") for key in positive]
        for name in SECTIONS:  # each method section checks its own values (and what they need of the rest)
            section = getattr(self, name)
            checks += section.checks(self) if hasattr(section, "checks") else []
        checks += [
            (False, f"{prefix}.{name}", expected)
            for prefix, view in view_configs(self)
            for name, expected in view.problems()
        ]
        for ok, key, expected in checks:
            if not ok:
                raise UserError(f"config key {key} = {get_key(self, key)!r} must be {expected}")
        return self


# The whole run config: the shared sections, then every registered method's section (its own field).
Config = dataclasses.make_dataclass(
    "Config",
    [(name, section, field(default_factory=section)) for name, section in SECTIONS.items()],
    bases=(SharedConfig,),
    namespace={"__doc__": "The run config: SharedConfig's sections, then one per method section (SECTIONS)."},
)
Config.__module__ = __name__


def view_configs(node, prefix=""):
    """(dotted key, ViewConfig) of every augmentation pipeline in the config."""
    for item in dataclasses.fields(node):
        value = getattr(node, item.name)
        if isinstance(value, ViewConfig):
            yield f"{prefix}{item.name}", value
        elif dataclasses.is_dataclass(value):
            yield from view_configs(value, f"{prefix}{item.name}.")


def get_key(config, dotted):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _coerce(value, kind, key):
    """Check `value` against the field type `kind`; ints are accepted where floats are expected."""
    origin = typing.get_origin(kind)
    if origin in (list, list):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {key} must be a list, not {value!r}")
        (item,) = typing.get_args(kind)
        return [_coerce(v, item, key) for v in value]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # run.dir=2024 on the command line
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"config key {key} must be {kind.__name__}, not {value!r}")
    return value


def _merge(node, updates, prefix, source):
    """Set the fields of dataclass `node` from the nested dict `updates`."""
    if not isinstance(updates, dict):
        raise UserError(f"{source}: {prefix.rstrip('.') or 'the config'} must be a mapping, not {updates!r}")
    hints = typing.get_type_hints(type(node))
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(node))
            raise UserError(f"{source}: unknown config key {key} (known here: {known})")
        if dataclasses.is_dataclass(hints[name]):
            _merge(getattr(node, name), value, f"{key}.", source)
        else:
            setattr(node, name, _coerce(value, hints[name], key))


def parse_override(text):
    """`a.b=value` -> {"a": {"b": value}}, the value read as YAML (so 3, 1e-4, true, [0.9, 0.95] work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UserError(f"override {text!r} is not of the form key=value")
    nested = yaml.safe_load(raw) if raw.strip() else ""
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> SharedConfig:
    """Defaults, then the YAML file, then each override in order; validated."""
    config = Config()
    if path is not None:
        path = resolve_shipped(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise UserError(f"config file {path} does not exist") from None
        except yaml.YAMLError as error:
            raise UserError(f"{path} is not valid YAML: {error}") from None
        _merge(config, data, "", str(path))
    for text in overrides:
        _merge(config, parse_override(text), "", f"override {text!r}")
    return config.validate()


def to_dict(config: SharedConfig) -> dict:
    return dataclasses.asdict(config)


def dump_config(config: SharedConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)

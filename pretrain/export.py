"""lg-export: a run's encoder as a plain timm state_dict.

    lg-export RUN_DIR OUT.pth [--tag stepNNNNNNNNN]

ZeRO checkpoints (stages 1-3) are consolidated with DeepSpeed's zero_to_fp32 into full float32 weights;
a stage-0 checkpoint holds the module whole. The `encoder.` part of the objective is kept and checked by
loading it strictly into `timm.create_model(name, num_classes=0, img_size=..., patch_size=...)`, the
call printed at the end (with the defaults, 224 px and patch 16 / 14, it is just
`timm.create_model(name, num_classes=0)`). OUT.json records that call and the run it came from.
"""
import argparse
import contextlib
import io
import json
import logging
import os
from pathlib import Path

import torch

from data_prep.manifest import temporary_path
from pretrain import checkpoint
from pretrain.config import load_config
from pretrain.errors import UserError, check_writable, cli_entry
from pretrain.models import timm_name

ENCODER = "encoder."


def consolidated_state_dict(ckpt_dir, tag):
    """The objective's full float32 state_dict from checkpoint `tag`.

    Stages 0-2 keep the whole module (in the training dtype) in mp_rank_00_model_states.pt; that gives
    the frozen parameters and buffers. The float32 master weights of everything trained come from the
    ZeRO optimizer shards through zero_to_fp32, which also rebuilds ZeRO-3's partitioned frozen ones.
    """
    tag_dir = Path(ckpt_dir) / tag
    problem = checkpoint.problem_with(tag_dir)
    if problem:
        raise UserError(f"checkpoint {tag_dir} cannot be used: {problem}")
    state = {}
    module_states = tag_dir / "mp_rank_00_model_states.pt"
    if module_states.is_file():
        module = torch.load(module_states, map_location="cpu", weights_only=False)["module"]
        state = {name: tensor.float() for name, tensor in module.items()}
    if any(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress chatter
            state.update(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag))
    return state


def save_atomic(state, out):
    """torch.save `state` to `out` through a temporary file: a crash never leaves half a file there."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(out)
    torch.save(state, temporary)
    os.replace(temporary, out)


def export(run_dir, out, tag=None):
    """Write the encoder of `run_dir`'s checkpoint (latest by default) to `out`; return the timm kwargs."""
    import timm

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
    config = load_config(run_dir / "config.yaml")
    out = Path(out)
    check_writable(out, "lg-export: OUT")
    tag = tag or checkpoint.latest_tag(run_dir / "ckpt")
    if tag is None:
        raise UserError(f"{run_dir / 'ckpt'} holds no checkpoint yet")
    state = consolidated_state_dict(run_dir / "ckpt", tag)
    encoder = {name[len(ENCODER):]: tensor.contiguous() for name, tensor in state.items() if name.startswith(ENCODER)}
    kwargs = {"model_name": timm_name(config.model.arch), "num_classes": 0, "img_size": config.data.img_size,
              "patch_size": config.model.patch}
    model = timm.create_model(pretrained=False, **kwargs)
    model.load_state_dict(encoder, strict=True)
    save_atomic(encoder, out)
    info = {"timm": kwargs, "run_dir": str(run_dir), "checkpoint": tag, "method": config.method}
    out.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    return kwargs


@cli_entry("lg-export")
def main(argv=None):
    parser = argparse.ArgumentParser(prog="lg-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path, help="the .pth to write (a timm state_dict)")
    parser.add_argument("--tag", help="checkpoint tag (default: the run's latest)")
    args = parser.parse_args(argv)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    kwargs = export(args.run_dir, args.out, args.tag)
    call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k != "model_name")
    print(f"wrote {args.out}; load with timm.create_model({kwargs['model_name']!r}, {call})"
          f".load_state_dict(torch.load({str(args.out)!r}))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

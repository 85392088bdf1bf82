"""lg-export: a run's encoder as a plain timm state_dict.

    lg-export RUN_DIR OUT.pth [--tag stepNNNNNNNNN]

ZeRO checkpoints (stages 1-3) are consolidated with DeepSpeed's zero_to_fp32 into full float32 weights;
a stage-0 checkpoint holds the module whole. The `encoder.` part of the objective is kept and checked by
loading it strictly into `timm.create_model(name, num_classes=0, img_size=..., patch_size=...)`, the
call printed at the end (with the defaults, 224 px and patch 16 / 14, it is just
`timm.create_model(name, num_classes=0)`). OUT.json records that call and the run it came from.
"""

import argparse
import json
import logging
import os
from pathlib import Path

import torch

from pretrain.config import load_config
from pretrain.core import checkpoint
from pretrain.core.errors import UserError, check_writable, cli_entry
from pretrain.core.files import save_atomic
from pretrain.core.weights import consolidated_state_dict, encoder_state
from pretrain.models import timm_name


def export(run_dir: str | Path, out: str | Path, tag: str | None = None) -> dict:
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
    encoder = {name: tensor.contiguous() for name, tensor in encoder_state(state).items()}
    kwargs = {
        "model_name": timm_name(config.model.arch),
        "num_classes": 0,
        "img_size": config.data.img_size,
        "patch_size": config.model.patch,
    }
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
    print(
        f"wrote {args.out}; load with timm.create_model({kwargs['model_name']!r}, {call})"
        f".load_state_dict(torch.load({str(args.out)!r}))"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

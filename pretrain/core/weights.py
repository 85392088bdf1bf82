"""Reading encoder weights, wherever they were written: what grafting starts from and what evaluation
measures.

A source is a run directory of ours (its latest checkpoint, consolidated), a file written by lg-export
(a timm state_dict), or a checkpoint in MAE's release format (`{'model': sd}` with timm key names,
decoder keys alongside). MoCo-style files (`state_dict` with `module.` / `base_encoder.` prefixes) are
read as well. Keys that are not the encoder's (a decoder, mask token, heads) are ignored; a missing
encoder key or a shape that does not match is an error naming it. Every error starts with `what`, the
name the caller knows the source by (a config key, a command-line argument).
"""

import contextlib
import io
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from pretrain.core import checkpoint
from pretrain.core.distributed import rank
from pretrain.core.errors import UserError

log = logging.getLogger("lg-pretrain")
PREFIXES = ("module.", "base_encoder.", "encoder.")
ENCODER = "encoder."  # an objective's encoder parameters, as the engine's checkpoints name them


def consolidated_state_dict(ckpt_dir: str | Path, tag: str) -> dict[str, torch.Tensor]:
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
        # deepspeed is imported here, not at the top: lg-eval and lg-export on stage-0 runs never need it
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed's consolidation prints progress chatter on both streams.
        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            state.update(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag))
    return state


def encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `encoder.` part of an objective's state_dict, without the prefix."""
    return {k[len(ENCODER) :]: v for k, v in state.items() if k.startswith(ENCODER)}


def read_state_dict(source: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """The state_dict stored at `source` (run directory or file), with wrapper prefixes removed."""
    source = Path(source)
    if source.is_dir():
        tag = checkpoint.latest_tag(source / "ckpt")
        if tag is None:
            raise UserError(f"{what}: {source} has no checkpoint (no {source / 'ckpt' / 'latest'})")
        state = encoder_state(consolidated_state_dict(source / "ckpt", tag))
    elif source.is_file():
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as error:  # a pickle of anything else, a truncated file
            raise UserError(f"{what}: {source} is not a readable PyTorch checkpoint ({error})") from None
        for wrapper in ("model", "state_dict", "module"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    else:
        raise UserError(f"{what}: {source} does not exist")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{what}: {source} does not hold a state_dict")
    cleaned = {}
    for name, tensor in state.items():
        while name.startswith(PREFIXES):
            name = name.split(".", 1)[1]
        cleaned[name] = tensor
    return cleaned


def load_encoder_weights(
    encoder: torch.nn.Module,
    source: str | Path,
    fresh: Sequence[str] = (),
    state: dict[str, torch.Tensor] | None = None,
    what: str = "weights",
) -> int:
    """Copy the encoder weights from `source` (or its `state`, read already) into `encoder`, but for the
    keys starting with a prefix in `fresh`, which keep their initialization; return how many keys of
    `source` were ignored."""
    state = read_state_dict(source, what) if state is None else state
    expected = {
        name: tensor for name, tensor in encoder.state_dict().items() if not name.startswith(tuple(fresh))
    }
    for name, tensor in expected.items():
        if name not in state:
            raise UserError(f"{what}: {source} has no {name!r} (is it a ViT of this architecture?)")
        if state[name].shape != tensor.shape:
            raise UserError(
                f"{what}: {source}: {name} has shape {tuple(state[name].shape)}, this encoder "
                f"needs {tuple(tensor.shape)} (check model.arch, model.patch_size and data.img_size)"
            )
    missing = encoder.load_state_dict({name: state[name] for name in expected}, strict=False).missing_keys
    assert all(name.startswith(tuple(fresh)) for name in missing), missing
    ignored = sorted(set(state) - set(expected))
    if rank() == 0:
        log.info(
            "encoder initialized from %s (%d tensors; %d others ignored%s)",
            source,
            len(expected),
            len(ignored),
            f", e.g. {', '.join(ignored[:3])}" if ignored else "",
        )
    return len(ignored)

"""Starting weights for layer-grafted pretraining, and the optional L1 pull toward them.

The encoder can start from: a run directory of ours (its latest checkpoint, consolidated), a file
written by lg-export (a timm state_dict), or a checkpoint in MAE's release format (`{'model': sd}`
with timm key names, decoder keys alongside). MoCo-style files (`state_dict` with `module.` /
`base_encoder.` prefixes) are read as well. Keys that are not the encoder's (a decoder, mask token,
heads) are ignored; a missing encoder key or a shape that does not match is an error naming it.
"""
import logging
from pathlib import Path

import torch

from pretrain.distributed import rank
from pretrain.errors import UserError

log = logging.getLogger("lg-pretrain")
PREFIXES = ("module.", "base_encoder.", "encoder.")


def read_state_dict(source):
    """The state_dict stored at `source` (run directory or file), with wrapper prefixes removed."""
    source = Path(source)
    if source.is_dir():
        from pretrain import checkpoint
        from pretrain.export import consolidated_state_dict

        tag = checkpoint.latest_tag(source / "ckpt")
        if tag is None:
            raise UserError(f"graft.init: {source} has no checkpoint (no {source / 'ckpt' / 'latest'})")
        state = {k[len("encoder."):]: v for k, v in consolidated_state_dict(source / "ckpt", tag).items()
                 if k.startswith("encoder.")}
    elif source.is_file():
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as error:  # a pickle of anything else, a truncated file
            raise UserError(f"graft.init: {source} is not a readable PyTorch checkpoint ({error})") from None
        for wrapper in ("model", "state_dict", "module"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    else:
        raise UserError(f"graft.init: {source} does not exist")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"graft.init: {source} does not hold a state_dict")
    cleaned = {}
    for name, tensor in state.items():
        while name.startswith(PREFIXES):
            name = name.split(".", 1)[1]
        cleaned[name] = tensor
    return cleaned


def load_start_weights(encoder, source, fresh=(), state=None):
    """Copy the encoder weights from `source` (or its `state`, read already) into `encoder`, but for the
    keys starting with a prefix in `fresh`, which keep their initialization; return how many keys of
    `source` were ignored."""
    state = read_state_dict(source) if state is None else state
    expected = {name: tensor for name, tensor in encoder.state_dict().items() if not name.startswith(tuple(fresh))}
    for name, tensor in expected.items():
        if name not in state:
            raise UserError(f"graft.init: {source} has no {name!r} (is it a ViT of this architecture?)")
        if state[name].shape != tensor.shape:
            raise UserError(f"graft.init: {source}: {name} has shape {tuple(state[name].shape)}, this encoder "
                            f"needs {tuple(tensor.shape)} (check model.arch, model.patch_size and data.img_size)")
    missing = encoder.load_state_dict({name: state[name] for name in expected}, strict=False).missing_keys
    assert all(name.startswith(tuple(fresh)) for name in missing), missing
    ignored = sorted(set(state) - set(expected))
    if rank() == 0:
            log.info("encoder initialized from %s (%d tensors; %d others ignored%s)", source, len(expected),
                 len(ignored), f", e.g. {', '.join(ignored[:3])}" if ignored else "")
    return len(ignored)


class L1Pull(torch.nn.Module):
    """weight * sum |w - w_start| over chosen parameters: keeps the grafted lower layers near where they
    started (the official ViT-L recipe: 1e-5 over the patch embedding and blocks 0-11).

    The starting values are buffers outside the engine's optimizer. The pull reads whole parameters,
    so it needs ZeRO stage <= 2 (the trainer refuses it under ZeRO-3).
    """

    def __init__(self, named_params, weight):
        super().__init__()
        self.weight, self.params = weight, [p for _, p in named_params]
        object.__setattr__(self, "start", [p.detach().clone().float() for p in self.params])  # not in state_dict

    def forward(self):
        if self.start[0].device != self.params[0].device:
            object.__setattr__(self, "start", [s.to(self.params[0].device) for s in self.start])
        return self.weight * sum((p.float() - s).abs().sum() for p, s in zip(self.params, self.start))

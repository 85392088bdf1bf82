"""Self-supervised objectives, and supervised fine-tuning and linear probing. Each is an `Objective` built
from the config;
the engine knows no method."""

from pretrain.methods.base import Objective
from pretrain.methods.byol import BYOL
from pretrain.methods.cmae import CMAE
from pretrain.methods.conmim import ConMIM
from pretrain.methods.finetune import FineTune
from pretrain.methods.hybrid import Hybrid
from pretrain.methods.linprobe import LinearProbe
from pretrain.methods.mae import MAE
from pretrain.methods.mocov3 import MoCoV3
from pretrain.methods.simclr import SimCLR
from pretrain.methods.simmim import SimMIM
from pretrain.methods.simsiam import SimSiam

OBJECTIVES = {
    "mae": MAE,
    "mocov3": MoCoV3,
    "hybrid": Hybrid,
    "simclr": SimCLR,
    "byol": BYOL,
    "simsiam": SimSiam,
    "simmim": SimMIM,
    "cmae": CMAE,
    "conmim": ConMIM,
    "finetune": FineTune,
    "linprobe": LinearProbe,
}


def build_objective(config) -> Objective:
    """The method of `config`, as its `from_config` builds it (grafting's starting weights and L1 pull are
    pretrain.graft.start_weights.grafted_objective's)."""
    return OBJECTIVES[config.method].from_config(config)


__all__ = ["Objective", "OBJECTIVES", "build_objective"]

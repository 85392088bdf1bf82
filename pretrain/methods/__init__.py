"""Self-supervised objectives, and supervised fine-tuning and linear probing. Each is an `Objective` built from the config;
the engine knows no method."""
from pretrain.grafting import L1Pull, load_start_weights
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
from pretrain.param_groups import layer_id

OBJECTIVES = {"mae": MAE, "mocov3": MoCoV3, "hybrid": Hybrid, "simclr": SimCLR, "byol": BYOL, "simsiam": SimSiam,
              "simmim": SimMIM, "cmae": CMAE, "conmim": ConMIM,
              "finetune": FineTune, "linprobe": LinearProbe}


def build_objective(config):
    """The method of `config`, with grafting's starting weights and L1 pull when configured."""
    objective = OBJECTIVES[config.method].from_config(config)
    graft = config.graft
    if graft.init:
        load_start_weights(objective.encoder, graft.init, fresh=objective.fresh_weights)
        objective.on_encoder_loaded()
    if graft.l1_weight > 0:
        depth = len(objective.encoder.blocks)
        pulled = [(name, p) for name, p in objective.named_parameters()
                  if p.requires_grad and layer_id(name, depth) <= graft.l1_to_layer]
        objective.l1_pull = L1Pull(pulled, graft.l1_weight)
    return objective


__all__ = ["Objective", "OBJECTIVES", "build_objective"]

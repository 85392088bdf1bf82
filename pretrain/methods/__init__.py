"""Self-supervised objectives. Each is an `Objective` built from the config; the engine knows no method."""
from pretrain.methods.base import Objective
from pretrain.methods.mae import MAE
from pretrain.methods.mocov3 import MoCoV3

OBJECTIVES = {"mae": MAE, "mocov3": MoCoV3}


def build_objective(config):
    return OBJECTIVES[config.method].from_config(config)


__all__ = ["Objective", "OBJECTIVES", "build_objective"]

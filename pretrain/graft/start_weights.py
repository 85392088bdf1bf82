"""The objective a run trains: its method's, started from graft.init's weights and pulled toward them
when configured. The engine, lg-pretrain --print-param-groups and the linear probe's frozen-weight
check all build it here, so they start from the same weights."""

from pretrain.core.weights import load_encoder_weights
from pretrain.graft.l1_pull import L1Pull
from pretrain.graft.param_groups import layer_id, lr_scale_rule
from pretrain.methods import Objective, build_objective


def grafted_objective(config) -> Objective:
    """The method of `config`, with grafting's starting weights, the layers the rule gives lr_scale 0
    frozen (graft.rule=freeze), and the L1 pull when configured."""
    objective = build_objective(config)
    graft = config.graft
    if graft.init:
        load_encoder_weights(objective.encoder, graft.init, fresh=objective.fresh_weights, what="graft.init")
        objective.on_encoder_loaded()
    depth = len(objective.encoder.blocks)
    scale = lr_scale_rule(config, depth)
    for name, param in objective.named_parameters():
        if scale(layer_id(name, depth)) == 0:
            param.requires_grad_(False)
    if graft.l1_weight > 0:
        pulled = [
            (name, p)
            for name, p in objective.named_parameters()
            if p.requires_grad and layer_id(name, depth) <= graft.l1_to_layer
        ]
        objective.l1_pull = L1Pull(pulled, graft.l1_weight)
    return objective

"""Self-supervised objectives, and supervised fine-tuning and linear probing: one file each.

Importing this package imports every module in it, so each method's file registers its Objective
(`@register`) and its config section (`@config_section`); adding a method is adding a file. The engine
knows no method: it asks OBJECTIVES[config.method].
"""

import importlib
import pkgutil

from pretrain.methods.base import OBJECTIVES, SECTIONS, Objective

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_objective(config) -> Objective:
    """The method of `config`, as its `from_config` builds it (grafting's starting weights and L1 pull are
    pretrain.graft.start_weights.grafted_objective's)."""
    return OBJECTIVES[config.method].from_config(config)


__all__ = ["OBJECTIVES", "SECTIONS", "Objective", "build_objective"]

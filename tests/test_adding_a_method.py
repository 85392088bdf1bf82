"""Adding a method is adding one file to pretrain/methods/: its config section, its Objective, nothing else.

The test copies the package, drops a toy method's file into the copy and uses it as a user would: the
config knows its section and checks it, the method builds, trains a step and its section decides
what a resumed run may not change."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

TOY = '''
"""A toy method: the scaled mean square of the class token."""
from pretrain.data.views import Configured, single_view, mae_recipe
from pretrain.methods.base import Objective, config_section, register
from pretrain.models import encoder_for


@config_section("toy")
class ToyConfig:
    scale: float = 1.0

    def checks(self, config):
        return [(self.scale > 0, "toy.scale", "positive")]


@register("toy")
class Toy(Objective):
    config_sections = ("toy",)

    def __init__(self, encoder, scale=1.0):
        super().__init__()
        self.encoder, self.scale = encoder, scale

    @classmethod
    def from_config(cls, config):
        toy = cls(encoder_for(config), scale=config.toy.scale)
        toy.view = Configured(single_view, mae_recipe())
        return toy

    def forward(self, images):
        return self.regularized({"loss": self.scale * self.encoder(images).pow(2).mean()})
'''

USE = """
import json, torch
from pretrain.config import load_config, to_dict
from pretrain.core.errors import UserError
from pretrain.graft.start_weights import grafted_objective
from pretrain.training.resume import check_resumable
tiny = ["model.arch=vit_tiny", "model.patch_size=8", "data.img_size=32"]
config = load_config(None, ["method=toy", "toy.scale=2", *tiny])
objective = grafted_objective(config)
loss = objective(torch.randn(2, 3, 32, 32))["loss"]
loss.backward()
errors = {}
for override in ("toy.scale=-1", "toy.size=3"):
    try:
        load_config(None, ["method=toy", override, *tiny])
    except UserError as error:
        errors[override] = str(error)
saved = {"world_size": 1, "config": to_dict(load_config(None, ["method=toy", "toy.scale=3", *tiny]))}
try:
    check_resumable(saved, config, 1)
except UserError as error:
    errors["resume"] = str(error)
mae = load_config(None, ["method=mae", *tiny])
check_resumable({"world_size": 1, "config": saved["config"] | {"method": "mae"}}, mae, 1)
print(json.dumps({"loss": loss.item(), "scale": config.toy.scale, "errors": errors,
                  "trained": objective.encoder.blocks[0].attn.qkv.weight.grad is not None}))
"""


@pytest.fixture(scope="module")
def with_toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_method")
    shutil.copytree(REPO / "pretrain", root / "pretrain", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "pretrain" / "methods" / "toy.py").write_text(textwrap.dedent(TOY))
    return root


def test_a_new_methods_file_is_all_the_config_the_objective_and_resume_need(with_toy):
    result = subprocess.run(
        [sys.executable, "-c", USE],
        cwd=with_toy,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(with_toy), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["scale"] == 2.0 and found["loss"] > 0 and found["trained"]
    assert found["errors"]["toy.scale=-1"] == "config key toy.scale = -1.0 must be positive"
    assert "unknown config key toy.size (known here: scale)" in found["errors"]["toy.size=3"]
    assert "the config differs from the checkpoint's (toy.scale: 3.0 -> 2.0)" in found["errors"]["resume"]

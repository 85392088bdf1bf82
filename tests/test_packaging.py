"""A non-editable install (a wheel, as `pip install .` builds it) runs without the source checkout:
configs/ and ds_configs/ come inside the package."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

SOURCES = (
    "setup.py",
    "setup.cfg",
    "pyproject.toml",
    "README.md",
    "pretrain",
    "data_prep",
    "slurm",
    "configs",
    "ds_configs",
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The project installed with pip from a copy of its sources (so no build/ lands in the checkout) into a
    folder of its own; the dependencies are this environment's."""
    root = tmp_path_factory.mktemp("wheel")
    source, target = root / "source", root / "site"
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        timeout=600,
        capture_output=True,
    )
    return root, target


def run_installed(root, target, code):
    """`python -c code` that imports the installed copy, from a folder with no configs/ in it."""
    env = {**os.environ, "PYTHONPATH": str(target)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_the_wheel_carries_every_config_and_ds_config(installed):
    _, target = installed
    for folder in ("configs", "ds_configs"):
        shipped = sorted(p.name for p in (target / "pretrain" / "shipped" / folder).iterdir())
        assert shipped == sorted(p.name for p in (REPO / folder).iterdir())


@pytest.mark.slow
def test_an_installed_copy_reads_the_shipped_configs_without_a_checkout(installed):
    root, target = installed
    code = (
        "import pretrain, json\n"
        "from pretrain.config import load_config\n"
        "from pretrain.core.shipped import resolve_shipped, shipped_root\n"
        "config = load_config('configs/mae_vit_l.yaml')\n"
        "ds = resolve_shipped(config.deepspeed.config)\n"
        "found = [pretrain.__file__, str(shipped_root()), config.model.arch, str(ds), ds.is_file()]\n"
        "print(json.dumps(found))\n"
    )
    result = run_installed(root, target, code)
    assert result.returncode == 0, result.stderr[-2000:]
    module, shipped, arch, ds, found = json.loads(result.stdout.splitlines()[-1])
    assert module.startswith(str(target)) and shipped == str(target / "pretrain" / "shipped")
    assert (
        arch == "vit_large"
        and ds == str(target / "pretrain" / "shipped" / "ds_configs" / "zero1.json")
        and found
    )
    missing = run_installed(
        root, target, "from pretrain.config import load_config; load_config('configs/nope.yaml')"
    )
    assert "config file configs/nope.yaml does not exist" in missing.stderr

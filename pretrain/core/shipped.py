"""The run configurations (configs/) and DeepSpeed configurations (ds_configs/) that ship with layergraft.

They are read from the source checkout when running from one (an editable install, `python -m` in the
repository), and otherwise from the copies a wheel carries inside the package: setup.py copies both
folders to pretrain/shipped/ when it builds one. A relative path such as `configs/mae_vit_l.yaml` or
`ds_configs/zero1.json` that does not exist where the command runs names the shipped file.
"""

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # pretrain/
CHECKOUT = PACKAGE.parent
FOLDERS = ("configs", "ds_configs")


def shipped_root() -> Path:
    """The folder that holds configs/ and ds_configs/: the checkout's, else the installed package's."""
    if (CHECKOUT / "setup.cfg").is_file() and all((CHECKOUT / folder).is_dir() for folder in FOLDERS):
        return CHECKOUT
    return PACKAGE / "shipped"


def resolve_shipped(path) -> Path:
    """`path` itself when it exists (or is absolute, or not under configs/ or ds_configs/); else the shipped
    file of that name when there is one."""
    path = Path(path)
    if path.exists() or path.is_absolute() or not path.parts or path.parts[0] not in FOLDERS:
        return path
    shipped = shipped_root() / path
    return shipped if shipped.exists() else path

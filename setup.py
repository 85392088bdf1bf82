"""Everything is in setup.cfg; this file only makes wheels carry configs/ and ds_configs/.

Both folders stay at the top of the repository, where users edit and read them. A wheel copies them into
the package (pretrain/shipped/), where pretrain.core.shipped finds them when there is no checkout.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("configs", "ds_configs")


class BuildPyWithConfigs(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads them from the checkout
            return
        for folder in SHIPPED:
            shutil.copytree(
                Path(folder), Path(self.build_lib) / "pretrain" / "shipped" / folder, dirs_exist_ok=True
            )


setup(cmdclass={"build_py": BuildPyWithConfigs})

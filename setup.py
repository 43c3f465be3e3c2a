"""Build hook: copy the top-level declarative artifacts into the wheel as ``rankwatch/_assets``.

They stay at the top of the repository (promtool, Grafana provisioning and docker compose read
them there); ``rankwatch.assets`` finds them in either place.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
ASSET_DIRS = ("alerts", "docs/runbooks", "dashboards", "examples")


class BuildPyWithAssets(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout itself
            return
        for rel in ASSET_DIRS:
            src = ROOT / rel
            if not src.is_dir():
                continue
            dst = Path(self.build_lib) / "rankwatch" / "_assets" / rel
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "wandb"))


setup(cmdclass={"build_py": BuildPyWithAssets})

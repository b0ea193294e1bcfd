"""The one thing pyproject.toml cannot say: the packages found on disk *plus* conf/ shipped as ``petuner.conf``.

The config groups stay at the top of the repository (conf/) and travel inside the wheel, where Hydra reads them
as ``pkg://petuner.conf`` from any working directory. Each group folder is listed as a (data-only) package.
"""

from pathlib import Path

from setuptools import find_packages, setup

GROUPS = sorted(p.name for p in Path(__file__).parent.joinpath("conf").iterdir() if p.is_dir() and p.name[0] != "_")
CONF = ["petuner.conf", *(f"petuner.conf.{group}" for group in GROUPS)]

setup(
    packages=[*find_packages(include=["petuner*"]), *CONF],
    package_dir={"petuner.conf": "conf"},
    package_data={package: ["*.yaml"] for package in CONF},
)

"""Package discovery for aiaas's mapped layout (everything else is in pyproject.toml).

The distribution's top-level folders are subpackages of ``aiaas`` (``operator/`` is ``aiaas.operator``: it
cannot be a top-level import, it would shadow the standard library). setuptools' ``packages.find`` does not
follow a ``package-dir`` mapping, so a hand-written list once left ``aiaas.operator.render`` out of the wheel.
Here every package below each mapped folder is found, so a new subpackage cannot be missed
(tests/test_wheel.py builds the wheel and compares its modules with the source tree).
"""

import os

from setuptools import find_packages, setup

# import name -> folder (the one place this mapping is written)
PACKAGE_DIRS = {
    "aiaas": "aiaas",
    "aiaas.contract": "contract",
    "aiaas.operator": "operator",
    "aiaas.trainer": "trainer",
    "aiaas.server": "server",
}


def present() -> dict[str, str]:
    """The mapped folders in this tree (the operator image builds from a tree without trainer/ and server/)."""
    return {name: folder for name, folder in PACKAGE_DIRS.items() if os.path.isdir(folder)}


def all_packages(dirs: dict[str, str]) -> list[str]:
    found = list(dirs)
    for name, folder in dirs.items():
        found += [f"{name}.{sub}" for sub in find_packages(where=folder)]
    return found


setup(package_dir=present(), packages=all_packages(present()))

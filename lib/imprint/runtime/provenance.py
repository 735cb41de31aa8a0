"""Provenance of a run: git SHA and dirty flag, package versions, device, host."""

from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

PACKAGES = ("imprint", "torch", "numpy", "scipy", "scikit-learn", "transformers", "peft", "diffusers",
            "kornia", "papermill", "jupyter-book")


def repo_root() -> Path:
    """The project root: ``$IMPRINT_ROOT`` if set, else the folder holding ``pyproject.toml`` and
    ``notebooks/`` above this package, else the working directory."""
    import os

    if os.environ.get("IMPRINT_ROOT"):
        return Path(os.environ["IMPRINT_ROOT"])
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "notebooks").is_dir():
            return parent
    return Path.cwd()


def git_state(root: Path | None = None) -> dict:
    """SHA and dirty flag, from git; or the values of ``IMPRINT_GIT_SHA`` / ``IMPRINT_GIT_DIRTY`` when set.

    The variables are for copies of the tree shipped to a GPU node: whoever made the copy knows the commit,
    while the copy may have no .git or one whose HEAD is not the commit whose files it holds, so they win.
    """
    import os

    if os.environ.get("IMPRINT_GIT_SHA"):
        return {"sha": os.environ["IMPRINT_GIT_SHA"], "dirty": os.environ.get("IMPRINT_GIT_DIRTY", "0") == "1"}
    root = root or repo_root()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, check=True, timeout=10).stdout.strip())
        return {"sha": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


@lru_cache(maxsize=1)
def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def collect(device: str | None = None) -> dict:
    from imprint.runtime.devices import describe_device

    return {"git": git_state(), "versions": package_versions(), "device": describe_device(device),
            "host": platform.node()}

"""Resumable work: numbered checkpoints of tensors plus JSON metadata, verified on load.

A long loop (training steps, generations, partitions) saves its state after each completed unit;
restarted, it asks :meth:`Checkpointer.latest` for the last *valid* unit and continues from there.
Each checkpoint is a safetensors file written atomically, followed by its sha256 in a sidecar file: a
checkpoint without a matching digest (a crash between the two writes, a corrupted disk) is reported and
ignored, so the unit is recomputed rather than silently reused.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from imprint.runtime.io import atomic_save_tensors, atomic_write_text, load_tensors, sha256_file

_NAME = re.compile(r"^unit-(\d{8})\.safetensors$")


@dataclass(frozen=True)
class Checkpoint:
    unit: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def keyed_dir(base: str | Path, **config: Any) -> Path:
    """``base/<digest of config>``: a checkpoint folder per configuration, so that a rerun with other
    parameters starts afresh while a rerun with the same ones resumes."""
    import hashlib

    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(base) / digest


class Checkpointer:
    """Checkpoints ``unit-00000042.safetensors`` in ``folder``; keeps the last ``keep`` (None: all)."""

    def __init__(self, folder: str | Path, keep: int | None = 2):
        self.folder = Path(folder)
        self.keep = keep

    def _path(self, unit: int) -> Path:
        return self.folder / f"unit-{unit:08d}.safetensors"

    def save(self, unit: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> Path:
        path = atomic_save_tensors(self._path(unit), tensors, {"meta": dict(meta or {}), "unit": unit})
        atomic_write_text(path.with_suffix(".sha256"), sha256_file(path) + "\n")
        self._prune()
        return path

    def units(self) -> list[int]:
        """Units that have a checkpoint file (valid or not), ascending."""
        if not self.folder.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def is_valid(self, unit: int) -> bool:
        path = self._path(unit)
        digest = path.with_suffix(".sha256")
        if not path.is_file() or not digest.is_file():
            return False
        return digest.read_text().strip() == sha256_file(path)

    def load(self, unit: int, device: str | torch.device = "cpu") -> Checkpoint | None:
        """The checkpoint of ``unit``, or None (with a warning when a file exists but fails its check)."""
        path = self._path(unit)
        if not path.exists():
            return None
        if not self.is_valid(unit):
            warnings.warn(f"checkpoint {path} is incomplete or corrupted (sha256 mismatch); "
                          f"unit {unit} will be recomputed", RuntimeWarning, stacklevel=2)
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
        return Checkpoint(unit, load_tensors(path, device), meta)

    def latest(self, device: str | torch.device = "cpu", max_unit: int | None = None) -> Checkpoint | None:
        """The newest valid checkpoint (of a unit <= ``max_unit`` if given), or None when there is none."""
        for unit in reversed([u for u in self.units() if max_unit is None or u <= max_unit]):
            ckpt = self.load(unit, device)
            if ckpt is not None:
                return ckpt
        return None

    def _prune(self) -> None:
        if self.keep is None:
            return
        for unit in self.units()[: -self.keep]:
            for suffix in (".safetensors", ".sha256"):
                self._path(unit).with_suffix(suffix).unlink(missing_ok=True)

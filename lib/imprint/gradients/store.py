"""A partitioned on-disk store of per-example tensors, for the gradient-similarity chapter (03).

A store is a folder: ``manifest.json`` (the number of rows and a *spec*: everything that determines the
stored numbers, such as the model, the data fingerprint, the projection seed and dimensions) and one
safetensors file per partition ``[start, end)`` of the rows, ``part-0000000-0000064.safetensors``.
Every tensor of a partition has ``end - start`` rows, except the *shared* tensors named in the spec,
which every partition carries whole and which must agree across partitions (up to float32 rounding).

Partitions are independent: separate processes (Dask tasks, cluster jobs) can fill disjoint ranges of
the same folder, or of separate folders that :func:`merge_stores` joins afterwards. A partition file is
written to a temporary name and then hard-linked to its final name, which fails if the name exists:
nothing stored is ever overwritten, and a reader sees a partition whole or not at all. Each file records
the sha256 of its tensors, checked on load, and the seconds spent computing it, so that
:meth:`GradientStore.seconds` gives the compute time of a store filled over several runs.
:func:`fill_partitions` computes the rows of a range that no stored partition covers, so a killed run
resumes at the first unfinished partition, and because a partition's numbers depend only on its rows,
the resumed store holds identical numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from imprint.runtime.checks import require_int
from imprint.runtime.io import atomic_write_json

FORMAT = "imprint-partitioned-store/1"
_PART = re.compile(r"^part-(\d{7})-(\d{7})\.safetensors$")


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _canonical(spec: Mapping[str, Any]) -> dict:
    return json.loads(json.dumps(spec, sort_keys=True))


def _agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Shared tensors recomputed by separate partitions: equal up to float32 rounding."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    scale = float(a.abs().max()) if a.numel() else 0.0
    return torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6 * scale)


def check_range(start: int, end: int, n_rows: int, what: str = "partition range") -> tuple[int, int]:
    """``[start, end)`` within ``[0, n_rows)`` and non-empty, or a ``ValueError`` naming the range."""
    require_int("start", start)
    require_int("end", end)
    if not 0 <= start < end <= n_rows:
        raise ValueError(f"{what} [start={start}, end={end}): expected 0 <= start < end <= {n_rows} "
                         f"(the dataset has {n_rows} rows)")
    return start, end


class GradientStore:
    """Partitions of per-example tensors in ``root`` (see the module docstring).

    Opening a folder that already holds a store with a different ``n_rows`` or ``spec`` raises a
    ``ValueError``: the stored numbers were computed differently and are neither mixed nor replaced.
    """

    def __init__(self, root: str | Path, n_rows: int, spec: Mapping[str, Any], shared: Sequence[str] = ()):
        self.root = Path(root)
        self.n_rows = require_int("n_rows", n_rows, minimum=1)
        self.shared_prefixes = tuple(shared)
        self.spec = _canonical({**spec, "shared": list(shared)})
        manifest = {"format": FORMAT, "n_rows": self.n_rows, "spec": self.spec}
        path = self.root / "manifest.json"
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored != manifest:
                changed = sorted(k for k in set(stored.get("spec", {})) | set(self.spec)
                                 if stored.get("spec", {}).get(k) != self.spec.get(k))
                if stored.get("n_rows") != self.n_rows:
                    changed.append("n_rows")
                raise ValueError(f"store {str(self.root)!r} holds results computed with different settings "
                                 f"({', '.join(changed) or 'format'}); use another folder or remove it by hand")
        else:
            atomic_write_json(path, manifest)

    @classmethod
    def open(cls, root: str | Path) -> "GradientStore":
        """An existing store, with the settings of its manifest."""
        path = Path(root) / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"root={str(root)!r}: no store here (manifest.json is missing)")
        stored = json.loads(path.read_text())
        spec = dict(stored["spec"])
        shared = spec.pop("shared", [])
        return cls(root, stored["n_rows"], spec, shared)

    def _path(self, start: int, end: int) -> Path:
        return self.root / f"part-{start:07d}-{end:07d}.safetensors"

    def partitions(self) -> list[tuple[int, int]]:
        """Stored partitions, sorted by start."""
        found = (_PART.match(p.name) for p in self.root.iterdir()) if self.root.is_dir() else ()
        return sorted((int(m.group(1)), int(m.group(2))) for m in found if m)

    def has(self, start: int, end: int) -> bool:
        return self._path(start, end).is_file()

    def _is_shared(self, key: str) -> bool:
        return key.startswith(self.shared_prefixes) if self.shared_prefixes else False

    def write(self, start: int, end: int, tensors: Mapping[str, torch.Tensor], seconds: float | None = None) -> Path:
        """Store partition ``[start, end)``; refuses overlaps with stored partitions and never overwrites.

        ``seconds``: the time spent computing it, recorded in the file (see :meth:`seconds`).
        """
        check_range(start, end, self.n_rows)
        if seconds is not None and not (isinstance(seconds, (int, float)) and seconds >= 0):
            raise ValueError(f"seconds={seconds!r}: expected a non-negative number or None")
        if not tensors:
            raise ValueError("tensors is empty: a partition needs at least one tensor")
        for key, value in tensors.items():
            if not self._is_shared(key) and (value.ndim == 0 or value.shape[0] != end - start):
                raise ValueError(f"tensor {key!r} has shape {tuple(value.shape)}: expected {end - start} rows "
                                 f"for partition [{start}, {end})")
        for s, e in self.partitions():
            if s < end and start < e:
                raise FileExistsError(f"partition [{start}, {end}) overlaps the stored partition [{s}, {e}) "
                                      f"in {str(self.root)!r}; stored partitions are never overwritten")
        data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        meta = {"start": str(start), "end": str(end), "sha256": _digest(data)}
        if seconds is not None:
            meta["seconds"] = repr(float(seconds))
        final = self._path(start, end)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=self.root)
        os.close(fd)
        try:
            save_file(data, tmp, metadata=meta)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.link(tmp, final)  # fails if the name exists: no overwrite, even between processes
        finally:
            os.unlink(tmp)
        return final

    def read(self, start: int, end: int) -> dict[str, torch.Tensor]:
        """One partition, verified against its recorded sha256."""
        path = self._path(start, end)
        if not path.is_file():
            raise FileNotFoundError(f"partition [{start}, {end}) is not stored in {str(self.root)!r}")
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
        if meta.get("sha256") != _digest(tensors):
            raise ValueError(f"{path}: contents do not match the recorded sha256 (corrupted file); "
                             "delete it to recompute the partition")
        return tensors

    def seconds(self) -> float | None:
        """Compute seconds summed over the stored partitions; ``None`` if one of them did not record its time."""
        total = 0.0
        for s, e in self.partitions():
            with safe_open(str(self._path(s, e)), framework="pt") as fh:
                recorded = (fh.metadata() or {}).get("seconds")
            if recorded is None:
                return None
            total += float(recorded)
        return total

    def coverage(self) -> list[tuple[int, int]]:
        """The ranges of rows not stored yet."""
        gaps, cursor = [], 0
        for s, e in self.partitions():
            if s > cursor:
                gaps.append((cursor, s))
            cursor = max(cursor, e)
        if cursor < self.n_rows:
            gaps.append((cursor, self.n_rows))
        return gaps

    def is_complete(self) -> bool:
        return not self.coverage()

    def stored_rows(self) -> torch.Tensor:
        """Indices of the rows that stored partitions cover, ascending."""
        return torch.cat([torch.arange(s, e) for s, e in self.partitions()] or [torch.zeros(0, dtype=torch.long)])

    def load(self, keys: Iterable[str] | None = None, partial: bool = False) -> dict[str, torch.Tensor]:
        """All rows, partitions concatenated in order; shared tensors checked equal across partitions.

        With ``partial`` the rows of the stored partitions only (see :meth:`stored_rows`); otherwise an
        incomplete store is an error.
        """
        gaps = self.coverage()
        if gaps and not partial:
            raise ValueError(f"store {str(self.root)!r} is incomplete: rows {gaps} are not stored yet")
        if not self.partitions():
            raise ValueError(f"store {str(self.root)!r} holds no partition yet")
        wanted = set(keys) if keys is not None else None
        rows: dict[str, list[torch.Tensor]] = {}
        shared: dict[str, torch.Tensor] = {}
        for s, e in self.partitions():
            for key, value in self.read(s, e).items():
                if wanted is not None and key not in wanted:
                    continue
                if self._is_shared(key):
                    if key in shared and not _agree(shared[key], value):
                        raise ValueError(f"shared tensor {key!r} differs between partitions of {str(self.root)!r}")
                    shared.setdefault(key, value)
                else:
                    rows.setdefault(key, []).append(value)
        if wanted is not None and wanted - set(rows) - set(shared):
            raise KeyError(f"keys {sorted(wanted - set(rows) - set(shared))[:3]} are not in the store")
        return {**{k: torch.cat(v) for k, v in rows.items()}, **shared}


def plan_partitions(start: int, end: int, partition_size: int, n_rows: int) -> list[tuple[int, int]]:
    """``[start, end)`` cut into consecutive partitions of ``partition_size`` rows (the last may be shorter)."""
    check_range(start, end, n_rows)
    require_int("partition_size", partition_size, minimum=1)
    return [(s, min(s + partition_size, end)) for s in range(start, end, partition_size)]


def fill_partitions(store: GradientStore, start: int, end: int, partition_size: int,
                    compute: Callable[[int, int], Mapping[str, torch.Tensor]], progress: bool | None = None,
                    desc: str = "partitions") -> list[tuple[int, int]]:
    """Compute and write the rows of ``[start, end)`` that no stored partition covers; return what was computed.

    ``progress`` None shows a bar unless ``TQDM_DISABLE`` is set, as the runner sets it under papermill.

    Each uncovered stretch is cut into partitions of ``partition_size`` rows from its first row. A run
    killed after some partitions therefore resumes at the first unfinished one with the partitions it
    would have computed anyway, and runs over different ranges (or with different sizes) only ever add
    the rows still missing. Each partition records the seconds its ``compute`` took.
    """
    check_range(start, end, store.n_rows)
    require_int("partition_size", partition_size, minimum=1)
    todo = []
    for gap_start, gap_end in store.coverage():
        lo, hi = max(gap_start, start), min(gap_end, end)
        if lo < hi:
            todo += plan_partitions(lo, hi, partition_size, store.n_rows)
    for s, e in tqdm(todo, desc=desc, **({} if progress is None else {"disable": not progress})):
        t0 = time.perf_counter()
        tensors = compute(s, e)
        store.write(s, e, tensors, seconds=time.perf_counter() - t0)
    return todo


def merge_stores(destination: str | Path, sources: Sequence[str | Path]) -> GradientStore:
    """Copy the partitions of ``sources`` into ``destination`` (created with their settings if absent).

    All stores must have equal settings; partitions already in ``destination`` with the same bounds must
    hold the same numbers (checked by digest), and no two partitions may overlap.
    """
    if not sources:
        raise ValueError("sources is empty: expected at least one store to merge")
    opened = [GradientStore.open(s) for s in sources]
    first = opened[0]
    for other in opened[1:]:
        if other.spec != first.spec or other.n_rows != first.n_rows:
            raise ValueError(f"stores {str(first.root)!r} and {str(other.root)!r} hold results computed with "
                             "different settings; they cannot be merged")
    spec = dict(first.spec)
    shared = spec.pop("shared", [])
    target = GradientStore(destination, first.n_rows, spec, shared)
    for source in opened:
        if source.root.resolve() == target.root.resolve():
            continue
        for s, e in source.partitions():
            src = source._path(s, e)
            if target.has(s, e):
                if _digest(target.read(s, e)) != _digest(source.read(s, e)):
                    raise ValueError(f"partition [{s}, {e}) differs between {str(source.root)!r} and "
                                     f"{str(target.root)!r}")
                continue
            overlap = [(a, b) for a, b in target.partitions() if a < e and s < b]
            if overlap:
                raise FileExistsError(f"partition [{s}, {e}) of {str(source.root)!r} overlaps {overlap[:2]} "
                                      f"in {str(target.root)!r}")
            source.read(s, e)  # verify the digest before copying
            fd, tmp = tempfile.mkstemp(prefix=f".{src.name}.", suffix=".tmp", dir=target.root)
            os.close(fd)
            try:
                shutil.copyfile(src, tmp)
                os.link(tmp, target._path(s, e))
            finally:
                os.unlink(tmp)
    return target

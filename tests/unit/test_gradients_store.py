"""The partitioned gradient store: round trips, no overwrites, resume after a kill with identical numbers,
separate processes merged, corruption and bad ranges detected before any compute."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from imprint.gradients.store import GradientStore, fill_partitions, merge_stores, plan_partitions

SPEC = {"model": "tiny", "proj_dims": [4], "seed": 0}


def rows(start, end):
    """A deterministic function of the rows only, like a partition of projected gradients."""
    g = torch.Generator().manual_seed(1234)
    table = torch.randn(20, 3, generator=g)
    return {"k4/w": table[start:end] * 2.0, "norm": table[start:end].square().sum(1), "query/shared": table[:5, 0]}


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_write_read_load_round_trip(tmp_path):
    store = GradientStore(tmp_path / "s", 20, SPEC, shared=["query/"])
    for s, e in [(10, 20), (0, 10)]:
        store.write(s, e, rows(s, e))
    assert store.partitions() == [(0, 10), (10, 20)] and store.is_complete()
    loaded = store.load()
    full = rows(0, 20)
    for key in full:
        assert torch.equal(loaded[key], full[key])
    assert set(store.load(["norm"])) == {"norm"}


def test_stored_partitions_are_never_overwritten(tmp_path):
    store = GradientStore(tmp_path / "s", 20, SPEC)
    store.write(0, 8, {"x": torch.zeros(8)})
    before = snapshot(store.root)
    with pytest.raises(FileExistsError, match="never overwritten"):
        store.write(0, 8, {"x": torch.ones(8)})
    with pytest.raises(FileExistsError, match="overlaps"):
        store.write(4, 12, {"x": torch.ones(8)})
    assert snapshot(store.root) == before


def test_settings_mismatch_is_refused_and_leaves_the_store_alone(tmp_path):
    store = GradientStore(tmp_path / "s", 20, SPEC)
    store.write(0, 5, {"x": torch.zeros(5)})
    before = snapshot(store.root)
    with pytest.raises(ValueError, match="proj_dims"):
        GradientStore(tmp_path / "s", 20, {**SPEC, "proj_dims": [8]})
    with pytest.raises(ValueError, match="n_rows"):
        GradientStore(tmp_path / "s", 21, SPEC)
    assert snapshot(store.root) == before
    assert GradientStore.open(tmp_path / "s").spec == store.spec


def test_resume_after_a_kill_gives_identical_results(tmp_path):
    calls = []

    def killed_after_two(s, e):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies mid-run
        calls.append((s, e))
        return rows(s, e)

    store = GradientStore(tmp_path / "resumed", 20, SPEC, shared=["query/"])
    with pytest.raises(KeyboardInterrupt):
        fill_partitions(store, 0, 20, 6, killed_after_two, progress=False)
    assert store.partitions() == [(0, 6), (6, 12)]
    recomputed = []
    done = fill_partitions(store, 0, 20, 6, lambda s, e: recomputed.append((s, e)) or rows(s, e), progress=False)
    assert done == recomputed == [(12, 18), (18, 20)]  # resumes at the first unfinished partition
    reference = GradientStore(tmp_path / "straight", 20, SPEC, shared=["query/"])
    fill_partitions(reference, 0, 20, 6, rows, progress=False)
    a, b = store.load(), reference.load()
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert fill_partitions(store, 0, 20, 6, rows, progress=False) == []


def test_later_runs_fill_only_the_missing_rows(tmp_path):
    store = GradientStore(tmp_path / "s", 20, SPEC)
    fill_partitions(store, 0, 10, 5, lambda s, e: {"x": torch.zeros(e - s)}, progress=False)
    done = fill_partitions(store, 3, 20, 4, lambda s, e: {"x": torch.ones(e - s)}, progress=False)
    assert done == [(10, 14), (14, 18), (18, 20)]
    assert torch.equal(store.load()["x"], torch.cat([torch.zeros(10), torch.ones(10)]))


def test_compute_seconds_add_up_over_resumed_runs(tmp_path, monkeypatch):
    """Each partition records how long its compute took; the store's total spans every run that filled it."""
    import imprint.gradients.store as store_module

    clock = iter(range(0, 1000, 1))
    monkeypatch.setattr(store_module.time, "perf_counter", lambda: float(next(clock)) ** 2)
    store = GradientStore(tmp_path / "s", 20, SPEC)
    fill_partitions(store, 0, 10, 5, lambda s, e: {"x": torch.zeros(e - s)}, progress=False)  # 1 - 0, 9 - 4
    fill_partitions(store, 0, 20, 10, lambda s, e: {"x": torch.zeros(e - s)}, progress=False)  # 25 - 16
    assert store.seconds() == 1.0 + 5.0 + 9.0
    untimed = GradientStore(tmp_path / "u", 4, SPEC)
    untimed.write(0, 2, {"x": torch.zeros(2)}, seconds=0.5)
    untimed.write(2, 4, {"x": torch.zeros(2)})
    assert untimed.seconds() is None
    with pytest.raises(ValueError, match="seconds"):
        untimed.write(0, 1, {"x": torch.zeros(1)}, seconds=-1.0)
    merged = merge_stores(tmp_path / "m", [tmp_path / "s"])
    assert merged.seconds() == 15.0


@pytest.mark.parametrize("start,end", [(-1, 5), (0, 21), (5, 5), (7, 3)])
def test_partition_range_outside_the_dataset(tmp_path, start, end):
    store = GradientStore(tmp_path / "s", 20, SPEC)

    def never(s, e):
        raise AssertionError("computed despite the bad range")

    with pytest.raises(ValueError, match="expected 0 <= start < end <= 20"):
        fill_partitions(store, start, end, 4, never, progress=False)
    with pytest.raises(ValueError):
        plan_partitions(start, end, 4, 20)


def test_separate_processes_then_merge(tmp_path):
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, {tests!r})
        from test_gradients_store import rows, SPEC
        from imprint.gradients.store import GradientStore, fill_partitions
        start, end, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
        store = GradientStore(folder, 20, SPEC, shared=["query/"])
        fill_partitions(store, start, end, 4, rows, progress=False)
    """).format(tests=os.path.dirname(__file__))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(s), str(e), str(tmp_path / name)])
             for s, e, name in [(0, 12, "a"), (12, 20, "b")]]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    merged = merge_stores(tmp_path / "merged", [tmp_path / "a", tmp_path / "b"])
    assert merged.partitions() == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20)]
    loaded, full = merged.load(), rows(0, 20)
    assert all(torch.equal(loaded[k], full[k]) for k in full)
    merge_stores(tmp_path / "merged", [tmp_path / "a"])  # idempotent: same partitions, same digests


def test_merge_refuses_different_settings_and_overlaps(tmp_path):
    a = GradientStore(tmp_path / "a", 20, SPEC)
    a.write(0, 10, {"x": torch.zeros(10)})
    b = GradientStore(tmp_path / "b", 20, {**SPEC, "seed": 1})
    b.write(10, 20, {"x": torch.zeros(10)})
    with pytest.raises(ValueError, match="different settings"):
        merge_stores(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])
    c = GradientStore(tmp_path / "c", 20, SPEC)
    c.write(5, 15, {"x": torch.ones(10)})
    with pytest.raises(FileExistsError, match="overlaps"):
        merge_stores(tmp_path / "m2", [tmp_path / "a", tmp_path / "c"])


def test_corrupted_partition_is_detected(tmp_path):
    store = GradientStore(tmp_path / "s", 4, SPEC)
    path = store.write(0, 4, {"x": torch.arange(4.0)})
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the tensor bytes
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        store.load()


def test_shared_tensors_must_agree_and_rows_must_match(tmp_path):
    store = GradientStore(tmp_path / "s", 4, SPEC, shared=["q/"])
    store.write(0, 2, {"x": torch.zeros(2), "q/n": torch.zeros(3)})
    store.write(2, 4, {"x": torch.zeros(2), "q/n": torch.ones(3)})
    with pytest.raises(ValueError, match="differs between partitions"):
        store.load()
    with pytest.raises(ValueError, match="expected 2 rows"):
        GradientStore(tmp_path / "t", 4, SPEC).write(0, 2, {"x": torch.zeros(3)})
    with pytest.raises(ValueError, match="incomplete"):
        GradientStore(tmp_path / "u", 4, SPEC).load()


def test_partial_load_returns_the_stored_rows(tmp_path):
    store = GradientStore(tmp_path / "s", 20, SPEC, shared=["query/"])
    for s, e in [(0, 4), (8, 12)]:
        store.write(s, e, rows(s, e))
    assert store.stored_rows().tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    part = store.load(partial=True)
    assert torch.equal(part["norm"], rows(0, 20)["norm"][store.stored_rows()])
    with pytest.raises(ValueError, match="no partition"):
        GradientStore(tmp_path / "t", 20, SPEC).load(partial=True)

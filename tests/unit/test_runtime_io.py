import json
import math

import pytest
import torch

from imprint.runtime import (Checkpointer, atomic_save_tensors, atomic_write_json, keyed_dir, load_tensor_metadata,
                             load_tensors, resolve_device, seed_everything)
from imprint.runtime.io import atomic_path


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_json_converts_tensors_and_nan(tmp_path):
    path = atomic_write_json(tmp_path / "x.json", {"t": torch.tensor([1.5, 2.0]), "nan": math.nan, "s": torch.tensor(3)})
    assert json.loads(path.read_text()) == {"t": [1.5, 2.0], "nan": None, "s": 3}


def test_tensors_roundtrip_with_metadata(tmp_path):
    t = {"w": torch.randn(3, 4), "i": torch.arange(5)}
    path = atomic_save_tensors(tmp_path / "t.safetensors", t, {"config": {"lr": 0.1}})
    back = load_tensors(path)
    torch.testing.assert_close(back["w"], t["w"])
    assert load_tensor_metadata(path) == {"config": {"lr": 0.1}}


def test_checkpointer_latest_prune_and_corruption(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    assert ck.latest() is None
    for unit in (1, 2, 3):
        ck.save(unit, {"x": torch.full((2,), float(unit))}, {"unit_meta": unit})
    assert ck.units() == [2, 3]
    latest = ck.latest()
    assert latest.unit == 3 and latest.meta == {"unit_meta": 3} and latest.tensors["x"][0] == 3.0
    # corrupt the newest: it is reported and the previous valid one is returned
    path = tmp_path / "unit-00000003.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="corrupted"):
        assert ck.latest().unit == 2


def test_keyed_dir_depends_on_config_only(tmp_path):
    assert keyed_dir(tmp_path, a=1, b=[2]) == keyed_dir(tmp_path, b=[2], a=1)
    assert keyed_dir(tmp_path, a=1) != keyed_dir(tmp_path, a=2)


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="expected 'cpu', 'cuda'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_seed_everything_is_reproducible_and_checks_its_argument():
    seed_everything(5)
    a = torch.rand(3)
    seed_everything(5)
    torch.testing.assert_close(torch.rand(3), a)
    with pytest.raises(ValueError, match="seed=-1"):
        seed_everything(-1)
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.utils.deterministic.fill_uninitialized_memory  # determinism without the fill's kernels


def test_git_state_falls_back_to_the_environment_outside_a_checkout(tmp_path, monkeypatch):
    from imprint.runtime.provenance import git_state

    monkeypatch.setenv("IMPRINT_GIT_SHA", "abc123")
    monkeypatch.setenv("IMPRINT_GIT_DIRTY", "1")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_state(tmp_path) == {"sha": "abc123", "dirty": True}


def test_git_state_prefers_the_environment_over_a_stale_checkout(monkeypatch):
    """A copy shipped to a GPU node can carry a .git whose HEAD is not the commit of its files."""
    from imprint.runtime.provenance import git_state, repo_root

    monkeypatch.setenv("IMPRINT_GIT_SHA", "f" * 40)
    monkeypatch.delenv("IMPRINT_GIT_DIRTY", raising=False)
    assert git_state(repo_root()) == {"sha": "f" * 40, "dirty": False}
    monkeypatch.delenv("IMPRINT_GIT_SHA")
    assert git_state(repo_root())["sha"] != "f" * 40

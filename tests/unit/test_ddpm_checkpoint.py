"""Checkpointed DDPM training: the numbers of an uninterrupted run are unchanged, and a run interrupted at any
step and resumed gives bit-identical weights and losses; the self-consuming loop resumes a generation
mid-training. All triggers are step-based (the one time-based test replaces the clock by a counter)."""

import random

import numpy as np
import pytest
import torch

import imprint.models.ddpm as ddpm
from imprint.generative.self_consuming import Chain, LoopOptions, run_self_consuming_loop
from imprint.models.ddpm import DDPMConfig, DDPMEnsemble, DDPMTrainOptions, train_ddpm_ensemble
from imprint.runtime.checkpoint import Checkpointer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = DDPMConfig(image_size=4, block_out_channels=(8, 8), norm_num_groups=4, n_classes=3, n_train_timesteps=20)
OPTS = DDPMTrainOptions(n_steps=9, batch_size=6)


def tiny_data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *TINY.image_shape), generator=g) * 2 - 1, torch.arange(n) % TINY.n_classes


DATA = [tiny_data(12, 0), tiny_data(10, 1)]
SEEDS = [3, 4]


class Killed(Exception):
    pass


def kill_at(k):
    def on_step(completed):
        if completed == k:
            raise Killed()
    return on_step


def assert_identical(a, b):
    (ens_a, loss_a), (ens_b, loss_b) = a, b
    assert set(ens_a.params) == set(ens_b.params)
    for key in ens_a.params:
        assert torch.equal(ens_a.params[key], ens_b.params[key]), key
    assert torch.equal(loss_a, loss_b)


@pytest.mark.parametrize("vectorize", [False, True])
def test_checkpointing_leaves_an_uninterrupted_run_unchanged(tmp_path, vectorize):
    plain = train_ddpm_ensemble(DATA, SEEDS, TINY, OPTS, vectorize=vectorize)
    # a save after every step, and an interval so large that only the final save happens
    every_step = train_ddpm_ensemble(DATA, SEEDS, TINY, OPTS, vectorize=vectorize,
                                     checkpoint_dir=tmp_path / "a", checkpoint_every=1)
    final_only = train_ddpm_ensemble(DATA, SEEDS, TINY, OPTS, vectorize=vectorize,
                                     checkpoint_dir=tmp_path / "b", checkpoint_every=10**9)
    assert_identical(plain, every_step)
    assert_identical(plain, final_only)
    assert Checkpointer(tmp_path / "a").units() == [8, 9] and Checkpointer(tmp_path / "b").units() == [9]


@pytest.mark.parametrize("kill", [1, 4, 5, 8])  # right after a checkpoint (4, 8) and between two (1, 5)
def test_training_interrupted_at_step_k_and_resumed_gives_identical_weights(tmp_path, capsys, kill):
    plain = train_ddpm_ensemble(DATA, SEEDS, TINY, OPTS)
    with pytest.raises(Killed):
        train_ddpm_ensemble(DATA, SEEDS, TINY, OPTS, checkpoint_dir=tmp_path, checkpoint_every=2,
                            on_step=kill_at(kill))
    saved = kill - kill % 2
    assert Checkpointer(tmp_path).units()[-1:] == ([saved] if saved else [])
    capsys.readouterr()
    resumed_steps = []
    resumed = train_ddpm_ensemble(DATA, SEEDS, TINY, OPTS, checkpoint_dir=tmp_path, checkpoint_every=2,
                                  on_step=resumed_steps.append)
    assert resumed_steps == list(range(saved + 1, OPTS.n_steps + 1))  # only the steps after the checkpoint
    assert (f"resumed from the checkpoint of step {saved}/9" in capsys.readouterr().err) == bool(saved)
    assert_identical(plain, resumed)


def test_a_warm_started_run_resumes_to_identical_weights(tmp_path):
    init = DDPMEnsemble.initialise(TINY, [7, 8])
    plain = train_ddpm_ensemble(DATA, SEEDS, TINY, OPTS, init=init)
    with pytest.raises(Killed):
        train_ddpm_ensemble(DATA, SEEDS, TINY, OPTS, init=init, checkpoint_dir=tmp_path, checkpoint_every=3,
                            on_step=kill_at(7))
    assert_identical(plain, train_ddpm_ensemble(DATA, SEEDS, TINY, OPTS, init=init, checkpoint_dir=tmp_path))


def test_a_finished_training_is_loaded_not_recomputed(tmp_path):
    first = train_ddpm_ensemble(DATA, SEEDS, TINY, OPTS, checkpoint_dir=tmp_path)
    assert Checkpointer(tmp_path).units() == [9]  # no interval: the final save only
    steps = []
    again = train_ddpm_ensemble(DATA, SEEDS, TINY, OPTS, checkpoint_dir=tmp_path, on_step=steps.append)
    assert steps == []
    assert_identical(first, again)


def test_the_global_rng_states_are_saved_and_restored(tmp_path, monkeypatch):
    def states():
        return torch.get_rng_state(), np.random.get_state(), random.getstate()

    at_save = {}
    real_state = ddpm._global_rng_state

    def spy_state(device):
        at_save[len(at_save)] = states()
        return real_state(device)

    monkeypatch.setattr(ddpm, "_global_rng_state", spy_state)
    with pytest.raises(Killed):
        train_ddpm_ensemble(DATA, SEEDS, TINY, OPTS, checkpoint_dir=tmp_path, checkpoint_every=4,
                            on_step=kill_at(5))
    assert len(at_save) == 1  # the checkpoint of step 4
    torch.manual_seed(123), np.random.seed(123), random.seed(123)  # another process, other global states
    perturbed = states()
    restored = []
    real_set = ddpm._set_global_rng_state

    def spy_set(tensors, meta, device):
        real_set(tensors, meta, device)
        restored.append(states())

    monkeypatch.setattr(ddpm, "_set_global_rng_state", spy_set)
    train_ddpm_ensemble(DATA, SEEDS, TINY, OPTS, checkpoint_dir=tmp_path, checkpoint_every=4)
    (torch_state, np_state, py_state), = restored
    saved_torch, saved_np, saved_py = at_save[0]
    assert torch.equal(torch_state, saved_torch) and not torch.equal(torch_state, perturbed[0])
    assert np_state[0] == saved_np[0] and np.array_equal(np_state[1], saved_np[1]) and np_state[2:] == saved_np[2:]
    assert not np.array_equal(np_state[1], perturbed[1][1])
    assert py_state == saved_py and py_state != perturbed[2]


def test_a_corrupted_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    plain = train_ddpm_ensemble(DATA, SEEDS, TINY, OPTS)
    with pytest.raises(Killed):
        train_ddpm_ensemble(DATA, SEEDS, TINY, OPTS, checkpoint_dir=tmp_path, checkpoint_every=2,
                            on_step=kill_at(7))
    assert Checkpointer(tmp_path).units() == [4, 6]
    path = tmp_path / "unit-00000006.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    steps = []
    with pytest.warns(RuntimeWarning, match="corrupted"):
        resumed = train_ddpm_ensemble(DATA, SEEDS, TINY, OPTS, checkpoint_dir=tmp_path, on_step=steps.append)
    assert steps[0] == 5
    assert_identical(plain, resumed)


def test_the_time_trigger_saves_once_the_interval_has_passed(tmp_path, monkeypatch):
    clock = iter(range(10**6))  # one "second" per reading of the clock: no real time is measured
    monkeypatch.setattr(ddpm, "_clock", lambda: float(next(clock)))
    saved = []

    def record(completed):
        units = Checkpointer(tmp_path).units()
        if units and units[-1] == completed:
            saved.append(completed)

    opts = DDPMTrainOptions(n_steps=10, batch_size=4)
    timed = train_ddpm_ensemble(DATA, SEEDS, TINY, opts, checkpoint_dir=tmp_path, checkpoint_seconds=2.5,
                                on_step=record)
    # readings: 0 at the start, then one per step and one after each save; a save once 2.5 have passed
    assert saved == [3, 6, 9, 10]
    assert_identical(train_ddpm_ensemble(DATA, SEEDS, TINY, opts), timed)


def test_a_folder_of_another_training_run_is_refused(tmp_path):
    train_ddpm_ensemble(DATA, SEEDS, TINY, OPTS, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="checkpoint_dir=.*differing: \\['seeds'\\]"):
        train_ddpm_ensemble(DATA, [5, 6], TINY, OPTS, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="data_sha256"):
        train_ddpm_ensemble([tiny_data(12, 2), DATA[1]], SEEDS, TINY, OPTS, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="options"):
        train_ddpm_ensemble(DATA, SEEDS, TINY, DDPMTrainOptions(n_steps=9, batch_size=6, lr=1e-3),
                            checkpoint_dir=tmp_path)


def test_bad_checkpoint_arguments_are_refused_before_any_compute(tmp_path):
    steps = []
    for kw, name in [(dict(checkpoint_every=0), "checkpoint_every"),
                     (dict(checkpoint_seconds=0.0), "checkpoint_seconds"),
                     (dict(checkpoint_seconds=-1.0), "checkpoint_seconds")]:
        with pytest.raises(ValueError, match=name):
            train_ddpm_ensemble(DATA, SEEDS, TINY, OPTS, checkpoint_dir=tmp_path, on_step=steps.append, **kw)
    with pytest.raises(ValueError, match="without checkpoint_dir"):
        train_ddpm_ensemble(DATA, SEEDS, TINY, OPTS, checkpoint_every=2, on_step=steps.append)
    assert steps == [] and not tmp_path.joinpath("unit-00000009.safetensors").exists()


# ------------------------------------------------------------------------------------- the self-consuming loop

CFG = DDPMConfig(image_size=4, block_out_channels=(8,), norm_num_groups=4, n_classes=2, n_train_timesteps=10)


def pool():
    g = torch.Generator().manual_seed(0)
    return torch.rand(40, *CFG.image_shape, generator=g) * 2 - 1, torch.arange(40) % 2


def loop_options(**kw):
    base = dict(chains=(Chain("fully_synthetic", 0.5, 3), Chain("fresh_data", 0.5, 2)), seeds=(0, 1), n_real=6,
                n_synth=8, first_train=DDPMTrainOptions(n_steps=4, batch_size=4),
                next_train=DDPMTrainOptions(n_steps=3, batch_size=4), n_sampling_steps=5, warm_start=True)
    base.update(kw)
    return LoopOptions(**base)


def mean_evaluate(generation, members, samples, labels, ensemble, model_index):
    return [{"mean": float(samples[i].mean())} for i in range(len(members))]


@pytest.mark.parametrize("kill", [(0, 3), (1, 2)])
def test_the_loop_resumes_a_generation_mid_training(tmp_path, kill):
    x, y = pool()
    full = run_self_consuming_loop(x, y, CFG, loop_options(), tmp_path / "a", evaluate=mean_evaluate,
                                   progress=False, checkpoint_seconds=None)

    def killing(generation, step):
        if (generation, step) == kill:
            raise Killed()

    folder = tmp_path / "b"
    with pytest.raises(Killed):
        run_self_consuming_loop(x, y, CFG, loop_options(), folder, evaluate=mean_evaluate, progress=False,
                                checkpoint_seconds=None, checkpoint_every=1, on_train_step=killing)
    g, k = kill
    training = folder / "training" / f"generation-{g:04d}"
    assert Checkpointer(training).units()[-1] == k  # the interrupted generation's training state is on disk
    calls = []
    resumed = run_self_consuming_loop(x, y, CFG, loop_options(), folder, evaluate=mean_evaluate, progress=False,
                                      checkpoint_seconds=None, checkpoint_every=1,
                                      on_train_step=lambda gen, step: calls.append((gen, step)))
    assert calls[0] == (g, k + 1)  # training went on from the step after the checkpoint
    for a, b in zip(full, resumed, strict=True):
        assert a.members == b.members and a.train_loss == b.train_loss and a.evaluation == b.evaluation
        assert torch.equal(a.samples, b.samples)
    assert not any((folder / "training").iterdir())  # superseded by the records, removed


def test_the_loop_refuses_bad_checkpoint_intervals_before_any_compute(tmp_path):
    x, y = pool()
    for kw, name in [(dict(checkpoint_seconds=0.0), "checkpoint_seconds"),
                     (dict(checkpoint_every=0), "checkpoint_every")]:
        with pytest.raises(ValueError, match=name):
            run_self_consuming_loop(x, y, CFG, loop_options(), tmp_path, progress=False, **kw)
    assert not tmp_path.joinpath("generations").exists()

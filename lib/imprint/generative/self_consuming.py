"""The self-consuming training loop of a class-conditional diffusion model, resumable per generation.

Used by the self-consuming diffusion chapter (04). Following Alemohammad et al. (2024), generation 0 is
trained on real images; generation g >= 1 is trained on the samples of generation g - 1 and, depending on
the regime, on real images too: ``fully_synthetic`` (synthetic samples only), ``synthetic_augmentation``
(the fixed real set of generation 0 plus the synthetic samples) or ``fresh_data`` (real images never seen by
any earlier generation plus the synthetic samples: the pool is cut into disjoint per-generation draws).
A chain may fix its *real share*, the fraction of real images in every later generation's training set;
its synthetic images are then a balanced subset of the previous generation's samples of the matching size.
Guidance weight w is the sampling-bias knob. A *chain* is one
regime at one guidance weight for some number of generations; every chain runs for every seed, and all
(chain, seed) members of a generation are trained and sampled together as one ensemble. Chains of one seed
share the generation-0 model (its training does not depend on the regime). After each generation a record
(samples, labels, losses, and whatever ``evaluate`` returns) is checkpointed with its sha256; a run restarted
in the same folder continues after the last valid record, recomputes a corrupted one, and produces the same
numbers; a folder written with another architecture or other settings is refused before any compute.
Within a generation the training itself checkpoints every few seconds, so that a run killed mid-training
resumes that generation where it stopped, to the same weights.
``first_departure`` is the detection rule of the chapter: the first generation at which a signal leaves
the band that its generation-0 values span over seeds.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from imprint.models.ddpm import (DDPMConfig, DDPMEnsemble, DDPMTrainOptions, balanced_labels,
                                 check_guidance_weight, derive_seed, sample_ddpm_ensemble, train_ddpm_ensemble)
from imprint.runtime.checkpoint import Checkpointer
from imprint.runtime.checks import require_choice, require_float, require_int

REGIMES = ("fully_synthetic", "synthetic_augmentation", "fresh_data")

# stage codes of derive_seed: one independent random stream per (seed, generation, stage)
_REAL_DRAW, _TRAIN, _SAMPLE, _SYNTH_DRAW = 3, 5, 7, 11
# the in-flight training of generation g checkpoints into <folder>/training/generation-<g>
_TRAINING = re.compile(r"^generation-(\d{4,})$")


def _training_dir(folder: Path, generation: int) -> Path:
    return folder / "training" / f"generation-{generation:04d}"


def _discard_training_states(folder: Path, keep: int | None) -> None:
    """Remove the training checkpoints of every generation but ``keep``: they are either superseded by a
    generation record or depend on a generation that is being recomputed."""
    root = folder / "training"
    if not root.is_dir():
        return
    for path in root.iterdir():
        match = _TRAINING.match(path.name)
        if match and path.is_dir() and int(match.group(1)) != keep:
            shutil.rmtree(path, ignore_errors=True)


def check_real_share(share, name: str = "real_share") -> float:
    """A share of real images in a training set: a number in (0, 1] (0 would be the fully synthetic loop)."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not (0.0 < float(share) <= 1.0):
        raise ValueError(f"{name}={share!r}: expected a share of real images in (0, 1] "
                         f"(the fully synthetic regime is the share 0)")
    return float(share)


@dataclass(frozen=True)
class Chain:
    """One regime at one guidance weight, for ``n_generations`` generations (generation 0 included).

    ``real_share`` (augmentation and fresh data only): the fraction of real images in the training set of
    every generation g >= 1; None keeps every one of the previous generation's samples.
    """

    regime: str
    guidance_weight: float
    n_generations: int
    real_share: float | None = None

    def __post_init__(self):
        require_choice("regime", self.regime, REGIMES)
        check_guidance_weight(self.guidance_weight)
        require_int("n_generations", self.n_generations, minimum=1)
        object.__setattr__(self, "guidance_weight", float(self.guidance_weight))
        if self.real_share is not None:
            if self.regime == "fully_synthetic":
                raise ValueError(f"real_share={self.real_share!r} given to a fully synthetic chain: expected None")
            object.__setattr__(self, "real_share", check_real_share(self.real_share))

    @property
    def name(self) -> str:
        base = f"{self.regime}/w={self.guidance_weight:g}"
        return base if self.real_share is None else f"{base}/real={self.real_share:g}"


@dataclass(frozen=True)
class LoopOptions:
    """Sizes and training of the loop.

    ``n_real``: real images in generation 0's training set and in the augmentation regime's fixed real set;
    ``n_fresh``: real images of each later generation of a fresh-data chain (None: ``n_real``), disjoint from
    every earlier generation's (balanced over classes); ``n_synth``: samples generated per generation (balanced
    labels, used as conditioning labels when the next generation trains on them). ``first_train`` trains
    generation 0, ``next_train`` the later ones; ``warm_start`` starts generation g from generation g - 1's
    weights instead of a fresh initialisation. ``keep_weights``: how many generations of weights to keep on
    disk (None: all).
    """

    chains: tuple[Chain, ...]
    seeds: tuple[int, ...]
    n_real: int
    n_synth: int
    first_train: DDPMTrainOptions
    next_train: DDPMTrainOptions
    warm_start: bool = False
    n_sampling_steps: int | None = None
    keep_weights: int | None = 2
    n_fresh: int | None = None

    def __post_init__(self):
        if len(self.chains) < 1:
            raise ValueError("chains is empty: expected at least one chain")
        for c in self.chains:
            if not isinstance(c, Chain):
                raise ValueError(f"chains contains {c!r}: expected Chain objects")
        if len(set(self.chains)) != len(self.chains):
            raise ValueError(f"chains has duplicates: {[c.name for c in self.chains]}")
        if len(self.seeds) < 1 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={list(self.seeds)}: expected at least one seed, no repeats")
        for s in self.seeds:
            require_int("seeds", s, minimum=0)
        require_int("n_real", self.n_real, minimum=1)
        require_int("n_synth", self.n_synth, minimum=1)
        if self.n_sampling_steps is not None:
            require_int("n_sampling_steps", self.n_sampling_steps, minimum=1)
        if self.keep_weights is not None:
            require_int("keep_weights", self.keep_weights, minimum=1)
        if self.n_fresh is not None:
            require_int("n_fresh", self.n_fresh, minimum=1)
        for c in self.chains:
            if c.real_share is not None and self.synthetic_count(c) > self.n_synth:
                raise ValueError(f"real_share={c.real_share:g} of chain {c.name} asks for {self.synthetic_count(c)} "
                                 f"synthetic images beside {self.real_count(c)} real ones, but each generation draws "
                                 f"n_synth={self.n_synth}: raise n_synth or the real share")
        object.__setattr__(self, "chains", tuple(self.chains))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))

    @property
    def n_generations(self) -> int:
        return max(c.n_generations for c in self.chains)

    @property
    def fresh_count(self) -> int:
        return self.n_real if self.n_fresh is None else self.n_fresh

    @property
    def n_fresh_generations(self) -> int:
        """Generations of the longest fresh-data chain (0: none), i.e. how many disjoint real draws it needs."""
        return max([c.n_generations for c in self.chains if c.regime == "fresh_data"], default=0)

    def real_count(self, chain: Chain) -> int:
        """Real images in the training set of a generation g >= 1 of ``chain``."""
        return {"fully_synthetic": 0, "synthetic_augmentation": self.n_real, "fresh_data": self.fresh_count}[chain.regime]

    def synthetic_count(self, chain: Chain) -> int:
        """Synthetic images in the training set of a generation g >= 1 of ``chain``."""
        if chain.real_share is None:
            return self.n_synth
        return int(round(self.real_count(chain) * (1.0 - chain.real_share) / chain.real_share))

    def members(self, generation: int) -> list[tuple[int, int]]:
        """(chain index, seed) of every member alive at ``generation``."""
        return [(ci, s) for ci, c in enumerate(self.chains) if c.n_generations > generation for s in self.seeds]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["chains"] = [asdict(c) for c in self.chains]
        d["seeds"] = list(self.seeds)
        return d


@dataclass
class GenerationRecord:
    """What generation ``generation`` produced, for each member ``(chain index, seed)``."""

    generation: int
    members: list[tuple[int, int]]
    samples: Float[Tensor, "m n c h w"]
    labels: Int[Tensor, " n"]
    train_loss: list[float]
    evaluation: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # train, sample, evaluate (wall time)

    def member_index(self, chain_index: int, seed: int) -> int:
        return self.members.index((chain_index, seed))


Evaluate = Callable[[int, list[tuple[int, int]], Tensor, Tensor, DDPMEnsemble, list[int]], list[dict]]


def balanced_draw(labels: Int[Tensor, " n"], n: int, n_classes: int, seed: int, what: str = "n_real") -> Int[Tensor, " k"]:
    """``n`` indices spread evenly over the classes (the first ``n % n_classes`` classes get one more)."""
    rng = np.random.default_rng(seed)
    lab = labels.cpu().numpy()
    chosen = []
    for c in range(n_classes):
        k = n // n_classes + (1 if c < n % n_classes else 0)
        pool = np.flatnonzero(lab == c)
        if k > len(pool):
            raise ValueError(f"{what}={n} asks for {k} images of class {c}, but the pool has {len(pool)}")
        chosen.append(rng.permutation(pool)[:k])
    return torch.as_tensor(np.sort(np.concatenate(chosen)), dtype=torch.long)


def disjoint_real_draws(labels: Int[Tensor, " n"], n_first: int, n_next: int, n_generations: int, n_classes: int,
                        seed: int, what: str = "n_fresh") -> list[Int[Tensor, " k"]]:
    """Balanced draws of real images that never repeat: ``n_first`` for generation 0, ``n_next`` for each of
    generations 1 .. n_generations - 1, pairwise disjoint.

    Each class's pool is permuted once (the same permutations as :func:`balanced_draw`, so generation 0's draw
    equals ``balanced_draw(labels, n_first, n_classes, seed)``) and cut into consecutive blocks. A pool too
    small for every draw is refused, naming ``what``, before anything is drawn.
    """
    require_int("n_first", n_first, minimum=1)
    require_int(what, n_next, minimum=1)
    require_int("n_generations", n_generations, minimum=1)
    lab = labels.cpu().numpy()

    def per_class(n: int, c: int) -> int:
        return n // n_classes + (1 if c < n % n_classes else 0)

    for c in range(n_classes):
        need = per_class(n_first, c) + (n_generations - 1) * per_class(n_next, c)
        have = int((lab == c).sum())
        if need > have:
            raise ValueError(f"{what}={n_next} real images in each of {n_generations - 1} generations after the "
                             f"{n_first} of generation 0, all disjoint, need {need} images of class {c}, but the pool "
                             f"has {have}: lower {what}, shorten the fresh-data chain or enlarge the pool")
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(np.flatnonzero(lab == c)) for c in range(n_classes)]
    draws = []
    for g in range(n_generations):
        chosen = []
        for c in range(n_classes):
            start = per_class(n_first, c) + (g - 1) * per_class(n_next, c) if g else 0
            stop = start + (per_class(n_next, c) if g else per_class(n_first, c))
            chosen.append(orders[c][start:stop])
        draws.append(torch.as_tensor(np.sort(np.concatenate(chosen)), dtype=torch.long))
    return draws


def check_real_draws(pool_labels: Int[Tensor, " n"], options: LoopOptions, n_classes: int) -> None:
    """Refuse, before any compute, real draws the pool cannot supply: generation 0's ``n_real`` and the
    disjoint ``n_fresh`` of every later generation of the longest fresh-data chain."""
    balanced_draw(pool_labels, options.n_real, n_classes, 0)
    if options.n_fresh_generations > 1:
        disjoint_real_draws(pool_labels, options.n_real, options.fresh_count, options.n_fresh_generations,
                            n_classes, 0)


def _fingerprint(config: DDPMConfig, options: LoopOptions, pool_x: Tensor, pool_labels: Tensor) -> dict:
    digest = hashlib.sha256()
    digest.update(pool_x.detach().cpu().float().contiguous().numpy().tobytes())
    digest.update(pool_labels.detach().cpu().long().contiguous().numpy().tobytes())
    return {"architecture": config.architecture(), "options": options.as_dict(), "pool_sha256": digest.hexdigest()}


def _check_folder(gens: Checkpointer, weights: Checkpointer, fingerprint: dict) -> None:
    """Refuse a folder written with another architecture or other settings (before any compute)."""
    for ckpt_folder in (gens, weights):
        for unit in ckpt_folder.units():
            ckpt = ckpt_folder.load(unit)
            if ckpt is None:
                continue  # corrupted: will be recomputed
            stored = ckpt.meta.get("fingerprint", {})
            if stored.get("architecture") != fingerprint["architecture"]:
                raise ValueError(f"checkpoint folder {str(ckpt_folder.folder)!r} holds generation {unit} of another "
                                 f"architecture ({stored.get('architecture')}); expected "
                                 f"{fingerprint['architecture']}: use another folder or delete it")
            if stored != fingerprint:
                changed = sorted(k for k in set(stored.get("options", {})) | set(fingerprint["options"])
                                 if stored.get("options", {}).get(k) != fingerprint["options"].get(k))
                if stored.get("pool_sha256") != fingerprint["pool_sha256"]:
                    changed.append("real image pool")
                raise ValueError(f"checkpoint folder {str(ckpt_folder.folder)!r} was written with other settings "
                                 f"(differing: {changed}); use another folder or delete it")


def _record_from_checkpoint(ckpt) -> GenerationRecord:
    meta = ckpt.meta
    return GenerationRecord(ckpt.unit, [tuple(m) for m in meta["members"]], ckpt.tensors["samples"],
                            ckpt.tensors["labels"], list(meta["train_loss"]), list(meta["evaluation"]),
                            dict(meta.get("seconds", {})))


def run_self_consuming_loop(pool_x: Float[Tensor, "n c h w"], pool_labels: Int[Tensor, " n"], config: DDPMConfig,
                            options: LoopOptions, folder: str | Path, device: str | torch.device = "cpu",
                            evaluate: Evaluate | None = None, vectorize: bool | None = None,
                            progress: bool = True, cuda_graph: bool | None = None,
                            checkpoint_seconds: float | None = 5.0, checkpoint_every: int | None = None,
                            on_train_step: Callable[[int, int], None] | None = None) -> list[GenerationRecord]:
    """Run (or resume) every chain for every seed; returns one record per generation.

    ``pool_x`` are the real images available for training (in [-1, 1]), ``pool_labels`` their classes.
    ``evaluate(generation, members, samples, labels, ensemble, model_index)`` returns one JSON-able dict per
    member (``ensemble`` member ``model_index[i]`` generated ``samples[i]``); it is stored in the record.

    Within a generation, the ensemble's training checkpoints into ``folder/training/generation-<g>`` every
    ``checkpoint_seconds`` of wall time and/or every ``checkpoint_every`` steps, and after its last step;
    a run killed mid-training resumes that generation from its last checkpoint, with the same weights as an
    uninterrupted run, and the folder is removed once the generation's record is saved. ``on_train_step(g,
    k)`` is called after training step k of generation g (tests use it to simulate a kill).
    """
    if checkpoint_seconds is not None:
        require_float("checkpoint_seconds", checkpoint_seconds, minimum=0.0, strict_minimum=True)
    if checkpoint_every is not None:
        require_int("checkpoint_every", checkpoint_every, minimum=1)
    if tuple(pool_x.shape[1:]) != config.image_shape or pool_labels.shape != (pool_x.shape[0],):
        raise ValueError(f"pool_x has shape {tuple(pool_x.shape)} and pool_labels {tuple(pool_labels.shape)}: "
                         f"expected [n, *{config.image_shape}] and [n]")
    if int(pool_labels.min()) < 0 or int(pool_labels.max()) >= config.n_classes:
        raise ValueError(f"pool_labels must lie in [0, {config.n_classes - 1}]")
    check_real_draws(pool_labels, options, config.n_classes)  # the real draws must be possible
    folder = Path(folder)
    device = torch.device(device)
    gens_ckpt = Checkpointer(folder / "generations", keep=None)
    weights_ckpt = Checkpointer(folder / "weights", keep=options.keep_weights)
    fingerprint = _fingerprint(config, options, pool_x, pool_labels)
    _check_folder(gens_ckpt, weights_ckpt, fingerprint)

    # resume point: the first generation without a valid record (and, warm-starting, without the weights
    # of the generation before it)
    records: list[GenerationRecord] = []
    for g in range(options.n_generations):
        ckpt = gens_ckpt.load(g)
        if ckpt is None:
            break
        records.append(_record_from_checkpoint(ckpt))
    if options.warm_start:
        while records and not weights_ckpt.is_valid(records[-1].generation):
            records.pop()
    start = len(records)

    pool_x = pool_x.to(torch.float32)
    n_classes = config.n_classes
    labels = balanced_labels(options.n_synth, n_classes)
    seed_pos = {s: i for i, s in enumerate(options.seeds)}

    n_draws = max(1, options.n_fresh_generations)
    draws = {s: disjoint_real_draws(pool_labels, options.n_real, options.fresh_count, n_draws, n_classes,
                                    derive_seed(s, 0, _REAL_DRAW)) for s in options.seeds}

    def real_set(seed: int, generation: int) -> tuple[Tensor, Tensor]:
        """Generation 0's real set (also the augmentation regime's) or generation g's fresh, disjoint draw."""
        idx = draws[seed][generation]
        return pool_x[idx], pool_labels[idx].long()

    previous_weights: DDPMEnsemble | None = None
    previous_index: list[int] | None = None
    if options.warm_start and start > 0:
        w = weights_ckpt.load(start - 1)
        previous_weights = DDPMEnsemble.from_state_tensors(w.tensors, config, w.meta["fingerprint"]["architecture"],
                                                           vectorize, source=f"weights of generation {start - 1}")
        previous_index = list(w.meta["model_index"])

    bar = tqdm(range(start, options.n_generations), desc="generations", disable=not progress)
    for g in bar:
        members = options.members(g)
        _discard_training_states(folder, keep=g)
        checkpointing = {"checkpoint_dir": _training_dir(folder, g), "checkpoint_seconds": checkpoint_seconds,
                         "checkpoint_every": checkpoint_every,
                         "on_step": None if on_train_step is None else (lambda k, g=g: on_train_step(g, k))}
        t0 = time.perf_counter()
        if g == 0:
            datasets = [real_set(s, 0) for s in options.seeds]
            train_seeds = [derive_seed(s, 0, _TRAIN) for s in options.seeds]
            model_index = [seed_pos[s] for _, s in members]
            ens, losses = train_ddpm_ensemble(datasets, train_seeds, config, options.first_train, device,
                                              vectorize=vectorize, cuda_graph=cuda_graph, **checkpointing)
        else:
            prev = records[g - 1]
            datasets = []
            for ci, s in members:
                synth = prev.samples[prev.member_index(ci, s)].float()
                chain = options.chains[ci]
                regime = chain.regime
                x, y = synth, prev.labels.long()
                if chain.real_share is not None:
                    keep = balanced_draw(prev.labels, options.synthetic_count(chain), n_classes,
                                         derive_seed(s, g, _SYNTH_DRAW, ci), "synthetic images")
                    x, y = synth[keep], prev.labels[keep].long()
                if regime == "synthetic_augmentation":
                    rx, ry = real_set(s, 0)
                    x, y = torch.cat([rx, x]), torch.cat([ry, y])
                elif regime == "fresh_data":
                    rx, ry = real_set(s, g)
                    x, y = torch.cat([rx, x]), torch.cat([ry, y])
                datasets.append((x, y))
            init = None
            if options.warm_start:
                prev_members = prev.members
                init = previous_weights.select([previous_index[prev_members.index(m)] for m in members])
            train_seeds = [derive_seed(s, g, _TRAIN) for _, s in members]
            model_index = list(range(len(members)))
            ens, losses = train_ddpm_ensemble(datasets, train_seeds, config, options.next_train, device, init=init,
                                              vectorize=vectorize, cuda_graph=cuda_graph, **checkpointing)
        t1 = time.perf_counter()  # the trainer returns its losses on the CPU: the GPU work is done
        # sample: members sharing a model and a guidance weight share the same samples (common noise)
        keys = [(model_index[i], options.chains[ci].guidance_weight, s) for i, (ci, s) in enumerate(members)]
        unique = list(dict.fromkeys(keys))
        drawn = sample_ddpm_ensemble(ens.select([k[0] for k in unique]), labels, [k[1] for k in unique],
                                     [derive_seed(k[2], g, _SAMPLE) for k in unique], options.n_sampling_steps)
        samples = drawn[torch.as_tensor([unique.index(k) for k in keys])].cpu()
        t2 = time.perf_counter()
        evaluation = (evaluate(g, members, samples, labels, ens, model_index) if evaluate is not None
                      else [{} for _ in members])
        if len(evaluation) != len(members):
            raise ValueError(f"evaluate returned {len(evaluation)} entries for {len(members)} members")
        seconds = {"train": t1 - t0, "sample": t2 - t1, "evaluate": time.perf_counter() - t2}
        final_loss = losses[:, -max(1, losses.shape[1] // 10):].mean(1)
        train_loss = [float(final_loss[i]) for i in model_index]
        meta = {"fingerprint": fingerprint, "members": [list(m) for m in members], "model_index": model_index}
        weights_ckpt.save(g, ens.state_tensors(), meta)
        gens_ckpt.save(g, {"samples": samples.float(), "labels": labels},
                       {**meta, "train_loss": train_loss, "evaluation": json.loads(json.dumps(evaluation)),
                        "seconds": seconds})
        records.append(GenerationRecord(g, members, samples.float(), labels, train_loss,
                                        json.loads(json.dumps(evaluation)), seconds))
        previous_weights, previous_index = ens, model_index
        _discard_training_states(folder, keep=None)  # the record and the weights supersede them
    return records


def load_generation_weights(folder: str | Path, generation: int, config: DDPMConfig,
                            device: str | torch.device = "cpu") -> tuple[DDPMEnsemble, list[tuple[int, int]], list[int]]:
    """The ensemble of ``generation`` (kept on disk per ``keep_weights``), its members and model index."""
    ckpt = Checkpointer(Path(folder) / "weights", keep=None).load(generation, device)
    if ckpt is None:
        raise FileNotFoundError(f"no valid weights of generation {generation} under {str(folder)!r}")
    ens = DDPMEnsemble.from_state_tensors(ckpt.tensors, config, ckpt.meta["fingerprint"]["architecture"],
                                          source=f"weights of generation {generation}")
    return ens, [tuple(m) for m in ckpt.meta["members"]], list(ckpt.meta["model_index"])


def member_series(records: Sequence[GenerationRecord], chain_index: int, seed: int, key: str) -> list[Any]:
    """``evaluation[key]`` of member (chain, seed) over the generations it lived."""
    out = []
    for r in records:
        if (chain_index, seed) in r.members:
            out.append(r.evaluation[r.member_index(chain_index, seed)].get(key))
    return out


@dataclass(frozen=True)
class Detection:
    """The generation-0 band of a signal and the first generation each seed leaves it."""

    band_low: float
    band_high: float
    first_flagged: list[int | None]  # per seed; None: never left the band

    def summary(self) -> dict:
        flagged = [g for g in self.first_flagged if g is not None]
        return {"band_low": self.band_low, "band_high": self.band_high, "first_flagged": self.first_flagged,
                "n_seeds_flagged": len(flagged), "mean_first_flagged": float(np.mean(flagged)) if flagged else None,
                "std_first_flagged": float(np.std(flagged, ddof=1)) if len(flagged) > 1 else None}


def band_floor(centre: float, band_min_relative: float, bounds: tuple[float, float] | None = None) -> float:
    """The smallest half-width of a generation-0 band: ``band_min_relative`` times |centre|, or, for a signal
    confined to ``bounds`` (a share such as precision), times the distance from the centre to the nearer
    bound, so that a value near its cap still has room to leave the band on the open side."""
    if bounds is None:
        return band_min_relative * abs(centre)
    low, high = bounds
    return band_min_relative * max(0.0, min(centre - low, high - centre))


def first_departure(values: Float[np.ndarray, "s g"], band_sigmas: float, band_min_relative: float,
                    bounds: tuple[float, float] | None = None) -> Detection:
    """Per seed, the first generation g >= 1 whose value lies outside the generation-0 band.

    The band is mean_s(v[s, 0]) +- max(band_sigmas * sd_s(v[s, 0]), floor) with floor
    ``band_floor(mean_s(v[s, 0]), band_min_relative, bounds)``: the spread of generation 0 over seeds, with a
    floor so that two nearly equal seeds do not make a zero-width band. ``values`` is ``[seeds, generations]``
    (NaN for generations a seed did not reach).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] < 1:
        raise ValueError(f"values has shape {v.shape}: expected [seeds, generations]")
    if band_sigmas <= 0 or band_min_relative < 0:
        raise ValueError(f"band_sigmas={band_sigmas}, band_min_relative={band_min_relative}: expected > 0 and >= 0")
    g0 = v[:, 0]
    centre = float(np.mean(g0))
    spread = float(np.std(g0, ddof=1)) if len(g0) > 1 else 0.0
    half = max(band_sigmas * spread, band_floor(centre, band_min_relative, bounds))
    low, high = centre - half, centre + half
    first = []
    for row in v:
        out = [g for g in range(1, v.shape[1]) if np.isfinite(row[g]) and not (low <= row[g] <= high)]
        first.append(out[0] if out else None)
    return Detection(low, high, first)

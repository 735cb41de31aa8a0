"""One cell of chapter 05: a private set of N digits, LoRA fine-tunes of a public base at every rank, the
reconstruction attacks on them and on their controls, and the scores (chapter 05).

The public base is a bias-free MLP trained on public digits for even-versus-odd. A user fine-tunes it on N
private digits for another task (small, 0-4, versus large, 5-9) through LoRA adapters on its hidden
layers, and shares the adapters. For every data seed the private set, a disjoint private set of the same
size (the control adapter's data) and a held-out pool of fixed size are drawn afresh from the digits the
public set did not use. At every rank the cell trains the private and the disjoint adapters (one batched
run), a full fine-tune of the same base on the same private set (the upper line), and attacks:

* ``coupled``: the attacker holds ``W0, A, B`` and inverts the coupled stationarity condition
  (:class:`imprint.lora.kkt.LoRAFactors`);
* ``update``: the attacker holds only ``Delta W = s B A`` and inverts it as a full-weight update
  (:class:`imprint.lora.kkt.WeightUpdate`);
* ``full``: the full fine-tune's ``theta - theta_0``, attacked the same way (the upper line).

Controls of every attack: the adapter trained on the disjoint set, the adapter at its initialisation (the
base alone: no fine-tuning signal), and a random adapter with the trained factors' norms (for the full
fine-tune: the disjoint fine-tune and a random update with the trained update's norm per layer). All networks of
one N are one batched extraction per attack. Scores are chapter 01's memorisation count against the
held-out pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from imprint.data.digits import balanced_indices, even_odd_targets
from imprint.lora.adapters import AdapterRun, LoRATrainConfig, check_rank, initial_factors, train_adapters
from imprint.lora.kkt import (LINEARISATION_POINTS, LoRAFactors, WeightUpdate, balancedness,
                              coupled_kkt_residual, update_kkt_residual)
from imprint.models.mlp import TrainConfig, train_mlps
from imprint.reconstruction.evaluation import baseline_scores, score_search
from imprint.reconstruction.extraction import ExtractionConfig, Hyperparameters, attack_networks
from imprint.reconstruction.kkt import candidate_labels
from imprint.runtime.checkpoint import keyed_dir
from imprint.runtime.checks import require_choice, require_int

NETWORKS = ("trained", "disjoint", "init", "random")
ATTACKS = ("coupled", "update", "full")


def small_large_targets(labels: Tensor) -> Tensor:
    """The private task: +1 for a digit 0-4, -1 for 5-9."""
    return torch.where(labels < 5, 1.0, -1.0)


@dataclass(frozen=True)
class DigitPool:
    """Flattened digits in [0, 1], their labels, and the public set the base was trained on."""

    images: Tensor  # [n, 64]
    labels: Tensor  # [n]
    public: np.ndarray  # indices
    image_shape: tuple[int, ...] = (8, 8)

    @property
    def mean(self) -> Tensor:
        """The public set's mean image: the base network's input preprocessing, known to everyone."""
        return self.images[self.public].mean(0)

    def centred(self, idx: np.ndarray) -> Tensor:
        return self.images[idx] - self.mean


def digit_pool(n_public: int, seed: int) -> DigitPool:
    """scikit-learn's digits with a balanced public set of ``n_public`` drawn from ``seed``."""
    from imprint.data.images import load_digit_images

    images, labels = load_digit_images()
    require_int("n_public", n_public, minimum=2)
    public = balanced_indices(labels, list(range(10)), n_public, np.random.default_rng(seed), what="n_public")
    return DigitPool(torch.as_tensor(images.reshape(len(images), -1)), torch.as_tensor(labels), public)


def max_private(pool: DigitPool, n_heldout: int) -> int:
    """The largest N for which a private set, a disjoint set and the held-out pool fit beside the public set."""
    counts = np.bincount(pool.labels.numpy(), minlength=10) - np.bincount(pool.labels[pool.public].numpy(),
                                                                          minlength=10)
    per_class_heldout = math.ceil(n_heldout / 10)
    return int((counts.min() - per_class_heldout) // 2 * 10)


@dataclass(frozen=True)
class PrivateSplit:
    private: np.ndarray
    disjoint: np.ndarray
    heldout: np.ndarray


def private_split(pool: DigitPool, n_private: int, n_heldout: int, data_seed: int) -> PrivateSplit:
    """A fresh private set, a disjoint set of the same size and a held-out pool, all balanced over the ten
    digits and disjoint from each other and from the public set. The pool is drawn first from the data
    seed alone, so every N of one seed is judged against the same pool."""
    labels = pool.labels.numpy()
    classes = list(range(10))
    heldout = balanced_indices(labels, classes, n_heldout, np.random.default_rng([data_seed, 0]),
                               exclude=pool.public, what="n_heldout")
    rng = np.random.default_rng([data_seed, n_private])
    taken = np.r_[pool.public, heldout]
    private = balanced_indices(labels, classes, n_private, rng, exclude=taken, what="n_private")
    disjoint = balanced_indices(labels, classes, n_private, rng, exclude=np.r_[taken, private],
                                what="n_private (disjoint control)")
    return PrivateSplit(private, disjoint, heldout)


def pretrain_base(pool: DigitPool, config: TrainConfig, seed: int, device, checkpoint_dir: Path | None = None
                  ) -> list[Tensor]:
    """The public base: ``config`` trained on the public set for even versus odd; weights on the CPU."""
    x = pool.centred(pool.public).unsqueeze(0)
    y = even_odd_targets(pool.labels[pool.public]).unsqueeze(0)
    run = train_mlps(x, y, config, device=device, seeds=[seed], checkpoint_dir=checkpoint_dir, progress=False)
    return [w[0].detach().cpu() for w in run.weights]


def random_like(factors: dict[int, tuple[Tensor, Tensor]], seed: int) -> dict[int, tuple[Tensor, Tensor]]:
    """Gaussian factors with the Frobenius norm of each given factor (a zero factor stays zero)."""
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for i, pair in sorted(factors.items()):
        new = []
        for t in pair:
            z = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            new.append(z * (t.double().norm() / z.norm()))
        out[i] = tuple(new)
    return out


@dataclass(frozen=True)
class CellSettings:
    """What one cell trains and attacks; everything but N and the data seeds."""

    ranks: tuple[int, ...]
    lora: LoRATrainConfig
    full: TrainConfig  # full fine-tuning from the base (its init fields unused)
    extraction: ExtractionConfig
    hyper: Hyperparameters
    n_heldout: int
    attacks: tuple[str, ...] = ATTACKS
    at: str = "base"  # where the attacks' gradients are taken: the base ("base") or the fine-tuned weights

    def __post_init__(self):
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        if not self.ranks:
            raise ValueError("ranks is empty: expected at least one LoRA rank")
        require_choice("at", self.at, LINEARISATION_POINTS)
        bad = sorted(set(self.attacks) - set(ATTACKS))
        if not self.attacks or bad:
            raise ValueError(f"attacks={list(self.attacks)}: expected a non-empty subset of {list(ATTACKS)}")

    @property
    def coupled_terms(self) -> tuple[str, ...]:
        """From peft's start (B = 0, A random) only ``B = s M A^T`` is left behind; from a balanced start
        both conditions hold at the max-margin limit."""
        return ("B",) if self.lora.init == "standard" else ("A", "B")


@dataclass
class CellResult:
    """Everything one N produced: per (seed, rank) training statistics, residuals and the scores of every
    (attack, network) pair, plus the full fine-tune's; ``candidates`` keeps the picked reconstructions of
    the first seed for figures."""

    n_private: int
    data_seeds: list[int]
    ranks: list[int]
    rows: list[dict] = field(default_factory=list)
    candidates: dict = field(default_factory=dict)
    splits: dict = field(default_factory=dict)


def _score(result, x_train, mean, shape, baseline, targets, labels) -> dict:
    search = score_search(result, x_train, mean, shape, baseline, train_targets=targets, candidate_targets=labels)
    by_count, by_loss = search.best_by_count, search.best_by_loss
    return {"count": search.scores[by_count].memorisation_count, "count_loss_rule": search.scores[by_loss].memorisation_count,
            "pick": by_count, "search": search}


def run_cell(base: list[Tensor], pool: DigitPool, n_private: int, data_seeds: Sequence[int], settings: CellSettings,
             device, work_dir: Path, progress: bool = False) -> CellResult:
    """Train, attack and score every rank and control for one N over the data seeds (see the module text).
    Training and extraction checkpoint under ``work_dir`` and resume."""
    require_int("n_private", n_private, minimum=2)
    shapes = {i: tuple(base[i].shape) for i in settings.lora.layers}
    for r in settings.ranks:
        check_rank(r, shapes, "ranks")
    device = torch.device(device)
    seeds = [int(s) for s in data_seeds]
    splits = {s: private_split(pool, n_private, settings.n_heldout, s) for s in seeds}
    mean, shape = pool.mean, pool.image_shape
    tag = dict(n=n_private, seeds=seeds, base_shapes=[list(w.shape) for w in base])

    # adapters: every (seed, rank) on the private and on the disjoint set, one batched run
    combos = [(s, r, which) for s in seeds for r in settings.ranks for which in ("private", "disjoint")]
    x = torch.stack([pool.centred(getattr(splits[s], w)) for s, _, w in combos])
    y = torch.stack([small_large_targets(pool.labels[getattr(splits[s], w)]) for s, _, w in combos])
    init_seed = {(s, r): 1000 * s + r for s in seeds for r in settings.ranks}  # one init per (seed, rank)
    run: AdapterRun = train_adapters(base, x, y, [r for _, r, _ in combos], [init_seed[s, r] for s, r, _ in combos],
                                     settings.lora, device=device, progress=progress,
                                     checkpoint_dir=keyed_dir(work_dir / "adapters", **tag, ranks=settings.ranks,
                                                              lora=settings.lora.__dict__ | {"steps": None}))
    # full fine-tuning of every weight from the base, on the same private and disjoint sets
    full_x = torch.stack([pool.centred(getattr(splits[s], w)) for s in seeds for w in ("private", "disjoint")])
    full_y = torch.stack([small_large_targets(pool.labels[getattr(splits[s], w)])
                          for s in seeds for w in ("private", "disjoint")])
    initial = [w.unsqueeze(0).expand(len(full_x), -1, -1).contiguous() for w in base]
    full = train_mlps(full_x, full_y, settings.full, device=device, seeds=list(range(len(full_x))), progress=False,
                      initial_weights=initial,
                      checkpoint_dir=keyed_dir(work_dir / "full", **tag, full=settings.full.__dict__ | {"steps": None}))

    systems = {"coupled": {}, "update": {}, "full": {}}
    stats = {}
    for s in seeds:
        for r in settings.ranks:
            trained = run.adapter(combos.index((s, r, "private")))
            disjoint = run.adapter(combos.index((s, r, "disjoint")))
            start = initial_factors(shapes, r, settings.lora, init_seed[s, r])
            nets = {"trained": trained, "disjoint": disjoint, "init": start,
                    "random": random_like(trained, 7919 * s + r)}
            scaling = settings.lora.scaling(r)
            for name, factors in nets.items():
                systems["coupled"][(s, r, name)] = LoRAFactors(base, factors, scaling, settings.coupled_terms,
                                                               settings.at)
                systems["update"][(s, r, name)] = WeightUpdate.from_factors(base, factors, scaling, settings.at)
            j = combos.index((s, r, "private"))
            xp = pool.centred(splits[s].private).double()
            xd = pool.centred(splits[s].disjoint).double()
            yp = small_large_targets(pool.labels[splits[s].private])
            update = WeightUpdate.from_factors(base, trained, scaling, settings.at)
            terms, at = settings.coupled_terms, settings.at
            stats[(s, r)] = {
                "train_loss": float(run.history["loss"][-1, j]), "min_margin": float(run.history["min_margin"][-1, j]),
                "train_error": float(run.history["train_error"][-1, j]),
                "coupled_residual": coupled_kkt_residual(base, trained, scaling, xp, yp, terms, at),
                "coupled_residual_disjoint_inputs": coupled_kkt_residual(base, trained, scaling, xd, yp, terms, at),
                "update_residual": update_kkt_residual(update.weights, update.updates, xp, yp),
                "update_residual_disjoint_inputs": update_kkt_residual(update.weights, update.updates, xd, yp),
                "balancedness": float(np.mean(list(balancedness(trained).values()))),
                "update_norm": float(sum(u.double().norm() ** 2 for u in update.updates.values()) ** 0.5)}
        deltas = {}
        for w_index, which in enumerate(("trained", "disjoint")):
            k = 2 * seeds.index(s) + w_index
            weights = [w[k].detach().cpu().double() for w in full.weights]
            deltas[which] = {i: weights[i] - base[i].double() for i in range(len(base))}
            systems["full"][(s, "full", which)] = WeightUpdate.from_update([w.double() for w in base], deltas[which],
                                                                           settings.at)
        gen = torch.Generator().manual_seed(7919 * s)
        noise = {i: torch.randn(d.shape, generator=gen, dtype=torch.float64) for i, d in deltas["trained"].items()}
        noise = {i: z * (deltas["trained"][i].norm() / z.norm()) for i, z in noise.items()}
        systems["full"][(s, "full", "random")] = WeightUpdate.from_update([w.double() for w in base], noise, settings.at)
        tuned = systems["full"][(s, "full", "trained")]
        xp, k = pool.centred(splits[s].private).double(), 2 * seeds.index(s)
        stats[(s, "full")] = {
            "train_loss": float(full.history["loss"][-1, k]), "min_margin": float(full.history["min_margin"][-1, k]),
            "train_error": float(full.history["train_error"][-1, k]),
            "update_residual": update_kkt_residual(tuned.weights, tuned.updates, xp,
                                                   small_large_targets(pool.labels[splits[s].private])),
            "update_residual_disjoint_inputs": update_kkt_residual(tuned.weights, tuned.updates,
                                                                   pool.centred(splits[s].disjoint).double(),
                                                                   small_large_targets(pool.labels[splits[s].private])),
            "update_norm": float(sum(d.norm() ** 2 for d in deltas["trained"].values()) ** 0.5)}

    labels = candidate_labels(2 * n_private, signed=True)
    box = (-mean, 1 - mean)
    result = CellResult(n_private, seeds, list(settings.ranks), splits={s: splits[s] for s in seeds})
    baselines = {}
    for s in seeds:
        sp = splits[s]
        baselines[s] = baseline_scores(pool.centred(sp.private), pool.labels[sp.private], pool.centred(sp.heldout),
                                       pool.labels[sp.heldout], mean, shape)
    for attack in settings.attacks:
        named = {f"{s}|{r}|{name}": system for (s, r, name), system in systems[attack].items()}
        results = attack_networks(named, labels, n_private, settings.hyper, settings.extraction, device=device,
                                  progress=progress, box=box,
                                  checkpoint_dir=keyed_dir(work_dir / f"extract-{attack}", **tag, ranks=settings.ranks,
                                                           lora=settings.lora.__dict__ | {"steps": None},
                                                           full=settings.full.__dict__ | {"steps": None},
                                                           extract=settings.extraction.__dict__ | {"steps": None},
                                                           hyper=settings.hyper.rows()))
        for key, res in results.items():
            s_text, r_text, name = key.split("|")
            s = int(s_text)
            rank = r_text if r_text == "full" else int(r_text)
            sp = splits[s]
            targets = small_large_targets(pool.labels[sp.private]).long()
            scored = _score(res, pool.centred(sp.private), mean, shape, baselines[s], targets, labels)
            norm = systems[attack][(s, rank, name)].target_norm()
            reached = float(res.final_kkt_loss[scored["pick"]])
            result.rows.append({"seed": s, "rank": rank, "attack": attack, "network": name,
                                "count": scored["count"], "count_loss_rule": scored["count_loss_rule"],
                                "final_kkt_loss": reached,
                                "reached_residual": math.sqrt(max(reached, 0.0)) / norm if norm > 0 else float("nan"),
                                **({f"net_{k}": v for k, v in stats[(s, rank)].items()} if name == "trained" else {})})
            if s == seeds[0] and name in ("trained", "disjoint"):
                result.candidates[(attack, rank, name)] = (scored["search"].scores[scored["pick"]],
                                                           res.x[scored["pick"]])
    return result


def threshold_rank(n_private: int, n_outputs: int = 1) -> float:
    """sqrt(2 K N): where r(r+1)/2 = K N, the over-parameterisation threshold of Jang, Lee & Ryu (2024)."""
    return math.sqrt(2 * n_outputs * n_private)


# --------------------------------------------------------------------------------------------- statistics

def mean_interval(values: Sequence[float] | Sequence[int], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and a Student-t interval over replicates (the interval is the mean itself for one value)."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    mean = float(v.mean())
    if len(v) < 2 or float(v.std(ddof=1)) == 0.0:
        return mean, mean, mean
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return mean, mean - half, mean + half


def paired_sign_flip_p(a: Sequence[float] | Sequence[int], b: Sequence[float] | Sequence[int]) -> float:
    """One-sided exact p-value that ``a`` exceeds ``b`` over paired replicates: the share of the 2^n sign
    flips of the differences whose mean is at least the observed one (1.0 when they never differ)."""
    import itertools

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) == 0:
        raise ValueError("a and b are empty: expected at least one paired replicate")
    observed = d.mean()
    flips = np.array(list(itertools.product([1.0, -1.0], repeat=len(d))))
    return float(((flips * d).mean(1) >= observed - 1e-12).mean())


def cell_table(cells: Sequence[CellResult], level: float = 0.95, alpha: float = 0.05) -> list[dict]:
    """One row per (N, rank, attack): the trained network's per-seed memorisation counts, mean and interval,
    each control's mean and the one-sided paired p-value against it, and whether the cell meets the rule
    (every control beaten at ``alpha`` and a mean of at least one image)."""
    rows = []
    for cell in cells:
        by = {}
        for row in cell.rows:
            by.setdefault((row["rank"], row["attack"]), {}).setdefault(row["network"], {})[row["seed"]] = row
        for (rank, attack), nets in by.items():
            seeds = sorted(nets["trained"])
            counts = [nets["trained"][s]["count"] for s in seeds]
            mean, low, high = mean_interval(counts, level)
            out = {"n_private": cell.n_private, "rank": rank, "attack": attack, "counts": counts, "mean": mean,
                   "low": low, "high": high, "fraction": mean / cell.n_private,
                   "counts_loss_rule": [nets["trained"][s]["count_loss_rule"] for s in seeds]}
            beats = True
            for control in (c for c in NETWORKS[1:] if c in nets):
                other = [nets[control][s]["count"] for s in seeds]
                p = paired_sign_flip_p(counts, other)
                out[f"{control}_mean"] = float(np.mean(other))
                out[f"{control}_p"] = p
                beats = beats and p <= alpha
            out["reached_residual"] = float(np.mean([nets["trained"][s]["reached_residual"] for s in seeds]))
            stats_keys = [k for k in nets["trained"][seeds[0]] if k.startswith("net_")]
            for key in stats_keys:
                out[key[4:]] = float(np.mean([nets["trained"][s][key] for s in seeds]))
            out["works"] = bool(beats and mean >= 1)
            rows.append(out)
    return rows


def chapter_metrics(table: Sequence[dict], attacks: Sequence[str] = ATTACKS) -> dict:
    """The chapter's headline numbers from :func:`cell_table`'s rows: per attack the cells that meet the
    rule (all, and at or above the threshold rank), the best cell and its disjoint control, the residual the
    extraction reached against the one the true images leave; per size the smallest working rank of the
    coupled attack and its top rank's count against full fine-tuning's; the adapters' mean residuals."""
    out: dict = {}
    truth_key = {"coupled": "coupled_residual", "update": "update_residual", "full": "update_residual"}
    for attack in attacks:
        rows = [r for r in table if r["attack"] == attack]
        if not rows:
            continue
        top = max(rows, key=lambda r: r["fraction"])
        out[f"{attack}_cells"] = len(rows)
        out[f"{attack}_cells_work"] = sum(r["works"] for r in rows)
        out[f"{attack}_best_fraction"] = top["fraction"]
        out[f"{attack}_best_cell"] = f"N = {top['n_private']}, r = {top['rank']}"
        out[f"{attack}_best_mean"] = top["mean"]
        out[f"{attack}_best_disjoint_mean"] = top.get("disjoint_mean", float("nan"))
        if attack != "full":
            above = [r for r in rows if r["rank"] >= threshold_rank(r["n_private"])]
            out[f"{attack}_above_threshold_work"] = sum(r["works"] for r in above)
            out[f"{attack}_above_threshold_cells"] = len(above)
        out[f"{attack}_reached_residual"] = float(np.mean([r["reached_residual"] for r in rows]))
        out[f"{attack}_truth_residual"] = float(np.mean([r[truth_key[attack]] for r in rows]))
        out[f"{attack}_reached_vs_truth"] = ("below" if out[f"{attack}_reached_residual"]
                                             < out[f"{attack}_truth_residual"] else "above")
    per_size, ratios = [], []
    for n in sorted({r["n_private"] for r in table}):
        coupled = sorted((r for r in table if r["attack"] == "coupled" and r["n_private"] == n),
                         key=lambda r: r["rank"])
        full = [r for r in table if r["attack"] == "full" and r["n_private"] == n]
        if not coupled:
            continue
        working = [r["rank"] for r in coupled if r["works"]]
        top = coupled[-1]
        out[f"coupled_smallest_working_rank_n{n}"] = working[0] if working else None
        out[f"coupled_top_rank_mean_n{n}"] = top["mean"]
        text = f"N = {n}: " + (f"r = {working[0]} (r / sqrt(2N) = {working[0] / threshold_rank(n):.1f})"
                               if working else "no rank")
        if full:
            out[f"full_mean_n{n}"] = full[0]["mean"]
            if full[0]["mean"] > 0:
                text += f", top rank {top['mean']:.1f} against full fine-tuning's {full[0]['mean']:.1f}"
                ratios.append(top["mean"] / full[0]["mean"])
        per_size.append(text)
    lora = [r for r in table if r["attack"] in ("coupled", "update") and r["rank"] != "full"]
    if lora:
        out["coupled_working_ranks_text"] = "; ".join(per_size)
        out["coupled_top_rank_over_full"] = float(np.mean(ratios)) if ratios else float("nan")
        out["top_rank"] = max(r["rank"] for r in lora)
        first = [r for r in lora if r["attack"] == lora[0]["attack"]]  # one row per (N, rank)
        for key in ("coupled_residual", "coupled_residual_disjoint_inputs", "update_residual", "balancedness"):
            out[f"mean_{key}"] = float(np.mean([r[key] for r in first]))
        out["max_train_loss"] = float(np.max([r["train_loss"] for r in first]))
    full = [r for r in table if r["attack"] == "full"]
    if full:
        out["full_mean_fraction"] = float(np.mean([r["fraction"] for r in full]))
        out["full_update_residual"] = float(np.mean([r["update_residual"] for r in full]))
    return out


# ------------------------------------------------------------------------------------------------ figures

def plot_rank_curves(table: Sequence[dict], attacks: Sequence[str] = ("coupled", "update")):
    """Memorised fraction against r / sqrt(2 K N), one panel per attack and one line per N (mean and 95%
    interval over data seeds); the disjoint control dotted, the full fine-tune's mean as a marker at the
    right edge."""
    import matplotlib.pyplot as plt

    sizes = sorted({row["n_private"] for row in table})
    colours = plt.cm.viridis(np.linspace(0, 0.85, len(sizes)))
    fig, axes = plt.subplots(1, len(attacks), figsize=(5.2 * len(attacks), 3.6), squeeze=False, sharey=True)
    for ax, attack in zip(axes[0], attacks):
        for colour, n in zip(colours, sizes):
            rows = sorted((r for r in table if r["attack"] == attack and r["n_private"] == n), key=lambda r: r["rank"])
            if not rows:
                continue
            x = np.array([r["rank"] / threshold_rank(n) for r in rows])
            y = np.array([r["mean"] / n for r in rows])
            err = np.array([[r["mean"] - r["low"], r["high"] - r["mean"]] for r in rows]).T / n
            ax.errorbar(x, y, yerr=err, fmt="o-", color=colour, capsize=2, label=f"N = {n}", markersize=4)
            ax.plot(x, [r["disjoint_mean"] / n for r in rows], ":", color=colour, alpha=0.8)
            full = [r for r in table if r["attack"] == "full" and r["n_private"] == n]
            if full:
                ax.plot([x.max() * 1.6], [full[0]["mean"] / n], marker="*", color=colour, markersize=10)
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set(xscale="log", xlabel=r"rank / $\sqrt{2KN}$", title=f"{attack} attack")
        _plain_log_ticks(ax.xaxis)
    axes[0, 0].set_ylabel("memorised fraction of the private set")
    axes[0, 0].legend(fontsize=7, title="trained (dotted: disjoint)\n★ full fine-tune", title_fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_training(table: Sequence[dict]):
    """Per N against the rank: the adapters' final training loss, and their coupled and update residuals
    on the private set (solid) and on the disjoint set's inputs (dotted)."""
    import matplotlib.pyplot as plt

    sizes = sorted({row["n_private"] for row in table})
    colours = plt.cm.viridis(np.linspace(0, 0.85, len(sizes)))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for colour, n in zip(colours, sizes):
        rows = sorted((r for r in table if r["attack"] == "coupled" and r["n_private"] == n), key=lambda r: r["rank"])
        ranks = [r["rank"] for r in rows]
        axes[0].plot(ranks, [r["train_loss"] for r in rows], "o-", color=colour, label=f"N = {n}", markersize=4)
        for ax, key in ((axes[1], "coupled_residual"), (axes[2], "update_residual")):
            ax.plot(ranks, [r[key] for r in rows], "o-", color=colour, markersize=4)
            ax.plot(ranks, [r[f"{key}_disjoint_inputs"] for r in rows], ":", color=colour)
    axes[0].set(xscale="log", yscale="log", xlabel="rank r", ylabel="final training loss")
    for ax in axes:
        _plain_log_ticks(ax.xaxis)
    axes[1].set(xscale="log", xlabel="rank r", ylabel="coupled KKT residual", ylim=(0, 1.05))
    axes[2].set(xscale="log", xlabel="rank r", ylabel=r"$\Delta W$ residual", ylim=(0, 1.05))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig


def attack_user_adapter(base_checkpoint, widths: Sequence[int], adapter_dir, n_private: int, settings: CellSettings,
                        mean: Tensor, device, work_dir: Path) -> Tensor:
    """The coupled attack on a user's peft adapter folder over a base saved by
    :func:`imprint.models.mlp.save_mlp`: candidates ``[2 n_private, d]`` (pixels, mean added back, clipped
    to [0, 1]) of the configuration with the lowest final KKT loss (there are no private images to score)."""
    from imprint.lora.adapters import load_adapter
    from imprint.models.mlp import load_mlp
    from imprint.reconstruction.extraction import extract

    require_int("adapter_n_private", n_private, minimum=1)
    base_model = load_mlp(base_checkpoint, int(mean.numel()), list(widths), 1)
    factors, scaling = load_adapter(base_model, adapter_dir)
    base = [layer.weight.detach() for layer in base_model.layers]
    system = LoRAFactors(base, factors, scaling, settings.coupled_terms, settings.at)
    labels = candidate_labels(2 * n_private, signed=True)
    result = extract(system, labels, n_private, settings.hyper, settings.extraction, device=device, progress=False,
                     box=(-mean, 1 - mean), checkpoint_dir=keyed_dir(work_dir, adapter=str(adapter_dir),
                                                                     hyper=settings.hyper.rows()))
    loss = torch.where(result.diverged, torch.full_like(result.final_kkt_loss, float("inf")), result.final_kkt_loss)
    return (result.x[int(torch.argmin(loss))] + mean).clamp(0, 1)


def _plain_log_ticks(axis) -> None:
    """Powers of two as plain numbers on a log axis, no minor labels."""
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    low, high = axis.get_view_interval()
    ticks = [2.0 ** k for k in range(-8, 9) if low <= 2.0 ** k <= high]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_formatter(NullFormatter())

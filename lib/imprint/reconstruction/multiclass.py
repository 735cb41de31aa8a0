"""Chapter 02's reading of :func:`imprint.reconstruction.experiment.run_cell`: several classes and weight decay.

A cell of chapter 02 trains one recipe per weight decay (the first as ``train_config``, the others as
``schedules`` that differ from it by their decay, so their networks are named ``trained_wd<decay>`` and
``disjoint_wd<decay>``), and is attacked in one stationarity form. This module names those networks,
maps digit labels to the class indices of a multiclass network, summarises one attacked network of a cell
over the data seeds (its counts and both controls', the verdict of :func:`works`, the residual of the
fitted condition on the training set and on held-out images), turns a paired test into a sentence that
follows the numbers, and draws the chapter's figures of per-seed residuals and of the decay sweep.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from imprint.reconstruction.experiment import CellResult, works


def class_index_targets(classes: Sequence[int]) -> Callable[[Tensor], Tensor]:
    """Targets of a multiclass network on the digit classes ``classes``: label ``classes[i]`` -> ``i``."""
    classes = [int(c) for c in classes]
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ValueError(f"classes={classes}: expected at least two distinct classes")
    lookup = torch.full((max(classes) + 1,), -1, dtype=torch.long)
    lookup[torch.tensor(classes)] = torch.arange(len(classes))

    def targets(labels: Tensor) -> Tensor:
        labels = torch.as_tensor(labels).long().cpu()
        bad = (labels < 0) | (labels >= len(lookup))
        index = torch.where(bad, torch.zeros_like(labels), labels)
        mapped = torch.where(bad, torch.full_like(labels, -1), lookup[index])
        if bool((mapped < 0).any()):
            raise ValueError(f"labels hold {sorted(set(labels[mapped < 0].tolist()))}: expected classes of {classes}")
        return mapped

    return targets


def decayed(role: str, weight_decay: float, base: float) -> str:
    """The name run_cell gives the ``role`` network ("trained" or "disjoint") trained with ``weight_decay``
    in a cell whose ``train_config`` has the decay ``base``."""
    if role not in ("trained", "disjoint"):
        raise ValueError(f"role={role!r}: expected 'trained' or 'disjoint'")
    return role if float(weight_decay) == float(base) else f"{role}_wd{float(weight_decay):g}"


def decay_tag(weight_decay: float) -> str:
    """A name-safe tag of a weight decay for metric names: 0 -> 'wd0', 0.0005 -> 'wd5em4'."""
    if weight_decay == 0:
        return "wd0"
    mantissa, exponent = f"{float(weight_decay):.0e}".split("e")
    return f"wd{mantissa}e{'m' if int(exponent) < 0 else ''}{abs(int(exponent))}"


def summarise(cell: CellResult, network: str = "trained", rule: str = "count", configs: int | None = None,
              level: float = 0.05) -> dict:
    """One attacked network of a cell over its data seeds: per-seed memorisation counts of it and of its
    two controls, the verdict of :func:`works` with both paired tests, and the relative residual of the
    condition fitted on the training set (``residual``) and on held-out images (``residual_heldout``), one
    per seed (empty where the cell fitted none)."""
    verdict = works(cell, network, rule, level=level, configs=configs)
    disjoint, untrained = verdict["tests"]
    return {"network": network, "trained": cell.counts(network, rule, configs=configs),
            "disjoint": cell.counts(disjoint, rule, configs=configs),
            "untrained": cell.counts(untrained, rule, configs=configs),
            "works": verdict["works"], "vs_disjoint": verdict["tests"][disjoint],
            "vs_untrained": verdict["tests"][untrained],
            "residual": [s.residuals[network] for s in cell.seeds if network in s.residuals],
            "residual_heldout": [s.residuals_heldout[network] for s in cell.seeds if network in s.residuals_heldout]}


def effect(test: Mapping, more: str, less: str, same: str, level: float = 0.05) -> str:
    """A sentence fragment that follows a :func:`paired_seed_test`: ``more`` when ``p < level`` and the
    interval lies above zero, ``less`` when it lies below, ``same`` otherwise (a difference this run cannot
    tell from no difference)."""
    if test["p"] < level and test["lo"] > 0:
        return more
    if test["p"] < level and test["hi"] < 0:
        return less
    return same


def plot_residual_seeds(rows: Mapping[str, Mapping]):
    """Relative residual of the fitted stationarity condition, one column per row of ``rows = {label:
    {"residual": [per seed], "residual_heldout": [per seed]}}``: every seed a point (training set, and held-out
    images beside it), the mean a black bar. Labels are drawn horizontally, one row per line of text."""
    import matplotlib.pyplot as plt

    labels = list(rows)
    fig, ax = plt.subplots(figsize=(1.2 + 1.15 * len(labels), 3.6))
    xs = np.arange(len(labels), dtype=float)
    for j, (key, name, color) in enumerate((("residual", "training set", "tab:blue"),
                                            ("residual_heldout", "held-out images", "tab:grey"))):
        offset = (j - 0.5) * 0.3
        for x, label in zip(xs, labels):
            v = np.asarray(rows[label].get(key, []), dtype=float)
            if not v.size:
                continue
            jitter = (np.arange(v.size) - (v.size - 1) / 2) * 0.03
            ax.scatter(x + offset + jitter, v, s=16, color=color, alpha=0.8, zorder=2,
                       label=name if x == xs[0] else None)
            ax.hlines(v.mean(), x + offset - 0.12, x + offset + 0.12, color="black", lw=1.8, zorder=3)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("relative residual of the fit")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_decay_sweep(panels: Mapping[str, tuple], n_train: int | None = None):
    """Memorisation against weight decay, one panel per task: ``panels = {title: (decays, {network: [[count
    per seed] per decay]})}``. Decays sit at evenly spaced positions labelled by their value; every seed is a
    small point, the mean over seeds a line."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.3), squeeze=False, sharey=True)
    markers = ["o", "s", "^", "d", "v"]
    for ax, (title, (decays, counts)) in zip(axes[0], panels.items()):
        xs = np.arange(len(decays), dtype=float)
        for j, (name, per_decay) in enumerate(counts.items()):
            offset = (j - (len(counts) - 1) / 2) * 0.12
            values = [np.asarray(v, dtype=float) for v in per_decay]
            for x, v in zip(xs, values):
                ax.scatter(np.full(v.size, x + offset), v, s=13, alpha=0.55, color=f"C{j}", marker=markers[j % 5],
                           linewidths=0)
            ax.plot(xs + offset, [v.mean() for v in values], "-", color=f"C{j}", marker=markers[j % 5],
                    markersize=6, label=f"{name} (mean)")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{d:g}" for d in decays])
        ax.set(xlabel="weight decay", xlim=(-0.5, len(decays) - 0.5), title=title)
        ax.title.set_fontsize(8)
    axes[0, 0].set_ylabel("memorised (per data seed)" + (f", of {n_train}" if n_train else ""))
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig

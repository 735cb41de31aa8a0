"""One cell of the reconstruction experiment of chapters 01 and 02, replicated over data seeds.

A cell is a dataset, a training-set size, a labelling (``target_fn``) and a training recipe. For every
data seed it draws a fresh attacked set, a disjoint control set of the same size and classes, and a
held-out pool (:func:`imprint.data.images.load_image_splits`); trains the attacked network and the
disjoint control from one initialisation; takes the untrained network at that initialisation; attacks
every network with every configuration of the search; and scores each configuration against the
attacked set, the bar being the nearest held-out image of the same class.

All seeds of a cell are trained in one batched gradient-descent run per schedule and attacked in one
batched extraction (every network of every seed, every configuration). That needs one pixel box for all
of them, so every split is centred on the mean of the whole dataset rather than on its own training
mean: the attacker knows the data's format and its mean, and the attacked network, its disjoint control
and every seed see the same preprocessing. Training and extraction checkpoint under keyed folders of
``out``, so a killed run resumes and a rerun with other settings starts afresh.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from imprint.data.digits import ImageSplit
from imprint.data.images import check_data_seeds, fixed_heldout, load_image_splits, load_images, max_heldout
from imprint.models.mlp import TrainConfig, batched_forward, init_weights, margins as output_margins, train_mlps
from imprint.reconstruction.evaluation import (BaselineScores, SearchScores, baseline_scores, margin_share,
                                               paired_seed_test, score_search)
from imprint.reconstruction.extraction import ExtractionConfig, ExtractionResult, Hyperparameters, attack_networks
from imprint.reconstruction.kkt import candidate_labels, fit_kkt_multipliers
from imprint.runtime.checkpoint import keyed_dir
from imprint.runtime.checks import require_choice, require_int

CONTROLS = ("disjoint", "untrained")


def class_halves(n_classes: int = 10, seed: int = 0) -> tuple[tuple[int, ...], Callable[[Tensor], Tensor]]:
    """A fixed random split of ``0..n_classes-1`` into two halves, and its binary target function (+1 for
    the first half). ``seed`` picks the split (numpy's permutation); the halves are returned sorted."""
    require_int("n_classes", n_classes, minimum=2)
    require_int("seed", seed, minimum=0)
    perm = np.random.default_rng(seed).permutation(n_classes)
    positive = tuple(sorted(int(c) for c in perm[: n_classes // 2]))

    def targets(labels: Tensor) -> Tensor:
        return torch.where(torch.isin(labels, torch.tensor(positive, device=labels.device)), 1.0, -1.0)

    return positive, targets


@dataclass
class SeedResult:
    """One data seed of a cell: its splits (centred on the dataset mean), the attacked networks' weights,
    every network's extraction and scores, and the trained networks' margins and fitted multipliers."""

    data_seed: int
    split: ImageSplit  # the attacked set and the held-out pool
    disjoint: ImageSplit  # the control's training set (same pool)
    train_targets: Tensor
    networks: dict[str, list[Tensor]]
    results: dict[str, ExtractionResult]
    searches: dict[str, SearchScores]
    baseline: BaselineScores
    train_loss: dict[str, float] = field(default_factory=dict)
    margins: dict[str, Tensor] = field(default_factory=dict)  # per trained network, on the attacked set
    multipliers: dict[str, Tensor] = field(default_factory=dict)  # NNLS fit on the attacked set
    residuals: dict[str, float] = field(default_factory=dict)  # relative KKT residual of that fit
    norms: dict[str, float] = field(default_factory=dict)  # parameter norm of every trained network, as trained
    residuals_heldout: dict[str, float] = field(default_factory=dict)  # the same fit on held-out images (heldout_fit)

    def pick(self, network: str, rule: str = "count", configs: int | None = None) -> int:
        """The configuration chosen on ``network``: most memorised (``count``, the oracle rule) or lowest
        final KKT loss (``loss``, the attacker's rule), among the first ``configs`` (None: all)."""
        require_choice("rule", rule, ["count", "loss"])
        s = self.searches[network]
        k = len(s.scores) if configs is None else min(int(configs), len(s.scores))
        if rule == "count":
            return int(torch.argmax(s.counts[:k]))
        loss = torch.where(s.diverged[:k] | ~torch.isfinite(s.final_kkt_loss[:k]),
                           torch.full_like(s.final_kkt_loss[:k], float("inf")), s.final_kkt_loss[:k])
        return int(torch.argmin(loss))

    def counts(self, network: str, rule: str = "count", configs: int | None = None) -> dict:
        return self.searches[network].scores[self.pick(network, rule, configs)].counts()


@dataclass
class CellResult:
    """Every seed of one cell, and the statistics across seeds."""

    name: str
    n_train: int
    n_heldout: int
    data_seeds: list[int]
    networks: list[str]  # attacked networks first, then the controls
    seeds: list[SeedResult]
    hyper: Hyperparameters
    labels: Tensor

    def counts(self, network: str, rule: str = "count", key: str = "memorisation_count",
               configs: int | None = None) -> list[int]:
        """``key`` of the configuration picked by ``rule`` on ``network``, one value per data seed."""
        return [int(s.counts(network, rule, configs)[key]) for s in self.seeds]

    def paired(self, network: str, control: str, rule: str = "count", configs: int | None = None,
               seed: int = 0) -> dict:
        """:func:`paired_seed_test` of ``network``'s per-seed memorisation counts against ``control``'s."""
        return paired_seed_test(self.counts(network, rule, configs=configs),
                                self.counts(control, rule, configs=configs), seed=seed)

    def margin_share(self, network: str = "trained", rule: str = "count", quantile: float = 0.1) -> dict:
        """Per seed :func:`margin_share` of ``network``'s memorised images, and the pooled 2x2 table (each
        seed's low group taken within the seed) with Fisher's exact test."""
        from scipy.stats import fisher_exact

        per_seed = []
        for s in self.seeds:
            memorised = s.searches[network].scores[s.pick(network, rule)].memorised
            per_seed.append(margin_share(s.margins[network], memorised, quantile))
        k_low = sum(r["memorised_low"] for r in per_seed)
        n_low = sum(r["n_low"] for r in per_seed)
        k_rest = sum(r["memorised_rest"] for r in per_seed)
        n_rest = sum(r["n_rest"] for r in per_seed)
        odds, p = fisher_exact([[k_low, n_low - k_low], [k_rest, n_rest - k_rest]], alternative="two-sided")
        return {"per_seed": per_seed, "memorised_low": k_low, "n_low": n_low, "memorised_rest": k_rest,
                "n_rest": n_rest, "share_low": k_low / n_low if n_low else float("nan"),
                "share_rest": k_rest / n_rest if n_rest else float("nan"), "odds_ratio": float(odds),
                "p": float(p)}


def _recentre(split: ImageSplit, mean: Tensor) -> ImageSplit:
    shift = split.mean - mean
    return ImageSplit(split.x_train + shift, split.label_train, split.x_heldout + shift, split.label_heldout,
                      mean.clone(), split.image_shape)


def _schedule_tag(config: TrainConfig, base: TrainConfig | None = None) -> str:
    """``_<schedule>`` for another schedule than the constant one, then ``_wd<decay>`` when the weight decay
    differs from ``base``'s: a recipe of ``schedules`` names its networks by what sets it apart."""
    tag = "" if config.schedule == "constant" else f"_{config.schedule}"
    if base is not None and config.weight_decay != base.weight_decay:
        tag += f"_wd{config.weight_decay:g}"
    return tag


def free_sign_fit(weights: Sequence[Tensor], x: Tensor) -> tuple[Tensor, float]:
    """The general form's fit on a one-output network: ``lam = argmin ||theta - sum_i lam_i grad Phi(x_i)||``
    with ``lam`` of free sign (least squares in the Gram form, float64), and its relative residual. No fit
    with signed, non-negative multipliers can do better, so it bounds the binary form's residual below."""
    from imprint.reconstruction.kkt import constraint_gradients

    w = [v.detach().double() for v in weights]
    if w[-1].shape[0] != 1:
        raise ValueError(f"weights[-1] has {w[-1].shape[0]} outputs: the free-sign fit expects a one-output network")
    theta = torch.cat([v.reshape(-1) for v in w])
    x = x.double().to(theta.device)
    rows = constraint_gradients(w, x, torch.ones(len(x), dtype=torch.float64, device=theta.device), "binary")
    lam = torch.linalg.pinv(rows @ rows.T, hermitian=True) @ (rows @ theta)
    return lam.cpu(), float((theta - rows.T @ lam).norm() / theta.norm())


def check_cell(dataset: str, n_train: int, data_seeds: Sequence[int], sizes: Sequence[int] | None = None,
               n_heldout: int | None = None, data_dir: str | Path | None = None,
               classes: Sequence[int] | None = None) -> tuple[list[int], int]:
    """The checks of :func:`run_cell` that need no compute: the data seeds (at least one, distinct), the
    training-set size (in ``sizes`` when given) and the held-out pool size (the same at every size of
    ``sizes``: at most what the largest size leaves). Returns the seeds and the pool size."""
    seeds = check_data_seeds(list(data_seeds) if not isinstance(data_seeds, (str, bytes)) else data_seeds)
    n_train = require_int("n_train", n_train, minimum=2)
    if n_heldout is not None:
        require_int("n_heldout", n_heldout, minimum=1)
    _, labels, _ = load_images(dataset, data_dir)
    if classes is not None:
        labels = labels[np.isin(labels, list(classes))]
    if sizes is not None:
        if n_train not in list(sizes):
            raise ValueError(f"sizes={list(sizes)}: expected it to contain n_train={n_train}")
        return seeds, fixed_heldout(labels, sizes, n_heldout, classes)
    pool = max_heldout(labels, n_train, classes)
    if n_heldout is not None and n_heldout > pool:
        raise ValueError(f"n_heldout={n_heldout}: two training sets of n_train={n_train} leave a balanced pool "
                         f"of at most {pool} images; expected n_heldout <= {pool}")
    return seeds, pool if n_heldout is None else n_heldout


def run_cell(name: str, dataset: str, n_train: int, target_fn: Callable[[Tensor], Tensor],
             data_seeds: Sequence[int], train_config: TrainConfig, hyper: Hyperparameters,
             extract_config: ExtractionConfig, out: str | Path, *, sizes: Sequence[int] | None = None,
             n_heldout: int | None = None, data_dir: str | Path | None = None,
             classes: Sequence[int] | None = None, schedules: Sequence[TrainConfig] = (), init_seed: int = 0,
             pixel_box: bool = True, fit_multipliers: bool = True, n_classes: int = 2, match_norm: bool = True,
             heldout_fit: bool = False, device: torch.device | str = "cpu", progress: bool = False) -> CellResult:
    """The attack on one cell for every seed of ``data_seeds``, with both controls.

    ``target_fn`` maps class labels to the training targets: +-1 for ``extract_config.form == "binary"``
    (logistic loss), class indices ``0..n_classes-1`` for the multiclass forms (cross-entropy). The
    attacked network ``trained`` and the control ``disjoint`` follow ``train_config``; each config of
    ``schedules`` adds an attacked network and a disjoint control trained by it from the same
    initialisation (named ``trained_<schedule>``, ``disjoint_<schedule>``). ``untrained`` is that
    initialisation itself. The networks of seed ``s`` start from ``init_weights`` of seed
    ``1000 * init_seed + s``. With ``match_norm`` the networks of ``schedules`` are attacked at the parameter
    norm of the plain network with the same data and initialisation (their trained norms are kept in
    ``SeedResult.norms``). ``sizes`` fixes the held-out pool at the size the largest of them allows
    (or checks ``n_heldout`` against it). Candidates are ``m = 2 n`` in equal shares per label.

    A recipe of ``schedules`` may differ from ``train_config`` by its weight decay instead of (or beside)
    its schedule; its networks are then named ``trained_wd<decay>``, ``disjoint_wd<decay>`` (pass
    ``match_norm=False`` to attack them as trained). The form ``general`` with a logistic ``train_config``
    attacks one-output networks, whose free-sign multipliers carry no label: candidates are matched to
    training images of any class, and the fit is :func:`free_sign_fit`. With ``heldout_fit`` the same fit
    is made on the first ``n_train`` held-out images (``SeedResult.residuals_heldout``), the chance level
    of the residual.
    """
    seeds, pool = check_cell(dataset, n_train, data_seeds, sizes, n_heldout, data_dir, classes)
    # a one-output network for the binary form, and for the general form with the logistic loss
    binary = extract_config.form == "binary" or (extract_config.form == "general" and train_config.loss == "logistic")
    label_free = extract_config.form == "general" and binary
    configs = [train_config, *schedules]
    for c in configs:
        if c.loss != ("logistic" if binary else "cross_entropy"):
            raise ValueError(f"loss={c.loss!r} with form={extract_config.form!r}: expected "
                             f"{'logistic' if binary else 'cross_entropy'}")
    tags = [_schedule_tag(c, train_config) for c in schedules]
    if len(set(tags)) != len(tags) or "" in tags:
        raise ValueError(f"schedules have schedules {[c.schedule for c in schedules]} (weight decays "
                         f"{[c.weight_decay for c in schedules]}): expected distinct ones, other than train_config's")
    out = Path(out)
    device = torch.device(device)

    images, labels, _ = load_images(dataset, data_dir)
    if classes is not None:
        keep = np.isin(labels, list(classes))
        images, labels = images[keep], labels[keep]
    mean = torch.as_tensor(images.reshape(len(images), -1).mean(0), dtype=torch.float32)
    splits = []
    for s in seeds:
        both = load_image_splits(dataset, n_train, pool, s, classes=classes, data_dir=data_dir)
        splits.append((_recentre(both.target, mean), _recentre(both.disjoint, mean)))
    d = splits[0][0].d
    x = torch.stack([sp.x_train for pair in splits for sp in pair])
    y = torch.stack([target_fn(sp.label_train) for pair in splits for sp in pair])
    init = [1000 * init_seed + s for s in seeds for _ in range(2)]
    key = dict(dataset=dataset, n=n_train, seeds=seeds, pool=pool, classes=None if classes is None else list(classes),
               targets=[t.tolist() for t in y[::2]], centring="dataset")

    weights: dict[str, list[list[Tensor]]] = {}  # name -> per seed -> layers
    train_loss: dict[str, list[float]] = {}
    for config, tag in zip(configs, ["", *tags]):
        trained = train_mlps(x, y, config, device=device, seeds=init, progress=progress, n_classes=n_classes,
                             checkpoint_dir=keyed_dir(out / "training", **key, train=config.__dict__ | {"steps": None}))
        for j, role in enumerate(("trained", "disjoint")):
            weights[role + tag] = [[w[2 * i + j] for w in trained.weights] for i in range(len(seeds))]
        train_loss["trained" + tag] = [float(v) for v in trained.history["loss"][-1, ::2]]
    norms = {k: [float(torch.sqrt(sum((w.double() ** 2).sum() for w in ws))) for ws in v] for k, v in weights.items()}
    if match_norm:
        # a homogeneous network's direction (its KKT point, its decisions) is unchanged by a common factor
        # on its parameters, the attack's surrogate derivative and multiplier floor are not: a network of
        # another schedule is attacked at the norm of the plain network with its data and initialisation
        for tag in tags:
            for role in ("trained", "disjoint"):
                for i, ws in enumerate(weights[role + tag]):
                    factor = norms[role][i] / norms[role + tag][i]
                    weights[role + tag][i] = [w * factor for w in ws]
    dtype = weights["trained"][0][0].dtype
    d_out = 1 if binary else n_classes
    initial = init_weights(d, d_out, train_config, init[::2], dtype=dtype)
    weights["untrained"] = [[w[i].to(device) for w in initial] for i in range(len(seeds))]
    names = ["trained", *("trained" + t for t in tags), "disjoint", *("disjoint" + t for t in tags), "untrained"]

    labels_c = candidate_labels(2 * n_train, 2, signed=True) if binary else candidate_labels(2 * n_train, n_classes)
    box = (-mean, 1 - mean) if pixel_box else None
    batch = {f"{net}@{s}": weights[net][i] for i, s in enumerate(seeds) for net in names}
    results = attack_networks(batch, labels_c, n_train, hyper, extract_config, device=device, progress=progress,
                              box=box, checkpoint_dir=keyed_dir(out / "extraction", **key, name=name,
                                                                train=[c.__dict__ | {"steps": c.steps} for c in configs],
                                                                extract=extract_config.__dict__ | {"steps": None},
                                                                hyper=hyper.rows(), box=pixel_box,
                                                                match_norm=match_norm))
    cell = []
    form = extract_config.form
    for i, s in enumerate(seeds):
        split, disjoint = splits[i]
        targets = target_fn(split.label_train)
        baseline = baseline_scores(split.x_train, split.label_train, split.x_heldout, split.label_heldout,
                                   split.mean, split.image_shape)
        train_targets = targets.long()
        res = {net: results[f"{net}@{s}"] for net in names}
        searches = {net: score_search(r, split.x_train, split.mean, split.image_shape, baseline,
                                      train_targets=None if label_free else train_targets,
                                      candidate_targets=None if label_free else labels_c)
                    for net, r in res.items()}
        seed_result = SeedResult(s, split, disjoint, targets, {net: weights[net][i] for net in names}, res, searches,
                                 baseline, {k: v[i] for k, v in train_loss.items()},
                                 norms={k: v[i] for k, v in norms.items()})
        for net in ["trained", *("trained" + t for t in tags)]:
            w = [v.detach().double() for v in weights[net][i]]  # where training ran: the fit is one Jacobian
            xt = split.x_train.double().to(w[0].device)
            with torch.no_grad():
                f = batched_forward([v.unsqueeze(0) for v in w], xt.unsqueeze(0))[0]
            tgt = (targets.double() if binary else targets.long()).to(w[0].device)
            seed_result.margins[net] = output_margins(f, tgt.unsqueeze(0),
                                                      "logistic" if binary else "cross_entropy")[0].cpu()
            if fit_multipliers:
                def fit(xs, ys):
                    return free_sign_fit(w, xs) if label_free else fit_kkt_multipliers(w, xs, ys, form)

                lam, residual = fit(xt, tgt)
                seed_result.multipliers[net], seed_result.residuals[net] = lam, residual
                if heldout_fit:
                    k = min(n_train, len(split.x_heldout))
                    th = target_fn(split.label_heldout[:k])
                    seed_result.residuals_heldout[net] = fit(split.x_heldout[:k].double().to(w[0].device),
                                                             (th.double() if binary else th.long()).to(w[0].device))[1]
        cell.append(seed_result)
    return CellResult(name, n_train, pool, seeds, names, cell, hyper, labels_c)


def works(cell: CellResult, network: str = "trained", rule: str = "count", level: float = 0.05,
          configs: int | None = None) -> dict:
    """The chapter's verdict on a cell: the attack works on ``network`` when the paired test against BOTH
    controls has ``p < level`` and both mean differences' intervals lie above zero."""
    if not network.startswith("trained") or network not in cell.networks:
        raise ValueError(f"network={network!r}: expected one of the attacked networks "
                         f"{[n for n in cell.networks if n.startswith('trained')]}")
    controls = ["disjoint" + network[len("trained"):], "untrained"]
    tests = {c: cell.paired(network, c, rule, configs) for c in controls}
    ok = all(t["p"] < level and t["lo"] > 0 for t in tests.values())
    return {"works": bool(ok), "tests": tests}

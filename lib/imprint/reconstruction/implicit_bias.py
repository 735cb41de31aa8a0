"""How close are trained weights to a KKT point of the max-margin problem? (chapter 00)

For a network Phi(theta; x) homogeneous in theta, gradient descent on the logistic loss converges in
direction to a KKT point of  min ||theta||^2 / 2  s.t.  y_i Phi(theta; x_i) >= 1  (Lyu & Li 2019), whose
stationarity condition reads  theta = sum_i lam_i y_i grad_theta Phi(theta; x_i)  with lam >= 0 and
lam_i = 0 off the margin. Given the training set, the best multipliers are a non-negative least-squares
problem; its residual relative to ||theta|| measures how far training is from that point.

The Jacobian J (n x P) is formed with torch.func (vmap of grad); the NNLS problem is solved in its
n x n Gram form, which is exact: ||theta - A lam||^2 = lam^T G lam - 2 b^T lam + ||theta||^2 with
A = J^T diag(y), G = A^T A and b = A^T theta.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.optimize
import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def output_jacobian(model: nn.Module, x: Float[Tensor, "n d"], chunk_size: int | None = 64,
                    dtype: torch.dtype = torch.float64) -> Float[Tensor, "n p"]:
    """Rows grad_theta Phi(theta; x_i) for a scalar-output model, parameters flattened in order."""
    params = {k: v.detach().to(dtype) for k, v in model.named_parameters()}

    def phi(p, xi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        if out.numel() != 1:
            raise ValueError(f"model output has {out.numel()} entries per example: expected a scalar output")
        return out.reshape(())

    grads = vmap(grad(phi), in_dims=(None, 0), chunk_size=chunk_size)(params, x.to(dtype))
    return torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], dim=1)


def flat_params(model: nn.Module, dtype: torch.dtype = torch.float64) -> Float[Tensor, " p"]:
    return torch.cat([p.detach().reshape(-1).to(dtype) for p in model.parameters()])


def nnls_gram(gram: Float[Tensor, "n n"], rhs: Float[Tensor, " n"], rel_eig_tol: float = 1e-12,
              rel_ridge: float = 1e-12) -> np.ndarray:
    """argmin_{lam >= 0} lam^T G lam - 2 rhs^T lam, via scipy's NNLS on a square root of G.

    When G is singular the minimisers form a set (any null vector of G can be added); a ridge of
    ``rel_ridge * max eigenvalue`` picks the smallest one, so the multipliers stay bounded.
    """
    evals, evecs = np.linalg.eigh(gram.double().cpu().numpy())
    top = max(float(evals.max()), 0.0)
    keep = evals > rel_eig_tol * top
    if not keep.any():
        return np.zeros(gram.shape[0])
    root = np.sqrt(evals[keep])
    a = root[:, None] * evecs[:, keep].T  # G = a^T a on the kept subspace
    c = (evecs[:, keep].T @ rhs.double().cpu().numpy()) / root
    n = gram.shape[0]
    a = np.vstack([a, np.sqrt(rel_ridge * top) * np.eye(n)])
    c = np.concatenate([c, np.zeros(n)])
    lam, _ = scipy.optimize.nnls(a, c, maxiter=50 * n)
    return lam


@dataclass(frozen=True)
class KKTFit:
    """NNLS multipliers and the stationarity residual ||theta - sum_i lam_i y_i grad Phi(x_i)|| / ||theta||."""

    lam: np.ndarray
    rel_residual: float
    margins: np.ndarray  # y_i Phi(theta; x_i)
    layer_residuals: dict[str, float]  # the same residual restricted to each parameter tensor

    @property
    def support(self) -> np.ndarray:
        """Indices with lam_i > 0 (relative to the largest multiplier), the support vectors."""
        return np.flatnonzero(self.lam > 1e-6 * max(self.lam.max(), 1e-300))


def save_fit(path, fit: KKTFit) -> None:
    """Store a fit (safetensors + JSON metadata), so that a resumed notebook need not refit."""
    from imprint.runtime.io import atomic_save_tensors

    atomic_save_tensors(path, {"lam": torch.as_tensor(fit.lam), "margins": torch.as_tensor(fit.margins)},
                        {"rel_residual": fit.rel_residual, "layer_residuals": fit.layer_residuals})


def load_fit(path) -> KKTFit:
    from imprint.runtime.io import load_tensor_metadata, load_tensors

    tensors, meta = load_tensors(path), load_tensor_metadata(path)
    return KKTFit(tensors["lam"].numpy(), float(meta["rel_residual"]), tensors["margins"].numpy(),
                  dict(meta["layer_residuals"]))


def fit_kkt_multipliers(jac: Float[Tensor, "n p"], theta: Float[Tensor, " p"],
                        y: Float[Tensor, " n"]) -> tuple[np.ndarray, Float[Tensor, " p"]]:
    """Best lam >= 0 for theta ~ J^T (y * lam), and the residual vector theta - J^T (y * lam)."""
    a_t = jac.double() * y.double().to(jac.device)[:, None]  # rows y_i grad Phi(x_i)
    theta = theta.double().to(jac.device)
    lam = nnls_gram(a_t @ a_t.T, a_t @ theta)
    lam_t = torch.as_tensor(lam, dtype=torch.float64, device=jac.device)
    return lam, theta - a_t.T @ lam_t


def kkt_fit(model: nn.Module, x: Float[Tensor, "n d"], y: Float[Tensor, " n"], chunk_size: int | None = 64) -> KKTFit:
    """Multipliers, residual and margins of a scalar-output model on its training set (float64)."""
    jac = output_jacobian(model, x, chunk_size=chunk_size)
    theta = flat_params(model).to(jac.device)
    lam, residual = fit_kkt_multipliers(jac, theta, y)
    names = [name for name, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    layers = {name: float(r.norm() / t.norm()) for name, r, t in
              zip(names, residual.split(sizes), theta.split(sizes))}
    with torch.no_grad():
        model64 = {k: v.detach().double() for k, v in model.named_parameters()}
        out = functional_call(model, model64, (x.double(),)).reshape(-1)
    return KKTFit(lam, float(residual.norm() / theta.norm()), (y.double().to(out.device) * out).cpu().numpy(),
                  layers)



# ------------------------------------------------------------------------------ one run of chapter 00

def _digit_class_counts() -> np.ndarray:
    """How many of scikit-learn's 8x8 digits each class 0..9 has (the pool every split draws from)."""
    from sklearn.datasets import load_digits

    return np.bincount(load_digits().target, minlength=10)


def _balanced_counts(n: int, n_classes: int) -> np.ndarray:
    """Images per class of a balanced draw of ``n`` (the first ``n % n_classes`` classes get one more)."""
    return np.array([n // n_classes + (1 if i < n % n_classes else 0) for i in range(n_classes)])


def check_digit_sizes(n_train, n_heldout) -> tuple[int, int]:
    """``n_train`` and ``n_heldout`` checked to fit, balanced and disjoint, in the digits of every class."""
    from imprint.runtime.checks import require_int

    n_train = require_int("n_train", n_train, minimum=2)
    n_heldout = require_int("n_heldout", n_heldout, minimum=1)
    counts = _digit_class_counts()
    need = _balanced_counts(n_train, len(counts)) + _balanced_counts(n_heldout, len(counts))
    short = np.flatnonzero(need > counts)
    if short.size:
        c = int(short[0])
        raise ValueError(f"n_train={n_train} and n_heldout={n_heldout} (n_train + n_heldout = {n_train + n_heldout}) "
                         f"ask for {int(need[c])} digits of class {c}, but the {int(counts.sum())} digits hold only "
                         f"{int(counts[c])} of it: expected n_train + n_heldout to fit, balanced, in every class")
    return n_train, n_heldout


def init_seed_of(init_seed: int, data_seed: int) -> int:
    """The initialisation seed of the network trained on data seed ``data_seed`` (one stream per pair)."""
    return int(np.random.SeedSequence([int(init_seed), int(data_seed)]).generate_state(1)[0])


def log_snapshots(steps: int, log_every: int, n_snapshots: int) -> list[int]:
    """Up to ``n_snapshots`` multiples of ``log_every`` on a logarithmic grid, ending at ``steps``."""
    from imprint.runtime.checks import require_int

    steps = require_int("steps", steps, minimum=1)
    log_every = require_int("log_every", log_every, minimum=1)
    n_snapshots = require_int("n_snapshots", n_snapshots, minimum=1)
    grid = np.geomspace(min(log_every, steps), steps, n_snapshots)
    snaps = sorted({min(steps, max(log_every, int(round(s / log_every)) * log_every)) for s in grid[:-1]} | {steps})
    return [int(s) for s in snaps]


@dataclass
class ImplicitBiasRun:
    """One schedule trained on every data seed at once (network k on data seed ``data_seeds[k]``).

    ``fits[t][k]`` and ``fits_heldout[t][k]`` are the KKT fits of network k at ``snapshots[t]``, on its
    training set and on its held-out control set of the same data seed; ``history`` is the trainer's log
    (``[logs, networks]`` per quantity); ``test_accuracy[k]`` is network k's accuracy on its held-out set.
    """

    data_seeds: list[int]
    init_seeds: list[int]
    snapshots: list[int]
    fits: list[list[KKTFit]]
    fits_heldout: list[list[KKTFit]]
    history: dict[str, Tensor]
    test_accuracy: np.ndarray
    result: object  # imprint.models.mlp.TrainResult at the last snapshot
    splits: list  # imprint.data.digits.ImageSplit per data seed

    def final(self, heldout: bool = False) -> list[KKTFit]:
        return (self.fits_heldout if heldout else self.fits)[-1]

    def residuals(self, heldout: bool = False) -> np.ndarray:
        """``[snapshots, networks]`` relative KKT residuals."""
        return np.array([[f.rel_residual for f in row] for row in (self.fits_heldout if heldout else self.fits)])


def run_implicit_bias(data_seeds, n_train: int, n_heldout: int, config, snapshots=None, init_seed: int = 0,
                      device: torch.device | str = "cpu", checkpoint_dir=None, chunk_size: int | None = 64
                      ) -> ImplicitBiasRun:
    """Train one network per data seed (even vs odd digits, a fresh balanced draw of ``n_train`` training
    and ``n_heldout`` held-out digits per seed) in one batched ``train_mlps`` call and fit the KKT
    multipliers of each, on its training set and on its held-out set, at every snapshot step.

    ``config`` is an :class:`imprint.models.mlp.TrainConfig` (its ``steps`` the last snapshot; ``snapshots``
    None: that step only). With ``checkpoint_dir`` training checkpoints into, and the fits are stored in,
    ``keyed_dir(checkpoint_dir, ...)`` of everything that determines them: a rerun resumes and refits
    nothing it already has. Without it a temporary folder carries training from one snapshot to the next.
    Network k starts from :func:`init_seed_of` ``(init_seed, data_seeds[k])``.
    """
    from imprint.data.digits import even_odd_targets, load_digit_split
    from imprint.data.images import check_data_seeds
    from imprint.models.mlp import TrainConfig, train_mlps
    from imprint.runtime.checkpoint import keyed_dir
    from imprint.runtime.checks import require_int

    data_seeds = check_data_seeds(data_seeds)
    n_train, n_heldout = check_digit_sizes(n_train, n_heldout)
    init_seed = require_int("init_seed", init_seed, minimum=0)
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config={config!r}: expected an imprint.models.mlp.TrainConfig")
    if config.loss != "logistic":
        raise ValueError(f"config.loss={config.loss!r}: expected 'logistic' (the binary max-margin problem)")
    snapshots = [config.steps] if snapshots is None else [require_int(f"snapshots[{i}]", s, minimum=1)
                                                          for i, s in enumerate(snapshots)]
    if not snapshots or snapshots != sorted(set(snapshots)) or snapshots[-1] != config.steps:
        raise ValueError(f"snapshots={snapshots}: expected increasing steps ending at config.steps={config.steps}")
    device = torch.device(device)

    splits = [load_digit_split(n_train, n_heldout, s) for s in data_seeds]
    x = torch.stack([sp.x_train for sp in splits])
    y = torch.stack([even_odd_targets(sp.label_train) for sp in splits])
    y_heldout = [even_odd_targets(sp.label_heldout) for sp in splits]
    seeds = [init_seed_of(init_seed, s) for s in data_seeds]
    if checkpoint_dir is None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            return run_implicit_bias(data_seeds, n_train, n_heldout, config, snapshots, init_seed, device, tmp,
                                     chunk_size)
    key = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()
           if k not in ("steps", "checkpoint_every", "log_every", "graph_steps")}
    folder = keyed_dir(checkpoint_dir, config=key, n_train=n_train, n_heldout=n_heldout,
                       data_seeds=data_seeds, init_seeds=seeds)

    def fit_all(result) -> tuple[list[KKTFit], list[KKTFit]]:
        nets = [result.model(k, dtype=torch.float64).to(device) for k in range(len(data_seeds))]
        train = [kkt_fit(net, sp.x_train.to(device), y[k].to(device), chunk_size) for k, (net, sp) in
                 enumerate(zip(nets, splits))]
        held = [kkt_fit(net, sp.x_heldout.to(device), y_heldout[k].to(device), chunk_size) for k, (net, sp) in
                enumerate(zip(nets, splits))]
        return train, held

    fits, fits_heldout, result = [], [], None
    for s in snapshots:
        cfg = TrainConfig(**{**config.__dict__, "steps": s})
        files = [folder / f"fit-{s:010d}-{part}-{ds}.safetensors" for part in ("train", "heldout")
                 for ds in data_seeds]
        if all(f.exists() for f in files):
            loaded = [load_fit(f) for f in files]
            train, held = loaded[:len(data_seeds)], loaded[len(data_seeds):]
        else:
            result = train_mlps(x, y, cfg, device=device, seeds=seeds, checkpoint_dir=folder, progress=False)
            train, held = fit_all(result)
            for f, fit in zip(files, train + held):
                save_fit(f, fit)
        fits.append(train)
        fits_heldout.append(held)
    if result is None or result.config.steps != config.steps:  # the last fits were loaded: load its weights
        result = train_mlps(x, y, config, device=device, seeds=seeds, checkpoint_dir=folder, progress=False)
    accuracy = []
    with torch.no_grad():
        for k, sp in enumerate(splits):
            out = result.model(k, dtype=torch.float64)(sp.x_heldout.double())[:, 0]
            accuracy.append(float((torch.sign(out) == y_heldout[k].double()).double().mean()))
    return ImplicitBiasRun(data_seeds, seeds, snapshots, fits, fits_heldout, result.history,
                           np.array(accuracy), result, splits)


def mean_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-seed values and its Student-t interval (NaN bounds for a single value)."""
    import scipy.stats

    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values has shape {v.shape}: expected a non-empty list, one value per seed")
    mean = float(v.mean())
    if v.size < 2:
        return mean, float("nan"), float("nan")
    half = float(scipy.stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return mean, mean - half, mean + half

"""Extraction steps per second: the one-backward KKT loss against a per-candidate loop, and K batched
hyperparameter configurations against K separate runs.

Baseline 1 (per-candidate loop): the stationarity residual built one candidate at a time, each with its
own ``autograd.grad(create_graph=True)`` (``reference_kkt_residuals``), then one backward to the
candidates. Candidate: ``kkt_stationarity_loss``, one backward of ``sum_j lam_j y_j Phi(x_j)`` for all
candidates. Both in float32 and float64, same network, same inputs, same process.

Baseline 2 (sequential search): K configurations, each an ``extract`` call of its own. Candidate: one
``extract`` call over the K configurations (leading configuration axis). Reported as the cost of the
batched sweep relative to ONE configuration (the goal on a GPU: 16 configurations for less than 3x one).

Writes ``benchmarks/results/kkt_<device>.json``.

    python benchmarks/bench_kkt.py --device cpu
    python benchmarks/bench_kkt.py --device cuda --widths 1000,1000 --n-train 500 --k 16 --steps 50
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from imprint.reconstruction.extraction import ExtractionConfig, extract, random_search
from imprint.reconstruction.kkt import candidate_labels, kkt_stationarity_loss, reference_kkt_residuals
from imprint.runtime import atomic_write_json, describe_device

RANGES = {"init_scale": (1e-3, 0.05, "log"), "lr_x": (1e-3, 0.1, "log"), "lr_lambda": (1e-3, 0.1, "log"),
          "lambda_min": (0.05, 0.5, "linear"), "alpha": (20.0, 300.0, "linear")}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def network(d_in: int, widths: list[int], seed: int, device, dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dims = [d_in, *widths, 1]
    return [(torch.randn(b, a, generator=gen, dtype=torch.float64) / math.sqrt(a)).to(device, dtype)
            for a, b in zip(dims[:-1], dims[1:])]


def time_steps(step, steps: int, device) -> float:
    """Seconds per call of ``step`` (after two warm-up calls)."""
    for _ in range(2):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def loss_vs_loop(weights, m: int, steps: int, loop_steps: int, device, dtype) -> dict:
    gen = torch.Generator().manual_seed(1)
    d = weights[0].shape[1]
    x = (torch.randn(1, m, d, generator=gen, dtype=torch.float64) * 0.1).to(device, dtype).requires_grad_()
    lam = torch.rand(1, m, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
    y = candidate_labels(m, signed=True).to(device)
    alpha = torch.tensor([100.0], device=device, dtype=dtype)

    def one_backward():
        loss = kkt_stationarity_loss(weights, x, lam, y, alpha).sum()
        torch.autograd.grad(loss, (x, lam))

    def per_candidate():
        loss = sum((r**2).sum() for r in reference_kkt_residuals(weights, x[0], lam[0], y, 100.0))
        torch.autograd.grad(loss, (x, lam))

    fast = time_steps(one_backward, steps, device)
    slow = time_steps(per_candidate, loop_steps, device)
    return {"steps_per_s_one_backward": 1 / fast, "steps_per_s_per_candidate_loop": 1 / slow,
            "speedup": slow / fast}


def batched_vs_sequential(weights, n_train: int, k: int, steps: int, device, dtype_name: str) -> dict:
    labels = candidate_labels(2 * n_train, signed=True)
    hyper = random_search(k, RANGES, seed=0)
    config = ExtractionConfig(steps=steps, dtype=dtype_name, log_every=steps)
    extract(weights, labels, n_train, hyper.subset([0]), ExtractionConfig(steps=2, dtype=dtype_name),
            device=device, progress=False)  # warm-up

    def run(h):
        _sync(device)
        start = time.perf_counter()
        extract(weights, labels, n_train, h, config, device=device, progress=False)
        _sync(device)
        return time.perf_counter() - start

    one = run(hyper.subset([0]))
    sequential = sum(run(hyper.subset([i])) for i in range(k))
    together = run(hyper)
    return {"k": k, "seconds_one_config": one, "seconds_k_sequential": sequential, "seconds_k_batched": together,
            "batched_over_one": together / one, "sequential_over_batched": sequential / together}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--widths", default="200,200")
    parser.add_argument("--n-train", type=int, default=50, help="m = 2 n_train candidates")
    parser.add_argument("--d-in", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--loop-steps", type=int, default=3)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--search-steps", type=int, default=10)
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    widths = [int(w) for w in args.widths.split(",")]
    m = 2 * args.n_train
    record = {"device": describe_device(device),
              "setup": {"d_in": args.d_in, "widths": widths, "n_train": args.n_train, "n_candidates": m,
                        "steps": args.steps, "loop_steps": args.loop_steps, "k": args.k,
                        "search_steps": args.search_steps},
              "one_backward_vs_per_candidate_loop": {}, "batched_configs_vs_sequential": {}}
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        weights = network(args.d_in, widths, 0, device, dtype)
        record["one_backward_vs_per_candidate_loop"][name] = loss_vs_loop(
            weights, m, args.steps, args.loop_steps, device, dtype)
        record["batched_configs_vs_sequential"][name] = batched_vs_sequential(
            weights, args.n_train, args.k, args.search_steps, device, name)
        print(name, record["one_backward_vs_per_candidate_loop"][name],
              record["batched_configs_vs_sequential"][name], flush=True)
    out = Path(__file__).parent / "results" / f"kkt_{device.type}.json"
    atomic_write_json(out, record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

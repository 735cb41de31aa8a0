"""Top-k eigenvalues of a denoiser Jacobian's symmetric part: Lanczos (matrix-free) against dense + eigh.

Baselines: the dense Jacobian of a diffusers ``UNet2DModel`` denoiser at one noisy input, then
``torch.linalg.eigvalsh`` of (J + J^T) / 2 in float64, with the rows J^T e_i either from vmapped
vector-Jacobian products after one forward pass (``dense_eigh``, ``--chunk`` rows at a time) or from one
backward pass per ``--chunk`` rows through a forward pass over ``--chunk`` copies of the input
(``dense_rows_eigh``); speedups are against the faster of the two. Candidates, in the same process on the same
operator: Lanczos with full reorthogonalisation on v -> (J v + J^T v) / 2, one product at a time; block
Lanczos applying the operator to ``k / 2`` vectors at once (vmapped); and block Lanczos on blocks of
``--block-size`` vectors through one batched pass over copies of the input (``block_lanczos_batched``; on a
GPU also replayed as CUDA graphs, ``block_lanczos_graphed``), whose Ritz values are checked every
``--check-every`` blocks. Inputs 8x8x1, 16x16x1 and 32x32x3 (d = 64, 256, 3072). Records wall time (median of
``--repeats`` after one warm-up, all methods in this process; the forward pass at the input, kept by each
operator, and the graph capture fall in the warm-up), peak memory (CUDA: ``max_memory_allocated`` above the
level before the call; CPU: the largest resident set size, sampled every half millisecond, above its level
before the call, in a fresh child process running the method once, since a process's allocator keeps the pages
earlier methods freed), Lanczos products, whether every wanted residual met ``--tol``, and the largest relative
error on the top k against ``dense_eigh``, in ``benchmarks/results/spectral_<device>.json`` (or ``--out``).
Goal: a converged matrix-free method at least 10x faster at 32x32x3 on the GPU.

    python benchmarks/bench_spectral.py --device cuda
    python benchmarks/bench_spectral.py --device cuda --sizes 32x32x3 64x64x3
    python benchmarks/bench_spectral.py --device cpu --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from imprint.models.ddpm import DDPMConfig, DDPMEnsemble
from imprint.runtime import atomic_write_json, describe_device, resolve_device
from imprint.spectral.eigensolvers import block_lanczos_eigsh, lanczos_eigsh
from imprint.spectral.operators import BatchedJacobianOperator, JacobianOperator, denoiser_jacobian

SIZES = {"8x8x1": (8, 1, (32, 64)), "16x16x1": (16, 1, (32, 64)), "32x32x3": (32, 3, (32, 64, 64)),
         "64x64x3": (64, 3, (32, 64, 64))}
DEFAULT_SIZES = ["8x8x1", "16x16x1", "32x32x3"]
GOAL_SPEEDUP_32 = 10.0


class CudaPeak:
    """Peak CUDA memory allocated inside a block, above the level at its start (bytes)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        return False


def cpu_peak_in_child(size: str, method: str, args) -> int:
    """Growth of peak RSS (bytes) while a fresh process runs ``method`` once on the ``size`` operator."""
    cmd = [sys.executable, __file__, "--child", size, method, "--k", str(args.k), "--tol", str(args.tol),
           "--chunk", str(args.chunk), "--block-size", str(args.block_size), "--check-every", str(args.check_every),
           "--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak_bytes"])


def child(size: str, method: str, args) -> None:
    import threading

    import psutil

    ops = Operators(size, torch.device("cpu"), args)
    op = ops.get(OPERATOR[method])
    op.rmatvec(torch.zeros(op.dim))  # the forward pass every method needs
    proc = psutil.Process()
    base = proc.memory_info().rss
    samples, stop = [base], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(proc.memory_info().rss)
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    METHODS[method](ops, args, torch.device("cpu"))
    stop.set()
    thread.join()
    samples.append(proc.memory_info().rss)
    print(json.dumps({"peak_bytes": max(samples) - base}))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_point(size: str, device: torch.device, t: int = 100):
    """The model, its config and the noisy input of one size (fixed seeds)."""
    image, channels, blocks = SIZES[size]
    config = DDPMConfig(image_size=image, in_channels=channels, block_out_channels=blocks, norm_num_groups=8)
    model = DDPMEnsemble.initialise(config, [0]).model(0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move off diffusers' zero-initialised output layer, as training would
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    model = model.to(device).eval()
    x_t = torch.randn(config.image_shape, generator=g)
    return model, config, x_t, t


class Operators:
    """The Jacobian operators of one size at one point, built on first use (each keeps its forward pass):
    ``vmap`` (torch.func products), ``batched`` / ``graphed`` (blocks of ``--block-size`` copies, eager or
    CUDA graphs) and ``rows`` (blocks of ``--chunk`` copies, for the dense rows)."""

    def __init__(self, size: str, device: torch.device, args):
        self.model, self.config, self.x_t, self.t = make_point(size, device)
        self.dim, self.args = self.config.dim, args
        self._ops = {}

    def get(self, kind: str) -> JacobianOperator | BatchedJacobianOperator:
        if kind not in self._ops:
            block = {"vmap": None, "batched": self.args.block_size, "graphed": self.args.block_size,
                     "rows": min(self.args.chunk, self.dim)}[kind]
            self._ops[kind] = denoiser_jacobian(self.model, self.config, self.x_t, self.t, label=3,
                                                target="denoiser", block_size=block, cuda_graph=kind == "graphed")
        return self._ops[kind]


def symmetric_top(j: torch.Tensor, k: int) -> torch.Tensor:
    j = j.double()
    return torch.linalg.eigvalsh((j + j.T) / 2).flip(0)[:k]


def dense_top(ops: Operators, args, device):
    return symmetric_top(ops.get("vmap").dense(chunk_size=args.chunk), args.k)


def dense_rows_top(ops: Operators, args, device):
    return symmetric_top(ops.get("rows").dense(), args.k)


def lanczos_top(ops: Operators, args, device):
    op = ops.get("vmap")
    return lanczos_eigsh(op.sym_matvec, op.dim, args.k, tol=args.tol, max_iter=min(op.dim, 15 * args.k), seed=0,
                         device=device)


def block_lanczos_top(ops: Operators, args, device):
    op = ops.get("vmap")
    return block_lanczos_eigsh(lambda rows: op.sym_matmat(rows, chunk_size=None), op.dim, args.k,
                               block_size=max(1, args.k // 2), max_basis=min(op.dim, 15 * args.k), tol=args.tol,
                               seed=0, device=device)


def batched_block_lanczos(kind: str):
    def top(ops: Operators, args, device):
        op = ops.get(kind)
        return block_lanczos_eigsh(op.sym_matmat, op.dim, args.k, block_size=args.block_size,
                                   max_basis=min(op.dim, 80 * args.k), tol=args.tol, seed=0,
                                   check_every=args.check_every, device=device)

    return top


METHODS = {"dense_eigh": dense_top, "dense_rows_eigh": dense_rows_top, "lanczos": lanczos_top,
           "block_lanczos": block_lanczos_top, "block_lanczos_batched": batched_block_lanczos("batched"),
           "block_lanczos_graphed": batched_block_lanczos("graphed")}
OPERATOR = {"dense_eigh": "vmap", "dense_rows_eigh": "rows", "lanczos": "vmap", "block_lanczos": "vmap",
            "block_lanczos_batched": "batched", "block_lanczos_graphed": "graphed"}
SOLVERS = ["lanczos", "block_lanczos", "block_lanczos_batched", "block_lanczos_graphed"]


def timed(fn, device, repeats: int):
    fn()  # warm-up
    times, peaks, result = [], [], None
    for _ in range(repeats):
        with CudaPeak(device) as mem:
            _sync(device)
            start = time.perf_counter()
            result = fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        peaks.append(mem.peak)
    return statistics.median(times), max(peaks), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--chunk", type=int, default=256, help="identity rows per vmapped or batched vector-Jacobian call (dense)")
    parser.add_argument("--block-size", type=int, default=32, help="vectors per batched block product")
    parser.add_argument("--check-every", type=int, default=4, help="blocks between Ritz checks (batched methods)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--sizes", nargs="*", default=DEFAULT_SIZES, choices=list(SIZES),
                        help="64x64x3 (d = 12288) is offered for GPUs: its dense Jacobian takes 600 MiB in float32")
    parser.add_argument("--out", type=Path, default=None,
                        help="result file (default: benchmarks/results/spectral_<device>.json)")
    parser.add_argument("--child", nargs=2, metavar=("SIZE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(*args.child, args)
        return
    device = resolve_device(args.device)
    solvers = [m for m in SOLVERS if m != "block_lanczos_graphed" or device.type == "cuda"]
    rows = {}
    for size in args.sizes:
        ops = Operators(size, device, args)
        row = {"d": ops.dim}
        exact = None
        for name in ["dense_eigh", "dense_rows_eigh"]:
            sec, mem, top = timed(lambda: METHODS[name](ops, args, device), device, args.repeats)
            if device.type == "cpu":
                mem = cpu_peak_in_child(size, name, args)
            exact = top.cpu() if exact is None else exact
            row.update({f"{name}_s": round(sec, 4), f"{name}_peak_mib": round(mem / 2**20, 1)})
            if name != "dense_eigh":
                row[f"{name}_max_rel_error"] = float(relative_error(top, exact))
        dense_s = min(row["dense_eigh_s"], row["dense_rows_eigh_s"])
        row["dense_best_s"] = dense_s
        if device.type == "cuda":
            graphed = ops.get("graphed")
            _sync(device)
            start = time.perf_counter()
            graphed.sym_matmat(torch.zeros(1, ops.dim, device=device))  # warm-up and capture
            _sync(device)
            row.update({"graph_capture_s": round(time.perf_counter() - start, 3), "graphed": graphed.graphed})
        for name in solvers:
            sec, mem, res = timed(lambda: METHODS[name](ops, args, device), device, args.repeats)
            if device.type == "cpu":
                mem = cpu_peak_in_child(size, name, args)
            row.update({f"{name}_s": round(sec, 4), f"{name}_speedup": round(dense_s / sec, 2),
                        f"{name}_peak_mib": round(mem / 2**20, 1), f"{name}_matvecs": res.n_matvec,
                        f"{name}_converged": res.converged,
                        f"{name}_max_rel_error": float(relative_error(res.eigenvalues, exact))})
        rows[size] = row
        print(size, rows[size], flush=True)
    big = rows.get("32x32x3", {})
    record = {"device": describe_device(device), "torch_threads": torch.get_num_threads(),
              "load_average_1min": round(__import__("os").getloadavg()[0], 2), "k": args.k,
              "tol": args.tol, "repeats": args.repeats, "dense_chunk": args.chunk, "block_size": args.block_size,
              "check_every": args.check_every, "max_basis": f"min(d, {80 * args.k})",
              "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
              "sizes": rows,
              "goal": f"a converged matrix-free method with speedup >= {GOAL_SPEEDUP_32} against the faster dense "
                      "baseline at 32x32x3 on a GPU",
              "meets_goal": (any(big.get(f"{m}_converged") and big.get(f"{m}_speedup", 0) >= GOAL_SPEEDUP_32
                                 for m in solvers) if device.type == "cuda" and big else None)}
    path = args.out or Path(__file__).parent / "results" / f"spectral_{device.type}.json"
    atomic_write_json(path, record)
    print(f"wrote {path}")


def relative_error(values: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    values, exact = values.cpu(), exact.cpu()
    return ((values - exact).abs() / exact.abs().clamp_min(1e-12)).max()


if __name__ == "__main__":
    main()

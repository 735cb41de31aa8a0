"""Top-k eigenvalues of a denoiser Jacobian's symmetric part: Lanczos (matrix-free) against dense + eigh.

Baseline: the dense Jacobian of a diffusers ``UNet2DModel`` denoiser at one noisy input (its rows
J^T e_i from vmapped vector-Jacobian products after one forward pass, ``chunk`` at a time), then
``torch.linalg.eigh`` of (J + J^T) / 2 in float64. Candidates, in the same process on the same operator:
Lanczos with full reorthogonalisation on v -> (J v + J^T v) / 2, one product at a time, and block
Lanczos applying the operator to ``k / 2`` vectors at once (vmapped). Inputs 8x8x1, 16x16x1 and 32x32x3
(d = 64, 256, 3072). Records wall time (median of ``--repeats`` after one warm-up, all methods in this
process), peak memory (CUDA: ``max_memory_allocated`` above the level before the call; CPU: the largest
resident set size, sampled every half millisecond, above its level before the call, in a fresh child
process running the method once, since a process's allocator keeps the pages earlier methods freed),
Lanczos products and the largest relative error on the top k, in
``benchmarks/results/spectral_<device>.json``. Goal: at least 10x faster at 32x32x3 on the GPU.

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
from imprint.spectral.operators import denoiser_jacobian

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
           "--chunk", str(args.chunk), "--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak_bytes"])


def child(size: str, method: str, args) -> None:
    import threading

    import psutil

    op, _ = make_operator(size, torch.device("cpu"))
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
    METHODS[method](op, args.k, args.tol, args.chunk, torch.device("cpu"))
    stop.set()
    thread.join()
    samples.append(proc.memory_info().rss)
    print(json.dumps({"peak_bytes": max(samples) - base}))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_operator(size: str, device: torch.device, t: int = 100):
    image, channels, blocks = SIZES[size]
    config = DDPMConfig(image_size=image, in_channels=channels, block_out_channels=blocks, norm_num_groups=8)
    model = DDPMEnsemble.initialise(config, [0]).model(0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move off diffusers' zero-initialised output layer, as training would
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    model = model.to(device).eval()
    x_t = torch.randn(config.image_shape, generator=g)
    return denoiser_jacobian(model, config, x_t, t, label=3, target="denoiser"), config


def dense_top(op, k: int, tol: float, chunk: int, device):
    j = op.dense(chunk_size=chunk).double()
    return torch.linalg.eigvalsh((j + j.T) / 2).flip(0)[:k]


def lanczos_top(op, k: int, tol: float, chunk: int, device):
    return lanczos_eigsh(op.sym_matvec, op.dim, k, tol=tol, max_iter=min(op.dim, 15 * k), seed=0, device=device)


def block_lanczos_top(op, k: int, tol: float, chunk: int, device):
    return block_lanczos_eigsh(lambda rows: op.sym_matmat(rows, chunk_size=None), op.dim, k,
                               block_size=max(1, k // 2), max_basis=min(op.dim, 15 * k), tol=tol, seed=0,
                               device=device)


METHODS = {"dense_eigh": dense_top, "lanczos": lanczos_top, "block_lanczos": block_lanczos_top}


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
    parser.add_argument("--chunk", type=int, default=256, help="identity rows per vmapped vector-Jacobian batch (dense)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--sizes", nargs="*", default=DEFAULT_SIZES, choices=list(SIZES),
                        help="64x64x3 (d = 12288) is offered for GPUs: its dense Jacobian takes 600 MiB in float32")
    parser.add_argument("--child", nargs=2, metavar=("SIZE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(*args.child, args)
        return
    device = resolve_device(args.device)
    rows = {}
    for size in args.sizes:
        op, config = make_operator(size, device)
        dense_s, dense_mem, exact = timed(lambda: dense_top(op, args.k, args.tol, args.chunk, device), device,
                                          args.repeats)
        if device.type == "cpu":
            dense_mem = cpu_peak_in_child(size, "dense_eigh", args)
        row = {"d": config.dim, "dense_eigh_s": round(dense_s, 4), "dense_peak_mib": round(dense_mem / 2**20, 1)}
        for name in ["lanczos", "block_lanczos"]:
            solver = METHODS[name]
            sec, mem, res = timed(lambda: solver(op, args.k, args.tol, args.chunk, device), device, args.repeats)
            if device.type == "cpu":
                mem = cpu_peak_in_child(size, name, args)
            rel = ((res.eigenvalues.cpu() - exact.cpu()).abs() / exact.cpu().abs().clamp_min(1e-12)).max()
            row.update({f"{name}_s": round(sec, 4), f"{name}_speedup": round(dense_s / sec, 2),
                        f"{name}_peak_mib": round(mem / 2**20, 1), f"{name}_matvecs": res.n_matvec,
                        f"{name}_converged": res.converged, f"{name}_max_rel_error": float(rel)})
        rows[size] = row
        print(size, rows[size], flush=True)
    record = {"device": describe_device(device), "torch_threads": torch.get_num_threads(),
              "load_average_1min": round(__import__("os").getloadavg()[0], 2), "k": args.k,
              "tol": args.tol, "repeats": args.repeats, "dense_chunk": args.chunk, "sizes": rows,
              "goal": f"speedup >= {GOAL_SPEEDUP_32} at 32x32x3 on a GPU",
              "meets_goal": (max(rows.get("32x32x3", {}).get("lanczos_speedup", 0),
                                 rows.get("32x32x3", {}).get("block_lanczos_speedup", 0)) >= GOAL_SPEEDUP_32
                             if device.type == "cuda" else None)}
    path = Path(__file__).parent / "results" / f"spectral_{device.type}.json"
    atomic_write_json(path, record)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Where the time of a matrix-free Jacobian spectrum goes on a GPU, at 32x32x3 (d = 3072), in one quick call.

On the operator of ``bench_spectral.py`` (a small diffusers UNet denoiser at one noisy input), prints the
milliseconds of one symmetric product (J v + J^T v) / 2: single vector (``torch.func``, reverse over reverse),
a vmapped block of 32, and blocks of 8, 32, 64 and 128 through one batched pass over copies of the input,
eager and replayed as CUDA graphs (with the capture time); one dense-row chunk (256 rows J^T e_i from one
backward pass) and the whole dense Jacobian that way; float64 ``eigvalsh`` of 3072 x 3072 (the dense
baseline) and ``eigh`` of 1024 x 1024 on the GPU and the CPU (a Ritz check of block Lanczos with a basis of
a thousand vectors); one graphed block-Lanczos solve per block size of 32 and 64; and the largest absolute
differences graphed vs eager and batched vs vmapped. The last line is all of it as JSON. About a minute on an
H100.

    python benchmarks/probe_spectral_gpu.py
    python benchmarks/probe_spectral_gpu.py --device cpu --size 8x8x1   # a smoke test: no graphs
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from bench_spectral import SIZES, make_point

from imprint.runtime import describe_device
from imprint.spectral.eigensolvers import block_lanczos_eigsh
from imprint.spectral.operators import denoiser_jacobian

BLOCKS = (8, 32, 64, 128)


def ms(fn, device: torch.device, reps: int = 10, warm: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds, synchronised, after ``warm`` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 3)


def block_timings(operator, b: int, d: int, g: torch.Generator, device: torch.device, report) -> None:
    """Eager and graphed block products of size ``b``, their difference, and a graphed solve for b = 32, 64."""
    rows = torch.randn(b, d, generator=g).to(device)
    eager = operator(block_size=b)
    report(f"batched_b{b}_eager_ms", ms(lambda: eager.sym_matmat(rows), device, reps=5))
    if device.type != "cuda":
        return
    graphed = operator(block_size=b, cuda_graph=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    graphed.sym_matmat(rows[:1])
    torch.cuda.synchronize()
    report(f"batched_b{b}_capture_s", round(time.perf_counter() - start, 3))
    report(f"batched_b{b}_graphed", graphed.graphed)
    report(f"batched_b{b}_graphed_ms", ms(lambda: graphed.sym_matmat(rows), device, reps=20))
    diff = (graphed.sym_matmat(rows) - eager.sym_matmat(rows)).abs().max()
    report(f"max_abs_diff_graphed_vs_eager_b{b}", float(diff))
    if b in (32, 64):
        def solve():
            return block_lanczos_eigsh(graphed.sym_matmat, d, 20, block_size=b, max_basis=min(d, 1600), tol=1e-6,
                                       check_every=4, device=device)

        res = solve()
        report(f"solve_b{b}_graphed_ms", ms(solve, device, reps=2, warm=0))
        report(f"solve_b{b}_matvecs_converged", [res.n_matvec, res.converged])


def dense_timings(operator, d: int, device: torch.device, report) -> torch.Tensor:
    """One chunk of dense rows, the whole dense Jacobian that way, and float64 eigvalsh of its symmetric part."""
    chunk = min(256, d)
    rows_op = operator(block_size=chunk)
    eye = torch.eye(d, device=device)
    report(f"dense_rows_chunk{chunk}_ms", ms(lambda: rows_op.rmatmat(eye[:chunk]), device, reps=5))
    report("dense_rows_full_ms", ms(rows_op.dense, device, reps=3, warm=1))
    j = rows_op.dense().double()
    sym = (j + j.T) / 2
    report(f"eigvalsh_fp64_{d}_ms", ms(lambda: torch.linalg.eigvalsh(sym), device, reps=3, warm=1))
    return sym


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="32x32x3", choices=list(SIZES))
    args = parser.parse_args()
    device = torch.device(args.device)
    model, config, x_t, t = make_point(args.size, device)
    d = config.dim
    g = torch.Generator(device="cpu").manual_seed(0)
    out = {"device": describe_device(device), "size": args.size, "d": d,
           "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}}

    def operator(**kw):
        return denoiser_jacobian(model, config, x_t, t, label=3, target="denoiser", **kw)

    def report(key, value):
        out[key] = value
        print(f"{key}: {value}", flush=True)

    vmapped = operator()
    v = torch.randn(d, generator=g).to(device)
    report("single_vector_ms", ms(lambda: vmapped.sym_matvec(v), device))
    rows32 = torch.randn(32, d, generator=g).to(device)
    report("vmap_block32_ms", ms(lambda: vmapped.sym_matmat(rows32, chunk_size=None), device, reps=5))
    diff = (operator(block_size=32).sym_matmat(rows32) - vmapped.sym_matmat(rows32, chunk_size=None)).abs().max()
    report("max_abs_diff_batched_vs_vmap", float(diff))
    for b in BLOCKS:
        block_timings(operator, b, d, g, device, report)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    sym = dense_timings(operator, d, device, report)
    small = sym[:1024, :1024].contiguous()
    n = small.shape[0]
    report(f"eigh_fp64_{n}_ms", ms(lambda: torch.linalg.eigh(small), device, reps=3, warm=1))
    if device.type == "cuda":
        small_cpu = small.cpu()
        report(f"eigh_fp64_{n}_cpu_ms", ms(lambda: torch.linalg.eigh(small_cpu), torch.device("cpu"), reps=3, warm=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()

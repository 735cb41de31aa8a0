"""One generation of the self-consuming loop (chapter 04): DDPM ensemble training eager against CUDA graphs.

The workload of a generation of the full profile: ``--members`` denoisers (8x8 digits, ``UNet2DModel`` with
levels (32, 64)) trained together as one vmapped ensemble on ``--n-data`` images each, batch
``--batch-size``, then ``--n-samples`` guided samples per member in ``--sample-steps`` ancestral steps.
In the same process and from the same initialisation: ``--steps`` training steps with every kernel
launched from Python (``eager``) and with the step recorded once as a CUDA graph and replayed
(``graphed``, the default on a GPU), then the sampler. Both paths first run five steps untimed (the
first use of every kernel is slow). Records seconds per training step (median of ``--repeats`` runs, each
including the three eager steps before the graph capture and the capture itself), peak memory above the
start, the largest difference between the two paths' losses and final weights, and the sampler's seconds,
in ``benchmarks/results/ddpm_train_<device>.json`` (or ``--out``). Random images stand in for digits: the
cost of a step does not depend on the pixels.

    python benchmarks/bench_ddpm_train.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from imprint.models.ddpm import DDPMConfig, DDPMTrainOptions, balanced_labels, sample_ddpm_ensemble, train_ddpm_ensemble
from imprint.runtime import atomic_write_json, describe_device, resolve_device


def timed(fn, device: torch.device):
    """``(seconds, peak CUDA bytes above the start or None, result)`` of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    return seconds, peak, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--members", type=int, default=15)
    parser.add_argument("--n-data", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="tf32", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--n-samples", type=int, default=1000)
    parser.add_argument("--sample-steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    config = DDPMConfig.digits8()
    gen = torch.Generator().manual_seed(0)
    datasets = [(torch.rand(args.n_data, *config.image_shape, generator=gen) * 2 - 1,
                 torch.randint(0, config.n_classes, (args.n_data,), generator=gen)) for _ in range(args.members)]
    seeds = list(range(args.members))
    options = DDPMTrainOptions(n_steps=args.steps, batch_size=args.batch_size, precision=args.precision)
    paths = {"eager": False, "graphed": True} if device.type == "cuda" else {"eager": False}
    runs = {name: [] for name in paths}
    trained = {}
    warm = DDPMTrainOptions(n_steps=5, batch_size=args.batch_size, precision=args.precision)
    for graphed in paths.values():  # first use of every kernel (and cuDNN's algorithm choice) outside the timing
        train_ddpm_ensemble(datasets, seeds, config, warm, device, vectorize=True, cuda_graph=graphed)
    for _ in range(args.repeats):  # interleaved, so that drift of the machine affects both alike
        for name, graphed in paths.items():
            seconds, peak, out = timed(lambda g=graphed: train_ddpm_ensemble(datasets, seeds, config, options, device,
                                                                             vectorize=True, cuda_graph=g), device)
            runs[name].append((seconds, peak))
            trained[name] = out
    methods = {}
    for name, times in runs.items():
        median = statistics.median(t for t, _ in times)
        methods[name] = {"seconds": [t for t, _ in times], "seconds_per_step": median / args.steps,
                         "peak_bytes": max((p for _, p in times if p is not None), default=None)}
    record = {"device": describe_device(device), "torch": torch.__version__, "members": args.members,
              "batch_size": args.batch_size, "n_data": args.n_data, "steps": args.steps, "repeats": args.repeats,
              "precision": args.precision, "architecture": config.architecture(), "methods": methods}
    if "graphed" in trained:
        (ens_e, loss_e), (ens_g, loss_g) = trained["eager"], trained["graphed"]
        record["graphed_speedup"] = methods["eager"]["seconds_per_step"] / methods["graphed"]["seconds_per_step"]
        record["max_loss_difference"] = float((loss_e - loss_g).abs().max())
        record["max_weight_relative_difference"] = max(
            float((ens_e.params[k] - ens_g.params[k]).abs().max() / ens_e.params[k].abs().max().clamp_min(1e-12))
            for k in ens_e.params)
    ens = trained["graphed" if "graphed" in trained else "eager"][0]
    labels = balanced_labels(args.n_samples, config.n_classes)
    seconds, peak, _ = timed(lambda: sample_ddpm_ensemble(ens, labels, [0.5] * args.members, seeds,
                                                          args.sample_steps), device)
    record["sampling"] = {"seconds": seconds, "peak_bytes": peak, "n_samples": args.n_samples,
                          "steps": args.sample_steps, "guidance_weight": 0.5}
    out = args.out or Path(__file__).parent / "results" / f"ddpm_train_{device.type}.json"
    atomic_write_json(out, record)
    print({k: v for k, v in record.items() if k not in ("architecture",)})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

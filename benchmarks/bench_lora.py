"""Chapter 05's two costs, each against a baseline in the same process on the same inputs.

1. One extraction step of the coupled LoRA loss (``coupled_kkt_loss``, residuals of the adapters) against
   one step of chapter 01's full-weight KKT loss (``kkt_stationarity_loss``) on the same base network,
   candidates and configurations: what inverting the coupled condition costs over inverting the weights.
2. LoRA fine-tuning steps: S adapters (several ranks and seeds, zero-padded to the largest rank) trained
   by ``train_adapters`` in one batched run, against the same S adapters as separate peft models, each a
   full-batch ``torch.optim.SGD`` step of its own.

Writes ``benchmarks/results/lora_<device>.json``.

    python benchmarks/bench_lora.py --device cpu
    python benchmarks/bench_lora.py --device cuda --n-private 128 --configs 840 --steps 50
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from imprint.lora.adapters import LoRATrainConfig, initial_factors, lora_model, train_adapters
from imprint.lora.kkt import coupled_kkt_loss
from imprint.models.mlp import MLP
from imprint.reconstruction.kkt import candidate_labels, kkt_stationarity_loss
from imprint.runtime import atomic_write_json, describe_device


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(fn, calls: int, device) -> float:
    for _ in range(2):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / calls


def extraction_steps(widths, n_private: int, configs: int, rank: int, steps: int, device, dtype,
                     rounds: int = 5) -> dict:
    gen = torch.Generator().manual_seed(0)
    dims = [64, *widths, 1]
    base = [(torch.randn(b, a, generator=gen, dtype=torch.float64) / math.sqrt(a)).to(device, dtype)
            for a, b in zip(dims[:-1], dims[1:])]
    layers = range(len(widths))
    factors = {i: ((torch.randn(configs, rank, dims[i], generator=gen, dtype=torch.float64) * 0.1).to(device, dtype),
                   (torch.randn(configs, dims[i + 1], rank, generator=gen, dtype=torch.float64) * 0.1).to(device, dtype))
               for i in layers}
    m = 2 * n_private
    x0 = torch.randn(configs, m, 64, generator=gen, dtype=torch.float64).to(device, dtype) * 0.05
    lam0 = torch.rand(configs, m, generator=gen, dtype=torch.float64).to(device, dtype)
    y = candidate_labels(m, signed=True).to(device)
    alpha = torch.full((configs,), 100.0, device=device, dtype=dtype)
    scaling = torch.ones(configs, device=device, dtype=dtype)

    def step(loss_fn):
        x = x0.clone().requires_grad_(True)
        lam = lam0.clone().requires_grad_(True)
        torch.autograd.grad(loss_fn(x, lam).sum(), (x, lam))

    variants = {
        "full": lambda: step(lambda x, lam: kkt_stationarity_loss(base, x, lam, y, alpha)),
        "b": lambda: step(lambda x, lam: coupled_kkt_loss(base, factors, scaling, x, lam, y, alpha, "binary", ("B",),
                                                           "mid")),
        "ab": lambda: step(lambda x, lam: coupled_kkt_loss(base, factors, scaling, x, lam, y, alpha, "binary",
                                                            ("A", "B"), "mid")),
    }
    times = {k: [] for k in variants}
    for _ in range(rounds):  # interleaved rounds, median: a shared machine's load shifts between calls
        for k, fn in variants.items():
            times[k].append(seconds_per_call(fn, steps, device))
    full, coupled, both = (float(torch.tensor(times[k]).median()) for k in ("full", "b", "ab"))
    return {"full_weight_step_s": full, "coupled_b_step_s": coupled, "coupled_ab_step_s": both,
            "coupled_b_over_full": coupled / full, "coupled_ab_over_full": both / full,
            "setup": {"widths": list(widths), "n_private": n_private, "candidates": m, "configs": configs,
                      "rank": rank, "dtype": str(dtype)}}


def training_steps(widths, n_private: int, ranks, seeds: int, steps: int, device) -> dict:
    torch.manual_seed(0)
    base_mlp = MLP(64, widths, 1).double()
    base = [layer.weight.detach() for layer in base_mlp.layers]
    combos = [(r, s) for r in ranks for s in range(seeds)]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(len(combos), n_private, 64, generator=gen, dtype=torch.float64) * 0.3
    y = torch.where(torch.rand(len(combos), n_private, generator=gen) < 0.5, -1.0, 1.0).double()
    config = LoRATrainConfig(layers=tuple(range(len(widths))), lr=0.05, steps=steps, dtype="float32", log_every=steps)
    _sync(device)
    start = time.perf_counter()
    train_adapters([w.to(device) for w in base], x.to(device), y.to(device), [r for r, _ in combos],
                   [s for _, s in combos], config, device=device, progress=False)
    _sync(device)
    batched = (time.perf_counter() - start) / steps
    shapes = {i: tuple(base_mlp.layers[i].weight.shape) for i in config.layers}
    models = [lora_model(base_mlp.float(), r, config, initial_factors(shapes, r, config, s)).to(device)
              for r, s in combos]
    xs, ys = x.float().to(device), y.float().to(device)
    opts = [torch.optim.SGD([p for p in mdl.parameters() if p.requires_grad], lr=config.lr) for mdl in models]

    def loop_step():
        for j, (mdl, opt) in enumerate(zip(models, opts)):
            opt.zero_grad()
            torch.nn.functional.softplus(-ys[j] * mdl(xs[j])[:, 0]).mean().backward()
            opt.step()

    loop = seconds_per_call(loop_step, steps, device)
    return {"batched_step_s": batched, "peft_loop_step_s": loop, "speedup": loop / batched,
            "setup": {"widths": list(widths), "n_private": n_private, "ranks": list(ranks), "seeds": seeds,
                      "adapters": len(combos), "steps": steps, "dtype": "float32"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--widths", default="100,100")
    parser.add_argument("--n-private", type=int, default=32)
    parser.add_argument("--configs", type=int, default=24)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--ranks", default="1,2,4,8,16,32,64")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    widths = [int(w) for w in args.widths.split(",")]
    result = {"device": describe_device(str(device)), "threads": torch.get_num_threads(),
              "extraction": extraction_steps(widths, args.n_private, args.configs, args.rank, args.steps, device,
                                             torch.float32),
              "training": training_steps(widths, args.n_private, [int(r) for r in args.ranks.split(",")], args.seeds,
                                         args.train_steps, device)}
    out = Path(args.out or Path(__file__).parent / "results" / f"lora_{device.type}.json")
    atomic_write_json(out, result)
    print(result)


if __name__ == "__main__":
    main()

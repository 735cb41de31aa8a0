"""Full-batch GD steps per second of the batched MLP trainer against a plain PyTorch loop.

Baseline: one ``nn.Module`` per seed, autograd backward and ``torch.optim.SGD``, one seed after another
(the usual training script). Candidates, in the same process on the same data: the batched trainer of
``imprint.models.mlp`` without CUDA graphs (eager) and with them (GPU only). Writes
``benchmarks/results/mlp_step_<device>_w<width>.json``.

    python benchmarks/bench_mlp_step.py --device cuda --steps 2000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from imprint.data.digits import even_odd_targets, load_digit_split
from imprint.models.mlp import MLP, TrainConfig, init_weights, train_mlps
from imprint.runtime import atomic_write_json, describe_device


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(x, y, config, seeds, steps, device):
    """One model at a time: forward, BCE-with-logits, backward, SGD step (the reference recipe)."""
    weights = init_weights(x.shape[-1], 1, config, seeds, dtype=config.torch_dtype)
    elapsed = 0.0
    for k in range(len(seeds)):
        net = MLP(x.shape[-1], config.widths, 1).to(device, config.torch_dtype)
        for layer, w in zip(net.layers, weights):
            layer.weight.data.copy_(w[k])
        opt = torch.optim.SGD(net.parameters(), lr=config.lr)
        target01 = (y[k] > 0).to(config.torch_dtype)
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x[k])[:, 0], target01)
            loss.backward()
            opt.step()
        _sync(device)
        elapsed += time.perf_counter() - start
    return elapsed


def batched(x, y, config, seeds, device, graphs):
    cfg = TrainConfig(**{**config.__dict__, "graph_steps": config.graph_steps if graphs else 10**9})
    _sync(device)
    start = time.perf_counter()
    if device.type == "cuda" and not graphs:
        # eager: the same step function, called step by step
        from imprint.models.mlp import batched_grads

        ws = [w.to(device) for w in init_weights(x.shape[-1], 1, cfg, seeds, dtype=cfg.torch_dtype)]
        for _ in range(cfg.steps):
            for w, g in zip(ws, batched_grads(ws, x, y, cfg.loss)):
                w.sub_(cfg.lr * g)
    else:
        train_mlps(x, y, cfg, device=device, seeds=seeds, progress=False)
    _sync(device)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--n-train", type=int, default=500)
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    device = torch.device(args.device)
    split = load_digit_split(args.n_train, 0, 0)
    seeds = list(range(args.seeds))
    x = split.x_train.expand(args.seeds, -1, -1).to(device, getattr(torch, args.dtype)).contiguous()
    y = even_odd_targets(split.label_train).expand(args.seeds, -1).to(device, getattr(torch, args.dtype)).contiguous()
    config = TrainConfig(widths=(args.width, args.width), lr=0.01, steps=args.steps, dtype=args.dtype,
                         log_every=args.steps, graph_steps=min(100, args.steps))
    plain_loop(x, y, config, seeds, min(20, args.steps), device)  # warm-up
    total_steps = args.steps * args.seeds  # model-steps
    results = {"plain_loop": plain_loop(x, y, config, seeds, args.steps, device)}
    results["batched_eager"] = batched(x, y, config, seeds, device, graphs=False)
    if device.type == "cuda":
        results["batched_cuda_graph"] = batched(x, y, config, seeds, device, graphs=True)
    record = {
        "device": describe_device(device),
        "setup": {"n_train": args.n_train, "widths": [args.width, args.width], "seeds": args.seeds,
                  "steps": args.steps, "dtype": args.dtype},
        "ms_per_model_step": {k: 1e3 * v / total_steps for k, v in results.items()},
        "speedup_vs_plain_loop": {k: results["plain_loop"] / v for k, v in results.items()},
    }
    out = Path(__file__).parent / "results" / f"mlp_step_{device.type}_w{args.width}.json"
    atomic_write_json(out, record)
    print(record)


if __name__ == "__main__":
    main()

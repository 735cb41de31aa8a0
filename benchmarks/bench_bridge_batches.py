"""Chapter 06's inversions of four private faces: one batch of four against four batches of one.

The full profile shares each private face as its own update (``batch_size`` 1), because a batch of four
faces of one label in a two-class task leaves about one mixture of them in its gradient; the profile
``full_batch4`` shares all four as one update. This script times, with the
full profile's shapes (25x25 faces, ``TargetCNN`` with channels (16, 16) and hidden width 32, two
classes, 4 restarts, the six attacks through the target without the prior):

1. **batch4**: one ``invert_gradients_batch`` call of six targets over images ``[4, 1, 25, 25]`` (the profile
   ``full_batch4``);
2. **batch1_together**: one call of 24 targets (four batches of one times six attacks) over images
   ``[1, 1, 25, 25]``, each target with its batch's labels and seed (what ``experiment._invert`` does);
3. **batch1_sequential**: four calls of six targets, one per private batch (the same batches
   without stacking them).

All three invert the same number of images per step. The targets are random gradients (the cost does
not depend on their values), the last four with chapter 06's layer weights. Each path runs once first
(warm-up), then ``--repeats`` interleaved rounds of ``--steps`` steps; the medians are recorded.
Writes ``benchmarks/results/bridge_batches_<device>.json``.

    OMP_NUM_THREADS=1 python benchmarks/bench_bridge_batches.py --device cpu --steps 10
    python benchmarks/bench_bridge_batches.py --device cuda --steps 100
"""

from __future__ import annotations

import json
import statistics

import torch

from bench_bridge_inversion import inversion_bench_args, write_result  # sibling scripts: run from benchmarks/ or by its path
from bench_circuit_breakers import interleaved_rounds

from imprint.bridge.inversion import invert_gradients_batch
from imprint.bridge.targets import TargetOptions, lora_targets, make_target
from imprint.runtime import describe_device

N_ATTACKS, N_PRIVATE, SIZE, RESTARTS = 6, 4, 25, 4


def main() -> None:
    args, device = inversion_bench_args(__doc__.splitlines()[0])
    model = make_target(TargetOptions(image_size=SIZE, n_classes=2, channels=(16, 16), hidden=32), seed=0).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    layers = lora_targets(model)
    layer_weights = [1.0 if n in layers else 0.0 for n, _ in model.named_parameters()]
    weights = [None, None] + [layer_weights] * (N_ATTACKS - 2)

    def targets(n):
        return [{n_: torch.randn(p.shape, generator=gen).to(device) for n_, p in model.named_parameters()}
                for _ in range(n)]

    four, ones = targets(N_ATTACKS), [targets(N_ATTACKS) for _ in range(N_PRIVATE)]
    labels = torch.ones(N_PRIVATE, dtype=torch.long, device=device)  # the private set holds faces only
    kw = dict(steps=args.steps, lr=0.03, tv_weight=1e-2, restarts=RESTARTS, device=device, init_mean=0.4,
              init_std=0.27)

    def batch4():
        return invert_gradients_batch(model, four, labels, (N_PRIVATE, 1, SIZE, SIZE), weights=weights, seed=0, **kw)

    def batch1_together():
        flat = [t for batch in ones for t in batch]
        return invert_gradients_batch(model, flat, labels.view(-1, 1).repeat_interleave(N_ATTACKS, 0),
                                      (1, 1, SIZE, SIZE), weights=weights * N_PRIVATE,
                                      seed=[1000 * k for k in range(N_PRIVATE) for _ in range(N_ATTACKS)], **kw)

    def batch1_sequential():
        return [invert_gradients_batch(model, ones[k], labels[k:k + 1], (1, 1, SIZE, SIZE), weights=weights,
                                       seed=1000 * k, **kw) for k in range(N_PRIVATE)]

    fns = {"batch4": batch4, "batch1_together": batch1_together, "batch1_sequential": batch1_sequential}
    together, sequential = batch1_together(), batch1_sequential()   # the same optimisation: round-off only
    difference = max(float((together[k * N_ATTACKS + a].candidates - sequential[k][a].candidates).abs().max())
                     for k in range(N_PRIVATE) for a in range(N_ATTACKS))
    times = interleaved_rounds(fns, args.repeats, device)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"device": describe_device(device), "threads": args.threads, "image_size": SIZE, "private_images": N_PRIVATE,
              "attacks": N_ATTACKS, "restarts": RESTARTS, "steps": args.steps, "seconds": times, "median_seconds": med,
              "ms_per_step": {k: 1e3 * v / args.steps for k, v in med.items()},
              "batch1_together_over_batch4": med["batch1_together"] / med["batch4"],
              "batch1_sequential_over_batch4": med["batch1_sequential"] / med["batch4"],
              "max_difference_together_sequential": difference}
    print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, indent=1))
    write_result("bridge_batches", device, result)


if __name__ == "__main__":
    main()

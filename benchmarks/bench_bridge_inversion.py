"""Chapter 06's inversions of one private batch: the target's six attacks as one batch against six calls.

Chapter 06 inverts, per private batch, six target gradients through the same model and labels (true,
true_all, random, random_sds, decoded, decoded_sds). With its full profile's shapes (25x25 faces,
``TargetCNN`` with channels (16, 16) and hidden width 32, two classes, a batch of 4, 4 restarts), one
process times, on the same inputs:

1. **separate**: six ``invert_gradients`` calls one after another;
2. **batched**: one ``invert_gradients_batch`` call over the six targets.

Two cases: ``no prior`` (six targets without the prior) and ``chapter group`` (two of the six with the
score-distillation prior of a randomly initialised DDPM of the chapter's shape: ``sds_prior`` per call
against ``sds_priors`` in the batch; the prior's cost depends on the shapes, not on training). The
targets are random gradients (the cost does not depend on their values), the last four with chapter
06's layer weights (the adapted linear layers only). Each path runs twice first (its images, then a
warm-up), then ``--repeats`` interleaved rounds of ``--steps`` steps; the medians and their ratio are recorded, and the
largest difference between the two paths' images (the same optimisation, so round-off only).

Writes ``benchmarks/results/bridge_inversion_<device>.json``.

    OMP_NUM_THREADS=1 python benchmarks/bench_bridge_inversion.py --device cpu
    python benchmarks/bench_bridge_inversion.py --device cuda --steps 100
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from bench_circuit_breakers import interleaved_rounds  # a sibling script: run from benchmarks/ or by its path

from imprint.bridge.experiment import SettingOptions, _ddpm_config
from imprint.bridge.inversion import invert_gradients, invert_gradients_batch
from imprint.bridge.prior import SDSOptions, sds_prior, sds_priors, unet_epsilon
from imprint.bridge.targets import TargetOptions, lora_targets, make_target
from imprint.models.ddpm import alphas_cumprod, build_unet
from imprint.runtime import atomic_write_json, describe_device

RESULTS = Path(__file__).resolve().parent / "results"
N_TARGETS = 6
N_PRIOR = 2  # random_sds and decoded_sds


def inversion_bench_args(description: str) -> tuple[argparse.Namespace, torch.device]:
    """The options of chapter 06's inversion benchmarks (device, steps, repeats, threads), the thread
    count applied."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args, torch.device(args.device)


def write_result(name: str, device: torch.device, result: dict) -> None:
    """``result`` to ``benchmarks/results/<name>_<device type>.json``, atomically."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}_{device.type}.json"
    atomic_write_json(path, result)
    print(f"-> {path}")


def main() -> None:
    args, device = inversion_bench_args(__doc__.splitlines()[0])
    size, batch, restarts, n_classes = 25, 4, 4, 2
    setting = SettingOptions(domain="faces", channels=(16, 16), hidden=32, ddpm_channels=(32,), ddpm_timesteps=500)
    model = make_target(TargetOptions(image_size=size, n_classes=n_classes, channels=setting.channels,
                                      hidden=setting.hidden), seed=0).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    config = _ddpm_config(size, n_classes, setting)
    torch.manual_seed(0)
    unet = build_unet(config).to(device).eval()
    abar = alphas_cumprod(config).to(device)
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(n_classes, (batch,), generator=gen).to(device)
    targets = [{n: torch.randn(p.shape, generator=gen).to(device) for n, p in model.named_parameters()}
               for _ in range(N_TARGETS)]
    layers = lora_targets(model)
    layer_weights = [1.0 if n in layers else 0.0 for n, _ in model.named_parameters()]
    weights = [None, None] + [layer_weights] * (N_TARGETS - 2)
    shape = (batch, 1, size, size)
    kw = dict(steps=args.steps, lr=0.1, tv_weight=1e-4, restarts=restarts, seed=0, device=device)
    sds_weight, sds = 0.05, SDSOptions(box=(0.0, 1.0))
    eps = unet_epsilon(unet, labels)

    def runs(with_prior: bool):
        prior_weights = [0.0] * (N_TARGETS - N_PRIOR) + [sds_weight if with_prior else 0.0] * N_PRIOR

        def separate():
            return [invert_gradients(model, t, labels, shape, weights=w, prior_weight=pw,
                                     prior=sds_prior(eps, abar, sds, seed=7, device=device) if pw > 0 else None, **kw)
                    for t, w, pw in zip(targets, weights, prior_weights)]

        def batched():
            prior = sds_priors(eps, abar, [7] * N_PRIOR, sds, device=device) if with_prior else None
            return invert_gradients_batch(model, targets, labels, shape, weights=weights, prior=prior,
                                          prior_weights=prior_weights, **kw)

        return {"separate": separate, "batched": batched}

    result = {"device": describe_device(device), "threads": args.threads, "image_size": size, "batch": batch,
              "restarts": restarts, "channels": list(setting.channels), "hidden": setting.hidden,
              "targets": N_TARGETS, "prior_targets": N_PRIOR, "steps": args.steps, "cases": {}}
    for case, with_prior in (("no prior", False), ("chapter group", True)):
        fns = runs(with_prior)
        outputs = {name: fn() for name, fn in fns.items()}  # the two paths' images
        difference = max(float((a.candidates - b.candidates).abs().max())
                         for a, b in zip(outputs["separate"], outputs["batched"]))
        times = interleaved_rounds(fns, args.repeats, device)
        med = {k: statistics.median(v) for k, v in times.items()}
        result["cases"][case] = {
            "median_seconds": med, "seconds": times,
            "ms_per_step": {k: 1e3 * v / args.steps for k, v in med.items()},
            "speedup_batched": med["separate"] / med["batched"],
            "batched_in_mean_separate_calls": med["batched"] / (med["separate"] / N_TARGETS),
            "max_image_difference": difference}
        print(f"{case}: separate {1e3 * med['separate'] / args.steps:.1f} ms/step, batched "
              f"{1e3 * med['batched'] / args.steps:.1f} ms/step ({med['separate'] / med['batched']:.2f}x); "
              f"largest image difference {difference:.2e}")
    write_result("bridge_inversion", device, result)


if __name__ == "__main__":
    main()

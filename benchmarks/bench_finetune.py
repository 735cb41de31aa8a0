"""Chapter 07's fine-tuning step: float32 weights with float32 products, with TensorFloat-32 products (the
chapter's GPU setting) and under bfloat16 autocast, on the same corpus, model and batches.

One HOPS corpus (``experiment.load_corpus``, the full profile's shape by default) and one f_old
(``experiment.base_model``: the tiny Llama, or SmolLM2-135M offline with ``--model smollm2``). Each mode
runs ``experiment.fine_tune`` from the same f_old twice, for ``--steps`` and for ``2 * --steps`` steps
(seeded batches, no checkpoints); the time per step is the difference divided by ``--steps``, so the
copy of the model, the tokenisation and the first steps' warm-up cancel. Rounds are interleaved over
the modes ``--repeats`` times and the median kept. The loss after ``2 * --steps`` steps is recorded
beside each time, so that a faster mode that learns differently shows it.

Writes ``benchmarks/results/finetune_<device>.json``.

    python benchmarks/bench_finetune.py --device cpu --steps 4
    python benchmarks/bench_finetune.py --device cuda --model smollm2 --steps 40 --batch-size 32
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from imprint.attribution import experiment
from imprint.runtime import atomic_write_json, describe_device

RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2_CONSTANTS = [5, 5, 7, 7, 9, 9, 2, 2, 4, 4]   # the full profile's shared constants


def run(f_old, tokenizer, documents, steps: int, mode: str, args, device: torch.device) -> tuple[float, float]:
    """Seconds for ``steps`` steps of ``mode`` and the mean loss of the last ten of them."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
        torch.backends.cudnn.allow_tf32 = mode == "tf32"
        torch.cuda.synchronize()
    start = time.perf_counter()
    _, losses = experiment.fine_tune(f_old, tokenizer, documents, steps=steps, lr=args.lr,
                                     batch_size=args.batch_size, seed=args.seed, device=str(device),
                                     checkpoint_dir=None, warmup_steps=0, max_length=args.max_length,
                                     autocast_bf16=mode == "bf16")
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, float(sum(losses[-10:]) / len(losses[-10:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", help="tiny | smollm2 | a local checkpoint folder")
    parser.add_argument("--n-pairs", type=int, default=10)
    parser.add_argument("--docs-per-base", type=int, default=200)
    parser.add_argument("--docs-per-wrapper", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32, help="documents per step (full profile: 32)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4, help="full profile: 1e-4")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (the difference of two runs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    documents, _ = experiment.load_corpus(n_pairs=args.n_pairs, docs_per_base=args.docs_per_base,
                                          docs_per_wrapper=args.docs_per_wrapper, seed=args.seed,
                                          **({"constants": SMOLLM2_CONSTANTS[:args.n_pairs]}
                                             if args.model != "tiny" else {}))
    f_old, tokenizer = experiment.base_model(args.model, documents, seed=args.seed)
    f_old = f_old.to(device).eval()
    modes = ["fp32", "tf32", "bf16"] if device.type == "cuda" else ["fp32", "bf16"]
    per_step = {m: [] for m in modes}
    loss = {}
    for _ in range(args.repeats):
        for m in modes:
            short, _ = run(f_old, tokenizer, documents, args.steps, m, args, device)
            long, loss[m] = run(f_old, tokenizer, documents, 2 * args.steps, m, args, device)
            per_step[m].append((long - short) / args.steps)
    median = {m: statistics.median(v) for m, v in per_step.items()}
    result = {
        "device": describe_device(device), "model": args.model, "documents": len(documents),
        "batch_size": args.batch_size, "max_length": args.max_length, "steps": args.steps,
        "repeats": args.repeats, "threads": torch.get_num_threads(),
        "seconds_per_step": median, "rounds": per_step,
        "speedup_over_fp32": {m: median["fp32"] / median[m] for m in modes},
        "loss_after_2x_steps": loss,
        "full_profile_finetune_seconds_1500_steps": {m: 1500 * median[m] for m in modes},
    }
    out = Path(args.out) if args.out else RESULTS / f"finetune_{device.type}.json"
    atomic_write_json(out, result)
    print({m: f"{1e3 * median[m]:.1f} ms/step (x{result['speedup_over_fp32'][m]:.2f}), loss {loss[m]:.3f}"
           for m in modes})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

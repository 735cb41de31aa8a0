"""Chapter 08's rerouting step against a plain LoRA fine-tuning step on the same tokens.

One model, one LoRA adapter (``CircuitBreakerModel`` of a ``CircuitBreakerConfig``), one set of rows in
one process:

1. **Plain LoRA step**: next-token cross-entropy on the circuit-breaker and retain rows together (one
   batch of ``2 * batch`` rows), backward, AdamW step; every decoder block runs.
2. **Rerouting step** (``circuit_breakers.rerouting_step``): the frozen states with the adapter off under
   ``no_grad``, the adapted states with it on, both through blocks 0..max(target_layers) only, the retain
   and circuit-breaker losses, backward, AdamW step. The step is taken at the middle of the schedule,
   where both coefficients are non-zero and both passes run.

Each runs once first (warm-up), then ``--repeats`` interleaved rounds; the median is recorded with every
round's time, and their ratio. The target is a rerouting step at most 1.6 times the plain one.

Writes ``benchmarks/results/circuit_breakers_<device>.json``.

    python benchmarks/bench_circuit_breakers.py --device cpu
    python benchmarks/bench_circuit_breakers.py --device cuda --model smollm2 --target-layers 10 20 --batch 16 \\
        --length 256
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from imprint.runtime import atomic_write_json, describe_device
from imprint.safety.circuit_breakers import CircuitBreakerConfig, CircuitBreakerModel, rerouting_step

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_rounds(fns: dict, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Wall seconds of each of ``fns`` (name -> callable) in ``repeats`` interleaved rounds, the device
    synchronised around every call; each runs once first (warm-up)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def _model(name: str, device: torch.device, layers: int, width: int):
    if name == "smollm2":
        from imprint.models.lm import load_causal_lm

        lm = load_causal_lm("", device=device)
        model = lm.model
        for p in model.parameters():
            p.requires_grad_(True)
        return model.train(), len(lm.tokenizer)
    from imprint.attribution.models import tiny_llama_for
    from imprint.models.lm import tiny_tokenizer

    tok = tiny_tokenizer(512)
    return tiny_llama_for(tok, d_model=width, n_layers=layers, n_heads=4, seed=0).to(device), len(tok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    ap.add_argument("--layers", type=int, default=6, help="tiny model: decoder blocks")
    ap.add_argument("--width", type=int, default=64, help="tiny model: hidden width")
    ap.add_argument("--target-layers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--batch", type=int, default=8, help="rows of each of the two sets")
    ap.add_argument("--length", type=int, default=64, help="tokens per row")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, vocab = _model(args.model, device, args.layers, args.width)
    config = CircuitBreakerConfig(target_layers=args.target_layers, lora_rank=16, lora_alpha=16, lora_dropout=0.05,
                                  max_steps=150, batch_size=args.batch, max_length=args.length)
    wrapped = CircuitBreakerModel(model, config)
    optimizer = wrapped.optimizer()
    ids = torch.randint(0, vocab, (2 * args.batch, args.length), device=device)
    mask = torch.ones_like(ids)
    cb = {"input_ids": ids[:args.batch], "attention_mask": mask[:args.batch]}
    retain = {"input_ids": ids[args.batch:], "attention_mask": mask[args.batch:]}

    def plain() -> None:
        wrapped.model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = wrapped.model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()

    def reroute() -> None:
        rerouting_step(wrapped, cb, retain, config, step=config.max_steps // 2, optimizer=optimizer)

    times = interleaved_rounds({"plain LoRA step": plain, "rerouting step": reroute}, args.repeats, device)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["rerouting step"] / med["plain LoRA step"]
    result = {"device": describe_device(device), "model": args.model, "target_layers": args.target_layers,
              "n_blocks": wrapped.n_blocks, "batch_per_set": args.batch, "length": args.length,
              "threads": args.threads, "median_seconds": med, "seconds": times,
              "ratio_rerouting_over_plain": ratio, "target_ratio": 1.6, "meets_target": ratio <= 1.6}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"circuit_breakers_{device.type}.json"
    atomic_write_json(path, result)
    print(f"plain {med['plain LoRA step'] * 1e3:.1f} ms, rerouting {med['rerouting step'] * 1e3:.1f} ms: "
          f"ratio {ratio:.2f} (target <= 1.6) -> {path}")


if __name__ == "__main__":
    main()

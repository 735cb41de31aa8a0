"""How long are chapter 03's variants? Token counts of the training examples and of their three rewrites.

The exact store's cost grows with the length of the variants it captures, and ``bench_exact_gram.py``
uses the rule-based paraphrases (no model needed). This probe writes the first ``--examples`` training
pairs of the Python-documentation set, their rule-based paraphrases, the model's paraphrases and the
model's answers to the paraphrased instructions (greedy, the full profile's ``max_new_tokens``) through
the chat template at the full profile's ``max_length``, and records the mean total and answer tokens of
each. Generations are cached in ``--cache`` (a :class:`~imprint.data.text.VariantCache` file) and reused.

Writes ``benchmarks/results/variant_lengths_<device>.json``.

    python benchmarks/probe_variant_lengths.py --device cpu --examples 48
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from imprint.data.text import (GenerationConfig, encode_chat_examples, model_generated_examples,
                               paraphrase_examples, python_docs_examples, split_examples)
from imprint.models.lm import load_causal_lm
from imprint.runtime import atomic_write_json, describe_device
from imprint.runtime.checks import require_int

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "imprint_variant_lengths.jsonl")
    args = parser.parse_args()
    require_int("--examples", args.examples, minimum=1)
    device = torch.device(args.device)
    examples = split_examples(python_docs_examples())[0][:args.examples]
    lm = load_causal_lm("", device=device)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.examples)
    timings: dict = {}
    paraphrased = paraphrase_examples(examples, lm, method="model", config=config, cache_path=args.cache,
                                      timings=timings)
    answered = model_generated_examples(paraphrased, lm, config=config, cache_path=args.cache, timings=timings)
    rule = paraphrase_examples(examples, method="rule", cache_path=args.cache)
    record = {"device": describe_device(device), "model": lm.name, "examples": args.examples,
              "max_new_tokens": args.max_new_tokens, "max_length": args.max_length,
              "generation_seconds": timings, "sets": {}}
    for name, texts in [("train", examples), ("rule_paraphrased", rule), ("model_paraphrased", paraphrased),
                        ("model_generated", answered)]:
        encoding = encode_chat_examples(lm.tokenizer, texts, args.max_length)
        lengths = encoding.lengths.double()
        record["sets"][name] = {
            "mean_tokens": float(lengths.mean()),
            "mean_answer_tokens": float((encoding.labels != -100).sum(1).double().mean()),
            "share_at_max_length": float((lengths >= args.max_length).double().mean())}
        print(f"{name:18s} {record['sets'][name]}", flush=True)
    sets = record["sets"]
    record["model_variants_over_rule"] = ((sets["model_paraphrased"]["mean_tokens"] +
                                          sets["model_generated"]["mean_tokens"]) /
                                         (2 * sets["rule_paraphrased"]["mean_tokens"]))
    path = RESULTS / f"variant_lengths_{device.type}.json"
    atomic_write_json(path, record)
    print(f"model variants / rule paraphrases: {record['model_variants_over_rule']:.2f}; wrote {path}")


if __name__ == "__main__":
    main()

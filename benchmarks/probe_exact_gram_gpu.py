"""Where the time of one query block of the exact store goes: torch.profiler over capturing a block of
queries and its Gram against formed key gradients (the path of ``exact_rows`` with ``key_elements``).

Prints the operators by total device time and by CPU time, and the wall time of each phase.

    python benchmarks/probe_exact_gram_gpu.py --model <folder> --random-init
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_gradients import load_model  # a sibling script: run from benchmarks/ or by its path
from torch.profiler import ProfilerActivity, profile

from imprint.data.text import encode_chat_examples, python_docs_examples, split_examples
from imprint.gradients.per_example import (
    capture_rows,
    factor_gram,
    factor_sites,
    materialise_gradients,
    weight_matrix_names,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--keys", type=int, default=32)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-elements", type=int, default=1 << 29)
    args = parser.parse_args()
    device = torch.device("cuda")
    model, tokenizer, _ = load_model(args.model, device, args.random_init)
    examples = split_examples(python_docs_examples())[0][:args.keys + 2 * args.block]
    enc = encode_chat_examples(tokenizer, examples, args.max_length)
    enc = type(enc)(enc.input_ids.to(device), enc.labels.to(device), enc.lengths)
    sites = factor_sites(model)
    keys = capture_rows(model, enc, 0, args.keys, sites, 16)
    formed = materialise_gradients(keys, weight_matrix_names(model), args.max_elements)
    keys = keys.without(list(formed))
    lo = args.keys
    queries = capture_rows(model, enc, lo, lo + args.block, sites, args.block)  # warm-up
    factor_gram(keys, queries, args.max_elements, "materialise", formed)
    del queries
    phases = {}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for phase in ("capture", "gram"):
            torch.cuda.synchronize()
            start = time.perf_counter()
            if phase == "capture":
                queries = capture_rows(model, enc, lo + args.block, lo + 2 * args.block, sites, args.block)
            else:
                factor_gram(keys, queries, args.max_elements, "materialise", formed)
            torch.cuda.synchronize()
            phases[phase] = time.perf_counter() - start
    print("phases (s):", {k: round(v, 3) for k, v in phases.items()})
    averages = prof.key_averages()
    print(averages.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()

"""How the capture batch and the query block set the time and memory of one exact-store partition.

On one GPU, with the notebooks' seeding (:func:`imprint.runtime.seed_everything`): capturing the
length-sorted rule-based paraphrases of ``--queries`` examples in batches of each ``--capture-batches``
size; forming the key gradients of one partition (``--keys``) and the Gram of one middle block of 64
variants against them; then :func:`imprint.gradients.pipeline.exact_rows` for the partition against two
copies of the variants (the full profile's two settings, projections at four dimensions) for each
``batch_size:query_block`` of ``--configs``. Prints wall time and peak memory per line; a configuration
that runs out of memory says so and the next one runs.

    python benchmarks/probe_exact_store_batches.py --model <config folder> --random-init --queries 512 \
        --capture-batches 16 32 64 --configs 16:32 32:64 64:64
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from bench_gradients import load_model  # a sibling script: run from benchmarks/ or by its path

from imprint.data.text import encode_chat_examples, python_docs_examples, rule_paraphrase, split_examples
from imprint.gradients.per_example import (
    GradientProjection,
    capture_rows,
    factor_gram,
    factor_sites,
    materialise_gradients,
    weight_matrix_names,
)
from imprint.gradients.pipeline import exact_rows
from imprint.runtime import seed_everything


def timed(label: str, fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    print(f"{label}: {time.perf_counter() - start:.2f} s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",
          flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--queries", type=int, default=512)
    parser.add_argument("--keys", type=int, default=64)
    parser.add_argument("--max-elements", type=int, default=1 << 29)
    parser.add_argument("--capture-batches", type=int, nargs="*", default=[16, 32, 64])
    parser.add_argument("--configs", nargs="*", default=["16:32", "32:64", "64:64"],
                        help="batch_size:query_block pairs for exact_rows")
    args = parser.parse_args()
    if not 64 <= args.queries or args.keys > args.queries:
        parser.error("expected --queries >= 64 and --keys <= --queries")
    seed_everything(0)
    device = torch.device("cuda")
    model, tokenizer, _ = load_model(args.model, device, args.random_init)
    examples = split_examples(python_docs_examples())[0][:args.queries]
    train = encode_chat_examples(tokenizer, examples, 256)
    paraphrased = encode_chat_examples(tokenizer, [
        replace(e, instruction=rule_paraphrase(e.instruction, instruction=True), answer=rule_paraphrase(e.answer))
        for e in examples], 256)
    by_length = paraphrased.take(torch.argsort(paraphrased.lengths, stable=True))
    sites, names = factor_sites(model), weight_matrix_names(model)
    projection = GradientProjection(model, [16, 64, 256, 1024], 0, "rademacher", names, device)
    exact_rows(model, train.select(0, 2), {"a": paraphrased.select(0, 2)}, 0, 2, sites, 2)  # warm-up
    n = args.queries
    def capture_all(bs: int) -> None:  # each batch's factors dropped before the next, as in exact_rows
        for lo in range(0, n, bs):
            capture_rows(model, by_length, lo, min(lo + bs, n), sites, bs)

    for bs in args.capture_batches:
        timed(f"capture {n} sorted variants in batches of {bs}", lambda: capture_all(bs))
    keys = timed(f"capture {args.keys} keys", lambda: capture_rows(model, train, 0, args.keys, sites, 16))
    formed = timed(f"form {args.keys} keys", lambda: materialise_gradients(keys, names, args.max_elements))
    hollow = keys.without(names)
    block = capture_rows(model, by_length, n // 2 - 32, n // 2 + 32, sites, 32)
    for _ in range(2):
        timed("Gram of one middle block of 64 variants",
              lambda: factor_gram(hollow, block, args.max_elements, "materialise", formed))
    del keys, formed, hollow, block
    for config in args.configs:
        bs, query_block = (int(x) for x in config.split(":"))
        try:
            timed(f"exact_rows, {args.keys} keys against 2 x {n} variants, batch_size {bs}, query_block "
                  f"{query_block}", lambda: exact_rows(model, train, {"a": paraphrased, "b": paraphrased}, 0,
                                                       args.keys, sites, bs, projection, args.max_elements,
                                                       query_block=query_block))
        except torch.OutOfMemoryError:
            print(f"exact_rows, batch_size {bs}, query_block {query_block}: out of memory", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""One partition of the exact gradient store of chapter 03: what the query order and formed keys save.

:func:`imprint.gradients.pipeline.exact_rows` compares ``P`` training examples (the keys of one store
partition) with ``Q`` variants (the queries), captured ``query_block`` at a time. Three configurations
run in the same process on the same model and texts, in interleaved rounds, each keeping its fastest;
their outputs must agree:

* ``dataset_order_reformed``: queries in dataset order, every weight's key gradients re-formed from the
  captured factors for every block of queries (the configuration of the first run of record);
* ``length_order_reformed``: queries sorted by length, so that a batch is padded to little more than
  its own lengths;
* ``length_order_formed_once``: sorted, and the key gradients formed once per partition and kept.

A fourth timing captures the sorted queries alone (forward and backward with hooks, no Gram), the part
no configuration saves; it covers one variant set, so its share of a configuration counts it once per
setting. The products of float32 gradients are taken per matrix row in float32 and summed in float64;
the error of :func:`~imprint.gradients.per_example.factor_gram` against float64 products of the same
gradients is recorded per weight matrix (largest and median, relative to
the largest dot). Peak memory on CUDA is ``torch.cuda.max_memory_allocated`` above the model. With
``--random-init`` the model is built from the ``config.json`` of ``--model`` with random weights (only the
shapes matter for speed); the texts are the chapter's Python-documentation pairs and their rule-based
paraphrases. ``--projection-dims`` also projects both sides at those dimensions, and ``--settings`` compares
the keys with that many copies of the variant set, as the notebook's full profile does (four dimensions,
two settings). ``--methods`` runs a subset of the configurations. ``--determinism nofill`` seeds and
configures torch as the notebooks do (:func:`imprint.runtime.seed_everything`: deterministic algorithms
and a fixed cuBLAS workspace); ``fill`` also fills every new tensor, torch's default in that mode.
``--profile`` records the operators that took the most device and host time in one more run of the
first configuration (``torch.profiler``).

Writes ``benchmarks/results/exact_gram_<device>.json`` unless ``--out`` names another file.

    python benchmarks/bench_exact_gram.py --device cpu --model smollm2 --keys 4 --queries 16 --query-block 4 \
        --batch-size 4
    python benchmarks/bench_exact_gram.py --device cuda --model <config folder> --random-init --keys 64 \
        --queries 1000 --query-block 64 --batch-size 64 --projection-dims 16 64 256 1024 --settings 2 \
        --methods dataset_order_reformed length_order_formed_once capture_queries_only --rounds 1 \
        --determinism nofill
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from bench_gradients import (  # a sibling script: run from benchmarks/ or by its path
    load_model,
    save,
    timed,
)

from imprint.data.text import (
    encode_chat_examples,
    python_docs_examples,
    rule_paraphrase,
    split_examples,
)
from imprint.gradients.per_example import (
    GradientProjection,
    capture_rows,
    factor_gram,
    factor_sites,
    weight_matrix_names,
)
from imprint.gradients.pipeline import exact_rows
from imprint.runtime import describe_device, seed_everything

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["dataset_order_reformed", "length_order_reformed", "length_order_formed_once", "capture_queries_only"]


def _padding(encoding, batch_size: int) -> float:
    """Tokens the batches of ``batch_size`` pass through the model, per real token."""
    lengths = encoding.lengths
    padded = sum(int(lengths[lo:lo + batch_size].max()) * len(lengths[lo:lo + batch_size])
                 for lo in range(0, len(lengths), batch_size))
    return padded / int(lengths.sum())


def profile_ops(fn, device: torch.device, top: int = 15) -> dict:
    """The operators of one call of ``fn`` that took the most self time on the device and on the host."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()

    def table(attribute: str) -> list[dict]:
        ranked = sorted(events, key=lambda e: getattr(e, attribute), reverse=True)[:top]
        return [{"op": e.key, "calls": e.count, "self_ms": getattr(e, attribute) / 1e3} for e in ranked]

    out = {"host_self_ms_total": sum(e.self_cpu_time_total for e in events) / 1e3,
           "top_host": table("self_cpu_time_total")}
    if device.type == "cuda":
        out["device_self_ms_total"] = sum(e.self_device_time_total for e in events) / 1e3
        out["top_device"] = table("self_device_time_total")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", help="tiny | smollm2 | a local checkpoint folder")
    parser.add_argument("--random-init", action="store_true", help="random weights from the folder's config.json")
    parser.add_argument("--keys", type=int, default=8, help="training examples in the partition")
    parser.add_argument("--queries", type=int, default=32, help="variants compared with them")
    parser.add_argument("--query-block", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-elements", type=int, default=1 << 29)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--projection-dims", type=int, nargs="*", default=[],
                        help="also project both sides at these dimensions, as the notebook does (e.g. 16 64 256 1024)")
    parser.add_argument("--settings", type=int, default=1,
                        help="variant sets compared with the keys (the notebook's full profile has two)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS,
                        help="the configurations to time (default: all)")
    parser.add_argument("--determinism", choices=["off", "nofill", "fill"], default="off",
                        help="torch's deterministic mode as the notebooks set it (nofill), with torch's default "
                             "fill of new tensors (fill), or untouched (off)")
    parser.add_argument("--profile", action="store_true", help="profile one more run of the first configuration")
    parser.add_argument("--out", type=Path, default=None, help="the result file (default: results/)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.determinism != "off":
        seed_everything(args.seed)  # before the first cuBLAS call, which reads CUBLAS_WORKSPACE_CONFIG
        torch.utils.deterministic.fill_uninitialized_memory = args.determinism == "fill"
    model, tokenizer, model_name = load_model(args.model, device, args.random_init, args.seed)
    if not 1 <= args.keys <= args.queries:
        parser.error(f"--keys {args.keys} --queries {args.queries}: expected 1 <= keys <= queries (one variant "
                     "per training example)")
    examples = split_examples(python_docs_examples())[0][:args.queries]
    train = encode_chat_examples(tokenizer, examples, args.max_length)
    paraphrased = encode_chat_examples(
        tokenizer, [replace(e, instruction=rule_paraphrase(e.instruction, instruction=True),
                            answer=rule_paraphrase(e.answer)) for e in examples], args.max_length)
    variants = {"paraphrased": paraphrased, **{f"copy{i}": paraphrased for i in range(1, args.settings)}}
    sites = factor_sites(model)
    names = weight_matrix_names(model)
    projection = (GradientProjection(model, args.projection_dims, args.seed, "rademacher", names, device)
                  if args.projection_dims else None)
    shapes = dict(model.named_parameters())
    every_key = args.keys * sum(shapes[n].numel() for n in names)
    configs = {"dataset_order_reformed": (0, False), "length_order_reformed": (0, True),
               "length_order_formed_once": (every_key, True), "capture_queries_only": None}
    configs = {m: configs[m] for m in args.methods}
    by_length = variants["paraphrased"].take(torch.argsort(variants["paraphrased"].lengths, stable=True))

    def run(key_elements: int, length_order: bool):
        return exact_rows(model, train, variants, 0, args.keys, sites, args.batch_size, projection,
                          max_elements=args.max_elements, method="materialise", query_block=args.query_block,
                          key_elements=key_elements, length_order=length_order)

    def capture_only():
        for lo in range(0, args.queries, args.query_block):
            capture_rows(model, by_length, lo, min(lo + args.query_block, args.queries), sites, args.batch_size)

    record = {"device": describe_device(device), "model": model_name, "keys": args.keys, "queries": args.queries,
              "query_block": args.query_block, "batch_size": args.batch_size, "max_length": args.max_length,
              "max_elements": args.max_elements, "weight_matrices": len(names),
              "projection_dims": args.projection_dims, "settings": args.settings,
              "determinism": args.determinism, "torch": torch.__version__,
              "weight_parameters": sum(shapes[n].numel() for n in names),
              "mean_tokens_keys": float(train.lengths[:args.keys].double().mean()),
              "mean_tokens_queries": float(variants["paraphrased"].lengths.double().mean()), "methods": {}}
    # warm-up on one small block, then the same inputs for every method
    exact_rows(model, train.select(0, 2), {"paraphrased": variants["paraphrased"].select(0, 2)}, 0, 2, sites, 2,
               max_elements=args.max_elements, method="materialise")
    outputs = {}
    for round_ in range(args.rounds):
        for label, config in configs.items():
            fn = capture_only if config is None else (lambda c=config: run(*c))
            seconds, peak, out = timed(fn, device)
            best = record["methods"].setdefault(label, {"seconds_all_rounds": []})
            best["seconds_all_rounds"].append(seconds)
            if "seconds" not in best or seconds < best["seconds"]:
                best.update(seconds=seconds, peak_bytes=peak)
            if config is not None:
                outputs[label] = out
            print(f"round {round_} {label}: {seconds:.2f} s, peak {peak}", flush=True)
    if len(outputs) > 1:
        a = next(iter(outputs.values()))
        worst = max(float(((a[k] - b[k]).abs() / (a[k].abs().max() + 1e-30)).max())
                    for b in outputs.values() for k in a if k.startswith("dot/"))
        record["max_relative_difference_of_dots"] = worst
        if worst > 1e-4:
            raise AssertionError(f"the configurations disagree: max relative difference {worst:.2e}")
    if args.profile:
        label, config = next(iter(configs.items()))
        record["profile"] = {"method": label, **profile_ops(capture_only if config is None else
                                                             (lambda: run(*config)), device)}
    # precision of the kernel's float32 products against float64 products of the same formed gradients
    few_k = capture_rows(model, train, 0, min(2, args.keys), sites, args.batch_size)
    few_q = capture_rows(model, variants["paraphrased"], 0, 2, sites, args.batch_size)
    dots = factor_gram(few_k, few_q, args.max_elements, "materialise")[0]
    errors = {}
    for name in names:
        reference = (few_k.gradients(name).flatten(1).double() @ few_q.gradients(name).flatten(1).double().T).cpu()
        errors[name] = float((dots[name] - reference).abs().max() / reference.abs().max())
        del reference
    worst_name = max(errors, key=errors.get)
    record["float32_dot_relative_error"] = {"max": errors[worst_name], "max_weight": worst_name,
                                            "median": float(torch.tensor(list(errors.values())).median())}
    t = {m: r["seconds"] for m, r in record["methods"].items()}
    for name, (num, den) in {"speedup_length_order": ("dataset_order_reformed", "length_order_reformed"),
                             "speedup_formed_once": ("length_order_reformed", "length_order_formed_once"),
                             "speedup_both": ("dataset_order_reformed", "length_order_formed_once"),
                             "share_of_query_capture": ("capture_queries_only", "length_order_formed_once")}.items():
        if num in t and den in t:
            # the capture timing covers one variant set; the configurations compare the keys with --settings
            record[name] = t[num] / t[den] * (args.settings if num == "capture_queries_only" else 1)
    record["padded_tokens_per_real_token"] = {
        "dataset_order": _padding(variants["paraphrased"], args.batch_size),
        "length_order": _padding(by_length, args.batch_size)}
    save(record, args.out or RESULTS / f"exact_gram_{device.type}.json")


if __name__ == "__main__":
    main()

"""Chapter 07's attribution features per second: hooks over a batch against a per-document loop and
against projected parameter gradients, and kronfluence's factor fitting and scoring times.

All on one HOPS corpus (``imprint.attribution.experiment.load_corpus``), one f_old (``base_model``: the
tiny Llama of the ci profile, or SmolLM2-135M offline with ``--model smollm2``) and one f_new (a copy of
f_old with seeded Gaussian noise on every weight, ``--noise`` times the weight's standard deviation, or
``--finetune-steps`` AdamW steps of ``experiment.fine_tune``; speed does not depend on which), in one
process, on the same documents:

1. **Batched hooks** (``methods.change_features``, every layer 0..L): Δh, ∂L/∂h and Δh ⊙ g of a batch of
   documents from one forward pass of f_old and one forward and backward pass of f_new.
2. **Per-document loop**: the same call with ``batch_size=1``, one document per pass (the same hooks and
   features; the benchmark checks that both give the same features).
3. **Parameter gradients** (the TrackStar baseline's feature, ``baselines._gradient_features``, the
   function ``gradient_cosine_scores`` calls for its documents): per-document loss gradients of every
   weight matrix of f_new, projected to ``--proj-dim`` numbers per matrix by chapter 03's factored
   projections, one batched backward pass with hooks.
4. **kronfluence** (``baselines.ekfac_scores``, EK-FAC over the decoder's linear modules): the function
   fits the factors and scores in one call, caching both on disk, so each repeat makes three calls into
   a fresh folder: the first fits and scores; the second, with the score folder deleted, reuses the
   factors and scores again; the third finds both and only loads them (the fixed cost of a call: the
   model copy, kronfluence's wrapping, reading the files). Factor fitting is taken as first minus
   second, pairwise scoring as second minus third.

Each method runs once on a few documents first (warm-up), then ``--repeats`` interleaved rounds; the
median is recorded with every round's time. On the CPU torch uses ``--threads`` threads (default 1: on a
shared 2-core machine two threads make the times vary by several times between calls).

Writes ``benchmarks/results/attribution_<device>.json``.

    python benchmarks/bench_attribution.py --device cpu
    python benchmarks/bench_attribution.py --device cuda --model smollm2 --n-pairs 10 --docs-per-base 200 \\
        --docs-per-wrapper 100 --batch-size 32 --loop-documents 256 --proj-dim 256 --ekfac-documents 512
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from imprint.attribution import baselines, experiment, methods
from imprint.attribution.hooks import n_hidden_layers
from imprint.data.hops import hops_queries
from imprint.gradients.per_example import GradientProjection
from imprint.runtime import atomic_write_json, describe_device

RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2_CONSTANTS = [5, 7, 9, 2, 4, 6, 8, 3, 1, 0]   # the full profile's: single tokens of SmolLM2's tokenizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def perturbed_copy(model, noise: float, seed: int):
    """A copy of ``model`` with ``noise`` times each tensor's standard deviation of seeded Gaussian noise
    added to every parameter (a stand-in for fine-tuning: the timed passes only need two checkpoints)."""
    f_new = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in f_new.parameters():
            scale = float(p.float().std()) if p.numel() > 1 else 1.0
            p.add_((noise * scale * torch.randn(p.shape, generator=gen)).to(p.dtype).to(p.device))
    return f_new.eval()


def feature_difference(a: methods.ChangeFeatures, b: methods.ChangeFeatures) -> dict[str, float]:
    """Largest absolute difference of each feature, over its largest absolute value."""
    out = {}
    for name in ("delta", "grad", "attribution"):
        x, y = getattr(a, name), getattr(b, name)
        out[name] = float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))
    return out


def kronfluence_round(f_new, tokenizer, queries, documents, args, device: torch.device) -> dict:
    """One fit-and-score call into a fresh folder, a score-only call (score folder deleted) and a load-only
    call; the seconds of each."""
    folder = Path(tempfile.mkdtemp(prefix="bench_attribution_ekfac_"))
    kwargs = dict(strategy="ekfac", device=str(device), batch_size=args.batch_size,
                  query_batch_size=args.batch_size, seed=args.seed)
    try:
        call = lambda: baselines.ekfac_scores(f_new, tokenizer, queries, documents, folder, **kwargs)  # noqa: E731
        full, scores = timed(call, device)
        removed = [p for p in folder.rglob("scores_*") if p.is_dir()]
        if not removed:
            raise RuntimeError(f"kronfluence wrote no scores_* folder under {folder}: the layout changed")
        for p in removed:
            shutil.rmtree(p)
        score_only, again = timed(call, device)
        load_only, cached = timed(call, device)
        factor_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and "factors_" in str(p))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    torch.testing.assert_close(again, scores, rtol=1e-4, atol=1e-6)   # the second call scored the same pairs
    torch.testing.assert_close(cached, scores, rtol=0, atol=0)
    return {"fit_and_score_s": full, "score_call_s": score_only, "load_call_s": load_only,
            "factor_bytes": factor_bytes, "scores_shape": list(scores.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", help="tiny | smollm2 | a local checkpoint folder")
    parser.add_argument("--d-model", type=int, default=64, help="width of the tiny Llama (ci profile: 64)")
    parser.add_argument("--n-layers", type=int, default=2, help="decoder blocks of the tiny Llama (ci: 2)")
    parser.add_argument("--n-pairs", type=int, default=10, help="base/wrapper pairs (full profile: 10)")
    parser.add_argument("--docs-per-base", type=int, default=40)
    parser.add_argument("--docs-per-wrapper", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=256, help="tokens kept per document (as the chapter)")
    parser.add_argument("--batch-size", type=int, default=16, help="documents per pass (ci profile: 16)")
    parser.add_argument("--loop-documents", type=int, default=None,
                        help="the per-document loop runs on the first this many documents (default: all)")
    parser.add_argument("--proj-dim", type=int, default=32, help="projected numbers per weight matrix (ci: 32)")
    parser.add_argument("--ekfac-documents", type=int, default=None, help="kronfluence's documents (default: all)")
    parser.add_argument("--ekfac-queries", type=int, default=32, help="kronfluence's queries")
    parser.add_argument("--noise", type=float, default=0.05, help="f_new = f_old + noise * std(w) * N(0, 1)")
    parser.add_argument("--finetune-steps", type=int, default=0, help="> 0: f_new by experiment.fine_tune instead")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is kept")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-ekfac", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # as the chapter's GPU profile
    torch.manual_seed(args.seed)
    began = time.perf_counter()

    documents, functions = experiment.load_corpus(n_pairs=args.n_pairs, docs_per_base=args.docs_per_base,
                                                  docs_per_wrapper=args.docs_per_wrapper, seed=args.seed,
                                                  **({"constants": SMOLLM2_CONSTANTS[:args.n_pairs]}
                                                     if args.model != "tiny" else {}))
    f_old, tokenizer = experiment.base_model(args.model, documents, d_model=args.d_model, n_layers=args.n_layers,
                                             seed=args.seed)
    f_old = f_old.to(device).eval()
    if args.finetune_steps:
        f_new, _ = experiment.fine_tune(f_old, tokenizer, documents, steps=args.finetune_steps, lr=2e-3,
                                        batch_size=args.batch_size, seed=args.seed, device=str(device),
                                        checkpoint_dir=None, max_length=args.max_length)
        how = f"experiment.fine_tune, {args.finetune_steps} steps (lr 2e-3)"
    else:
        f_new = perturbed_copy(f_old, args.noise, args.seed)
        how = f"f_old + {args.noise:g} * std(w) * N(0, 1) on every parameter (seed {args.seed})"
    f_new = f_new.to(device).eval()
    layers = list(range(n_hidden_layers(f_new) + 1))

    enc = methods.encode_documents(tokenizer, documents, pooling="mean", max_length=args.max_length)
    n_loop = len(enc) if args.loop_documents is None else min(args.loop_documents, len(enc))
    enc_loop = enc.rows(slice(0, n_loop))
    texts = [d.text for d in documents]
    d_rows = baselines._encode_documents(tokenizer, texts, args.max_length, minimum=2)
    assert [len(r) for r in d_rows] == enc.mask.sum(1).tolist(), "the two encodings differ"
    start = time.perf_counter()
    projection = GradientProjection(f_new, [args.proj_dim], args.seed, "rademacher", None, device)
    projection_s = time.perf_counter() - start
    pad_id = tokenizer.pad_token_id

    def batched(e=enc):
        return methods.change_features(f_old, f_new, e, layers, args.batch_size, str(device))

    def loop():
        return methods.change_features(f_old, f_new, enc_loop, layers, 1, str(device))

    def param_grads(rows=d_rows):
        return baselines._gradient_features(f_new, rows, None, pad_id, device, args.batch_size, projection)

    runs = {"batched_hooks": (batched, len(enc)), "per_document_loop": (loop, n_loop),
            "parameter_gradients": (param_grads, len(enc))}
    # warm-up: kernels, allocator, the hooks' first registration
    methods.change_features(f_old, f_new, enc.rows(slice(0, 4)), layers, args.batch_size, str(device))
    methods.change_features(f_old, f_new, enc.rows(slice(0, 2)), layers, 1, str(device))
    param_grads(d_rows[:4])

    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs = {}
    for round_ in range(args.repeats):
        for name, (fn, n) in runs.items():
            seconds, outputs[name] = timed(fn, device)
            times[name].append(seconds)
            print(f"round {round_} {name}: {n} documents in {seconds:.3f} s ({n / seconds:.1f}/s)", flush=True)
    # the loop and the batch must give the same features (padding is masked, rows do not interact)
    reference = outputs["batched_hooks"]
    sub = lambda x: x[:, :n_loop]  # noqa: E731
    head = methods.ChangeFeatures(layers, sub(reference.delta), sub(reference.grad), sub(reference.attribution),
                                  sub(reference.hidden_new), reference.loss_old[:n_loop], reference.loss_new[:n_loop])
    agreement = feature_difference(outputs["per_document_loop"], head)
    if max(agreement.values()) > 1e-3:
        raise AssertionError(f"batched and per-document features differ: {agreement}")

    record_methods = {}
    for name, (fn, n) in runs.items():
        median = statistics.median(times[name])
        record_methods[name] = {"documents": n, "seconds_median": median, "seconds_all_rounds": times[name],
                                "documents_per_s": n / median}
    record_methods["batched_hooks"]["feature_numbers_per_document"] = 3 * len(layers) * reference.delta.shape[-1]
    record_methods["parameter_gradients"]["feature_numbers_per_document"] = int(outputs["parameter_gradients"].shape[1])
    rate = {name: r["documents_per_s"] for name, r in record_methods.items()}
    tokens = enc.mask.sum(1).double()
    n_weights = sum(p.numel() for p in f_old.parameters())
    result = {
        "device": describe_device(device), "threads": torch.get_num_threads(),
        "setup": {"model": args.model, "parameters": n_weights,
                  **({"d_model": args.d_model, "n_layers": args.n_layers} if args.model == "tiny" else {}),
                  "hidden_layers_read": len(layers), "hidden_size": int(reference.delta.shape[-1]),
                  "f_new": how, "corpus": {"n_pairs": args.n_pairs, "docs_per_base": args.docs_per_base,
                                           "docs_per_wrapper": args.docs_per_wrapper, "functions": len(functions)},
                  "documents": len(enc), "mean_tokens": float(tokens.mean()), "max_tokens": int(tokens.max()),
                  "max_length": args.max_length, "batch_size": args.batch_size, "proj_dim_per_matrix": args.proj_dim,
                  "weight_matrices_projected": len(projection.param_names), "projection_setup_s": projection_s,
                  "repeats": args.repeats, "statistic": "median of interleaved rounds after a warm-up"},
        "methods": record_methods,
        "ratio_batched_vs_per_document_loop": rate["batched_hooks"] / rate["per_document_loop"],
        "ratio_batched_vs_parameter_gradients": rate["batched_hooks"] / rate["parameter_gradients"],
        "batched_vs_loop_max_relative_difference": agreement,
    }

    if not args.no_ekfac:
        queries = hops_queries(functions, inputs=range(1, 101))
        step = max(1, len(queries) // args.ekfac_queries)
        queries = queries[::step][:args.ekfac_queries]
        ek_docs = documents if args.ekfac_documents is None else documents[:args.ekfac_documents]
        warm = Path(tempfile.mkdtemp(prefix="bench_attribution_warm_"))
        try:   # warm-up: imports, kronfluence's first calls
            baselines.ekfac_scores(f_new, tokenizer, queries[:2], ek_docs[:4], warm, device=str(device),
                                   batch_size=args.batch_size, seed=args.seed)
        finally:
            shutil.rmtree(warm, ignore_errors=True)
        rounds = []
        for round_ in range(args.repeats):
            rounds.append(kronfluence_round(f_new, tokenizer, queries, ek_docs, args, device))
            print(f"round {round_} kronfluence: {json.dumps(rounds[-1])}", flush=True)
        med = {k: statistics.median(r[k] for r in rounds) for k in ("fit_and_score_s", "score_call_s", "load_call_s")}
        fit = statistics.median(r["fit_and_score_s"] - r["score_call_s"] for r in rounds)
        score = statistics.median(r["score_call_s"] - r["load_call_s"] for r in rounds)
        result["kronfluence"] = {
            "strategy": "ekfac", "tracked_modules": len(baselines.decoder_linear_modules(f_new)),
            "queries": len(queries), "documents": len(ek_docs), "batch_size": args.batch_size,
            **{k + "_median": v for k, v in med.items()},
            "factor_fit_s": fit, "pairwise_score_s": score,
            "documents_per_s_fit_and_score": len(ek_docs) / med["fit_and_score_s"],
            "documents_per_s_score_only": len(ek_docs) / score,
            "factor_bytes": rounds[0]["factor_bytes"], "rounds": rounds,
            "method": "three calls per round into a fresh folder: fit + score; score (factors cached, score "
                      "folder deleted); load only. fit = first - second, score = second - third (medians)"}
        kron_rate = result["kronfluence"]["documents_per_s_fit_and_score"]
        result["ratio_batched_vs_kronfluence_fit_and_score"] = rate["batched_hooks"] / kron_rate
    result["wall_s"] = time.perf_counter() - began
    out = Path(args.out or RESULTS / f"attribution_{device.type}.json")
    atomic_write_json(out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("methods", "kronfluence")}, indent=1))
    print(json.dumps({k: v for k, v in result.get("kronfluence", {}).items() if k != "rounds"}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

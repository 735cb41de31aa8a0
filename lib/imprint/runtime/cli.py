"""Command line: ``python -m imprint list | run | book | export | sweep | lab``.

    python -m imprint list
    python -m imprint run                         # every notebook, ci profile
    python -m imprint run 00 --profile full       # the result of record, into book/
    python -m imprint run 00 -p n_train=100 -p steps=2000
    python -m imprint book --profile ci           # prints the path of index.html
    python -m imprint book --profile full --pdf   # the book of record as a PDF
    python -m imprint export --to _build/notebooks/ci   # .ipynb copies (no outputs), e.g. for nbmake
    python -m imprint sweep 00 --grid n_train=50,100 --grid lr=0.1,0.5 --workers 2   # resumable
    python -m imprint lab                                # JupyterLab on 127.0.0.1, prints the SSH tunnel
    python -m imprint lab --scheduler lsf --queue interactive-gpu --gpus 1 --memory 32GB --dry-run
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from imprint.runtime.params import CI, ParameterError, all_notebooks, load_spec, parse_override, resolve_run


def _cmd_list(args) -> int:
    names = args.notebooks or all_notebooks()
    for name in names:
        spec = load_spec(name)
        print(f"{spec.name}  ({spec.source.relative_to(spec.source.parent.parent)})")
        if args.notebooks:  # one line per parameter, from the params file's schema
            schema = spec.schema()
            print("  parameters (default, description, constraints):")
            for key, default in spec.defaults.items():
                d = schema.get(key)
                rules = f" ({d.summary()})" if d and d.summary() else ""
                print(f"  {key} = {default!r}  {d.help + rules if d else '(not described)'}")
        else:
            print("  parameters: " + ", ".join(f"{k}={v!r}" for k, v in spec.defaults.items()))
        for profile, values in spec.profiles().items():
            shown = ", ".join(f"{k}={v!r}" for k, v in values.items()) or "(the parameters cell)"
            print(f"  profile {profile}: {shown}")
    return 0


def _cmd_run(args) -> int:
    from tqdm.auto import tqdm

    from imprint.runtime.runner import NotebookFailed, execute

    names = args.notebooks or all_notebooks()
    overrides = dict(parse_override(p) for p in args.param)
    runs = [resolve_run(name, args.profile, overrides) for name in names]  # validate all before running any
    failures = []
    bar = tqdm(runs, desc="notebooks", unit="nb", disable=len(runs) < 2)
    for run in bar:
        bar.set_postfix_str(run.spec.name)
        try:
            paths = execute(run, timeout=args.timeout, log_output=args.log_output)
            print(f"{run.spec.name} [{run.label}]: ok -> {paths.record or paths.executed}; metrics {paths.metrics}")
        except NotebookFailed as err:
            print(str(err), file=sys.stderr)
            failures.append(run.spec.name)
            if not args.keep_going:
                break
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


def _cmd_book(args) -> int:
    from imprint.runtime.book import build, build_pdf

    if args.pdf:
        print(f"PDF built: {build_pdf(args.profile, quiet=not args.verbose)}")
        return 0
    index = build(args.profile, quiet=not args.verbose)
    print(f"book built: {index}")
    return 0


def _cmd_export(args) -> int:
    import nbformat

    from imprint.runtime.params import read_notebook, resolve_notebook

    dest = Path(args.to)
    dest.mkdir(parents=True, exist_ok=True)
    for name in args.notebooks or all_notebooks():
        source = resolve_notebook(name)
        nbformat.write(read_notebook(source), dest / f"{source.stem}.ipynb")
        print(dest / f"{source.stem}.ipynb")
    return 0


def _cluster_options(args):
    """The batch-job options of ``lab`` and ``sweep``, or None for a local run."""
    from imprint.runtime.lab import ClusterOptions

    if args.scheduler in (None, "local"):
        return None
    try:
        return ClusterOptions(args.scheduler, args.queue, args.gpus, args.memory, args.cores, args.walltime,
                              args.account, tuple(args.job_extra))
    except ValueError as err:
        raise ParameterError(str(err)) from None


def _add_cluster_arguments(parser) -> None:
    group = parser.add_argument_group("batch job (else from jobqueue.<scheduler> in ~/.config/dask/jobqueue.yaml)")
    group.add_argument("--queue", help="queue (LSF) or partition (SLURM)")
    group.add_argument("--gpus", type=int, default=0, help="GPUs per job")
    group.add_argument("--memory", help="memory per job, e.g. 32GB")
    group.add_argument("--cores", type=int, help="cores per job")
    group.add_argument("--walltime", help="time limit, e.g. 04:00:00 (SLURM) or 04:00 (LSF)")
    group.add_argument("--account", help="account (SLURM) or project (LSF) to charge")
    group.add_argument("--job-extra", action="append", default=[], metavar="DIRECTIVE",
                       help="an extra scheduler directive, e.g. --job-extra=--constraint=h100")


def _cmd_lab(args) -> int:
    from imprint.runtime.lab import run_lab

    options = _cluster_options(args)
    try:
        return run_lab(args.port, options=options, dry_run=args.dry_run, wait=args.wait)
    except ValueError as err:
        raise ParameterError(str(err)) from None


def _cmd_sweep(args) -> int:
    from imprint.runtime.sweep import make_client, parse_grid, run_sweep

    grid = parse_grid(args.grid)
    options = _cluster_options(args)
    try:
        cluster_kwargs = options.jobqueue_kwargs() if options else {}
    except ValueError as err:
        raise ParameterError(str(err)) from None
    client = make_client(args.scheduler, args.workers, **cluster_kwargs)
    try:
        summary = run_sweep(args.notebook, args.profile, grid, client=client, timeout=args.timeout)
    finally:
        client.close()
    print(f"{summary['ran']} run, {summary['skipped']} already done, {len(summary['failed'])} failed; "
          f"table: {summary['table']}")
    for failure in summary["failed"]:
        print(f"failed {failure['overrides']}:\n{failure['error']}", file=sys.stderr)
    return 1 if summary["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imprint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="notebooks, their parameters and profiles")
    p_list.add_argument("notebooks", nargs="*", help="named: one line of description per parameter")
    p_run = sub.add_parser("run", help="execute notebooks with papermill")
    p_run.add_argument("notebooks", nargs="*", help="names or numbers (default: all)")
    p_run.add_argument("--profile", default=CI, help="ci (default), full, or a profile of params/NN.yaml")
    p_run.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="override a parameter")
    p_run.add_argument("--timeout", type=float, default=None, help="seconds per notebook")
    p_run.add_argument("--log-output", action="store_true", help="stream cell output to the terminal")
    p_run.add_argument("--keep-going", action="store_true", help="run the remaining notebooks after a failure")
    p_book = sub.add_parser("book", help="build the book from executed notebooks (never executes)")
    p_book.add_argument("--profile", default=CI, help="ci (default) or full (the book of record)")
    p_book.add_argument("--verbose", action="store_true")
    p_book.add_argument("--pdf", action="store_true", help="a PDF through LaTeX (needs XeLaTeX: make pdf installs it)")
    p_export = sub.add_parser("export", help="write .ipynb copies of the MyST sources (no execution)")
    p_export.add_argument("notebooks", nargs="*")
    p_export.add_argument("--to", required=True, help="destination folder")
    p_sweep = sub.add_parser("sweep", help="run a notebook over a grid of parameters with Dask (resumable)")
    p_sweep.add_argument("notebook")
    p_sweep.add_argument("--profile", default=CI)
    p_sweep.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                         help="values of one parameter: V1,V2 or [V1, V2]; V1;V2 for lists, e.g. widths=[4];[8, 8]")
    p_sweep.add_argument("--workers", type=int, default=1)
    p_sweep.add_argument("--scheduler", default="local", choices=["local", "slurm", "lsf"])
    p_sweep.add_argument("--timeout", type=float, default=None, help="seconds per notebook")
    _add_cluster_arguments(p_sweep)
    p_lab = sub.add_parser("lab", help="JupyterLab on 127.0.0.1 with a token, here or as a SLURM/LSF job")
    p_lab.add_argument("--port", type=int, default=8888)
    p_lab.add_argument("--scheduler", default=None, choices=["slurm", "lsf"], help="submit as a batch job")
    p_lab.add_argument("--dry-run", action="store_true", help="print the job script (or command) only")
    p_lab.add_argument("--wait", type=float, default=3600.0, help="seconds to wait for the job's node")
    _add_cluster_arguments(p_lab)
    args = parser.parse_args(argv)
    try:
        return {"list": _cmd_list, "run": _cmd_run, "book": _cmd_book, "export": _cmd_export,
                "sweep": _cmd_sweep, "lab": _cmd_lab}[args.command](args)
    except ParameterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # one line, no traceback: what stopped and how to go on
        command = "python -m imprint " + shlex.join(sys.argv[1:] if argv is None else argv)
        print(f"{err or 'interrupted'}; run `{command}` again to resume from its checkpoints", file=sys.stderr)
        return 130

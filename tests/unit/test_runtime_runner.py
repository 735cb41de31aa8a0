"""The papermill runner on a toy notebook: outputs, provenance, failures (executes real kernels)."""

import json

import nbformat
import pytest

from imprint.runtime.params import resolve_run
from imprint.runtime.runner import NotebookFailed, code_cells, execute


def test_ci_run_writes_executed_notebook_and_metrics_with_provenance(project):
    run = resolve_run("99_toy", overrides={"n": 4}, root=project)
    paths = execute(run, root=project, progress=False)
    assert paths.executed.parent.parent.name == "notebooks" and paths.record is None
    record = json.loads(paths.metrics.read_text())
    assert record["metrics"] == {"total": 2.0, "name": "a"}
    assert record["parameters"]["n"] == 4 and record["overrides"] == {"n": 4}
    assert record["profile"] == "ci" and record["label"] == run.label
    assert set(record["provenance"]) >= {"git", "versions", "device"}
    assert record["wall_time_s"] > 0
    nb = nbformat.read(paths.executed, as_version=4)
    assert nb.metadata["imprint"]["parameters"]["n"] == 4
    glued = [o for c in nb.cells for o in c.get("outputs", [])
             if o.get("metadata", {}).get("scrapbook", {}).get("name") == "total"]
    assert glued and glued[0]["data"]["application/papermill.record/text/plain"] == "2.0"
    # the injected cell is not part of the code the staleness check compares
    assert "n = 4" not in "\n".join(code_cells(nb))


def test_full_run_is_promoted_to_the_book(project):
    (project / "params" / "99_toy.yaml").write_text("full:\n  n: 10\n")
    paths = execute(resolve_run("99_toy", "full", root=project), root=project, progress=False)
    assert paths.record == project / "book" / "notebooks" / "99_toy.ipynb" and paths.record.is_file()
    metrics = json.loads((project / "book" / "metrics" / "99_toy.json").read_text())
    assert metrics["metrics"]["total"] == 5.0


def test_failure_names_the_cell_keeps_the_partial_copy_and_never_touches_the_record(project):
    (project / "params" / "99_toy.yaml").write_text("full:\n  name: boom\n")
    record = project / "book" / "notebooks" / "99_toy.ipynb"
    record.parent.mkdir(parents=True)
    record.write_text("previous record")
    with pytest.raises(NotebookFailed, match=r"cell \d+ .*RuntimeError: asked to fail") as err:
        execute(resolve_run("99_toy", "full", root=project), root=project, progress=False)
    assert err.value.partial is not None and err.value.partial.is_file()
    assert record.read_text() == "previous record"


def test_book_takes_prose_from_the_source_only_when_the_code_is_unchanged(project):
    from imprint.runtime.book import refresh_prose
    from imprint.runtime.params import read_notebook

    source_path = project / "notebooks" / "99_toy.md"
    paths = execute(resolve_run("99_toy", root=project), root=project, progress=False)
    executed = nbformat.read(paths.executed, as_version=4)
    source_path.write_text(source_path.read_text().replace("# A toy", "# A toy, revised"))
    merged = refresh_prose(executed, read_notebook(source_path))
    assert "revised" in merged.cells[0].source
    assert any(o for c in merged.cells for o in c.get("outputs", []))  # outputs kept
    source_path.write_text(source_path.read_text().replace("n * lr", "n * lr * 2"))
    executed = nbformat.read(paths.executed, as_version=4)
    unchanged = refresh_prose(executed, read_notebook(source_path))
    assert "revised" not in unchanged.cells[0].source


def test_a_failed_rerun_keeps_its_partial_copy_beside_the_last_good_one(project):
    run = resolve_run("99_toy", overrides={"name": "b"}, root=project)
    good = execute(run, root=project, progress=False)
    assert good.executed.is_file() and not good.partial.exists()
    before = good.executed.read_bytes()
    source = project / "notebooks" / "99_toy.md"
    source.write_text(source.read_text().replace('if name == "boom":', 'if name == "b":'))
    with pytest.raises(NotebookFailed) as err:
        execute(run, root=project, progress=False)
    assert err.value.partial == good.partial and good.partial.name == "99_toy.partial.ipynb"
    assert good.partial.is_file() and good.executed.read_bytes() == before


def test_ctrl_c_ends_with_one_line_on_how_to_resume_and_keeps_the_good_copy(project):
    import os
    import signal
    import subprocess
    import sys
    import time

    from imprint.runtime.provenance import repo_root
    from imprint.runtime.runner import run_paths

    source = project / "notebooks" / "99_toy.md"
    source.write_text(source.read_text().replace('if name == "boom":', 'if name == "slow":\n    import time; time.sleep(600)\nif name == "boom":'))
    run = resolve_run("99_toy", overrides={"name": "slow"}, root=project)
    paths = run_paths(run, project)
    paths.executed.parent.mkdir(parents=True)
    paths.executed.write_text("the last good executed copy")
    env = dict(os.environ, IMPRINT_ROOT=str(project), PYTHONPATH=str(repo_root() / "lib"))
    proc = subprocess.Popen([sys.executable, "-m", "imprint", "run", "99_toy", "-p", "name=slow"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for _ in range(1200):  # papermill writes the partial copy when the kernel has started
            if paths.partial.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert paths.partial.exists(), proc.communicate()
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole foreground group
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("99_toy [") and "interrupted" in lines[0]
    assert "run `python -m imprint run 99_toy -p name=slow` again to resume" in lines[0]
    assert paths.executed.read_text() == "the last good executed copy" and paths.partial.is_file()


def test_warnings_and_progress_bars_stay_out_of_the_executed_notebook(project):
    source = project / "notebooks" / "99_toy.md"
    source.write_text(source.read_text().replace('if name == "boom":', (
        'if name == "noisy":\n'
        '    import warnings\n'
        '    from tqdm.auto import tqdm\n'
        '    warnings.warn("a warning from /some/machine/path")\n'
        '    total_steps = sum(1 for _ in tqdm(range(3), desc="steps"))\n'
        '    print("kept: stdout")\n'
        'if name == "boom":')))
    paths = execute(resolve_run("99_toy", overrides={"name": "noisy"}, root=project), root=project, progress=False)
    nb = nbformat.read(paths.executed, as_version=4)
    streams = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream"]
    assert [o["name"] for o in streams] == ["stdout"] and "kept: stdout" in streams[0]["text"]
    log = (paths.results / "warnings.log").read_text()
    assert "UserWarning: a warning from /some/machine/path" in log


def test_figures_are_embedded_even_when_the_shell_sets_a_non_inline_backend(project, monkeypatch):
    source = project / "notebooks" / "99_toy.md"
    source.write_text(source.read_text().replace('if name == "boom":', (
        'if name == "figure":\n'
        '    import matplotlib.pyplot as plt\n'
        '    fig, ax = plt.subplots()\n'
        '    ax.plot([0, 1])\n'
        '    display(fig)\n'
        'if name == "boom":')))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    paths = execute(resolve_run("99_toy", overrides={"name": "figure"}, root=project), root=project, progress=False)
    nb = nbformat.read(paths.executed, as_version=4)
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))

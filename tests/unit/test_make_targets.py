"""The Makefile's test verbs leave what `make run` made alone (read from `make -n`, nothing executes)."""

import re
import shutil
import subprocess

import pytest

from imprint.runtime.provenance import repo_root

RUN_OUTPUTS = re.compile(r"results/[^ ]*/ci\b|_build/notebooks/ci\b|_build/book/ci\b|--profile ci\b|IMPRINT_PROFILE=ci\b")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("target", ["test", "notebooks"])
def test_test_targets_never_touch_the_ci_run(target):
    proc = subprocess.run(["make", "-n", "-B", target], cwd=repo_root(), capture_output=True, text=True, check=True)
    touched = [line for line in proc.stdout.splitlines() if RUN_OUTPUTS.search(line)]
    assert not touched, f"`make {target}` would touch the ci run's results or book: {touched}"
    assert "nbmake" in proc.stdout

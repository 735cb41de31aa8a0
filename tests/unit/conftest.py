"""A toy project (notebook + params folder) for the runtime tests."""

import textwrap

import pytest
import torch

NOTEBOOK = textwrap.dedent('''\
    ---
    jupytext:
      text_representation:
        extension: .md
        format_name: myst
    kernelspec:
      display_name: Python 3
      language: python
      name: python3
    ---

    # A toy

    ```{code-cell} ipython3
    :tags: [parameters]

    n = 3
    lr = 0.5
    name = "a"
    flag = False
    widths = [4, 4]
    path = None
    ```

    ```{code-cell} ipython3
    from imprint.runtime import results_dir, write_metrics, glue
    out = results_dir("99_toy")
    if name == "boom":
        raise RuntimeError("asked to fail")
    write_metrics(out, {"total": n * lr, "name": name})
    glue("total", n * lr)
    ```
    ''')


@pytest.fixture
def project(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "params").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "notebooks" / "99_toy.md").write_text(NOTEBOOK)
    return tmp_path


@pytest.fixture
def one_torch_thread():
    """Tiny shapes gain nothing from a second thread, and lose a lot when other processes share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

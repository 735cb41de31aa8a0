"""Seeding and determinism for python, numpy and torch."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = True) -> torch.Generator:
    """Seed every generator; with ``deterministic`` ask torch for deterministic kernels where it has them.

    Deterministic kernels fix the order of their reductions, which is what makes two runs (or a resumed
    run) give the same numbers. Torch's deterministic mode also fills every newly allocated tensor with
    NaN by default (``torch.utils.deterministic.fill_uninitialized_memory``); that only changes code which
    reads memory it never wrote, and costs one more kernel per allocation (on chapter 03's exact store on an
    H100, no measurable time: ``benchmarks/results/exact_store_batches_cuda.log``), so it is switched off
    here (``tests/unit/test_gradients_pipeline.py`` checks that the gradient kernels never read such memory).

    Returns a CPU ``torch.Generator`` seeded with ``seed`` for code that prefers an explicit generator.
    """
    from imprint.runtime.checks import require_int

    seed = require_int("seed", seed, minimum=0)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return torch.Generator().manual_seed(seed)

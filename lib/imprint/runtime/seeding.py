"""Seeding and determinism for python, numpy and torch."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = True) -> torch.Generator:
    """Seed every generator; with ``deterministic`` ask torch for deterministic kernels where it has them.

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
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return torch.Generator().manual_seed(seed)

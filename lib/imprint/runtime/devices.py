"""Device choice from a notebook parameter: ``"cpu"``, ``"cuda"`` (or ``"cuda:1"``) or ``"auto"``."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    if not isinstance(name, str):
        raise ValueError(f"device={name!r}: expected 'cpu', 'cuda', 'cuda:N' or 'auto'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r}: CUDA is not available on this machine "
                             "(use device='cpu' or 'auto')")
        return torch.device(name)
    raise ValueError(f"device={name!r}: expected 'cpu', 'cuda', 'cuda:N' or 'auto'")


def describe_device(device: torch.device | str | None = None) -> str:
    """A human-readable name: the GPU's model, or the CPU count."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    import os

    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"

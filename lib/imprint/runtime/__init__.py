"""The runtime every notebook shares: parameters and profiles, the papermill runner, results and glue,
seeding, devices, atomic I/O, checkpoints and resume, and the plotting style."""

from imprint.runtime.checkpoint import Checkpoint, Checkpointer, keyed_dir
from imprint.runtime.devices import describe_device, resolve_device
from imprint.runtime.io import (atomic_save_tensors, atomic_savefig, atomic_write_json, atomic_write_text,
                                load_tensor_metadata, load_tensors)
from imprint.runtime.plotting import image_grid, use_style
from imprint.runtime.results import current_profile, glue, results_dir, write_metrics
from imprint.runtime.seeding import seed_everything

__all__ = [
    "Checkpoint", "Checkpointer", "atomic_save_tensors", "atomic_savefig", "atomic_write_json",
    "atomic_write_text", "current_profile", "describe_device", "glue", "image_grid", "keyed_dir", "load_tensor_metadata",
    "load_tensors", "resolve_device", "results_dir", "seed_everything", "use_style", "write_metrics",
]

"""Imprint: kernels behind a lab book on what trained weights and gradients reveal about their data."""

import warnings

# Without ipywidgets, tqdm.auto falls back to a text bar inside notebooks; the warning it prints about
# that would end up in every executed notebook of record.
warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")

__version__ = "0.1.0"

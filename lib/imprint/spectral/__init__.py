"""Spectra of Jacobians: matrix-free operators from torch.func, Lanczos and dense eigensolvers, trace estimators."""

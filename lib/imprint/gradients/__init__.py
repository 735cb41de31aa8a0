"""Per-example gradients, random projections, partitioned gradient stores and layer-wise similarity:
the kernels of the gradient-similarity chapter (03)."""

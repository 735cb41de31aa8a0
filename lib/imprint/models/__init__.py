"""Models: the homogeneous MLP and its batched trainer, language models, diffusion models."""

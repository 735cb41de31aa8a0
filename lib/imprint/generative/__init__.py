"""Generative-model experiments: the self-consuming training loop, FID, PRDC and class histograms."""

"""Datasets: the offline defaults that ship with packages, and loaders for users' local files."""

"""Reconstruction: implicit bias towards the max-margin KKT point, and training-data extraction from weights."""

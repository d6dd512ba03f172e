"""Benchmarks that train and compare several models (above training and evaluation)."""

"""Shared test set-up: capability markers that explain a skip instead of passing silently."""

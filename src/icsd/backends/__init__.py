"""Swappable model adapters. Backends know nothing of the run directory."""

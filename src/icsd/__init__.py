"""icsd: train image captioners on multi-context synthetic data only (ICSD, AAAI 2024)."""

__version__ = "0.1.0"

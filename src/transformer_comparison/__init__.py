"""transformer-comparison: compare attention mechanisms and positional encodings on language modelling."""

__version__ = "0.1.0"

"""ensemble-instruct: Ensemble-Instruct data generation with local quantized models."""

__version__ = "0.1.0"

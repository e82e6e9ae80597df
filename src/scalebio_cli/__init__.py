"""scalebio: learn sampling weights over training sources with ScaleBiO."""

__version__ = "0.1.0"

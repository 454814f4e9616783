"""Mugs: multi-granular self-supervised pretraining of Vision Transformers."""

__version__ = "0.1.0"

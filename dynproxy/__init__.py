"""dynproxy: a dynamic Layer-4 proxy steered by a small rule language."""

__version__ = "0.1.0"

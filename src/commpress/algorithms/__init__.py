"""Compressed collective algorithms, built only on torch.distributed primitives."""

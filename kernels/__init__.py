"""Triton kernels of rnnfast, installed as ``rnnfast.kernels``.

Empty until the Triton backend lands; the backend registers itself with :mod:`rnnfast.backends` on import.
"""

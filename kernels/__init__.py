"""Triton kernels of opd_fast, installed as ``opd_fast.kernels`` (never as a top-level ``kernels``).

Each op gets a module here holding its ``@triton.jit`` kernels and a thin launcher whose argument order
matches the CUDA binding in ``csrc/``; ``opd_fast.backends`` dispatches to them. Nothing in this package
queries the GPU at import time.
"""

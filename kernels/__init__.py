"""Triton kernels of fusedlm, one file per op; installed as the subpackage fusedlm.kernels."""

"""univigu-fast: Triton kernels and a drop-in fast model for Uni-ViGU (Wan2.1 + a text stream)."""
__version__ = "0.1.0"

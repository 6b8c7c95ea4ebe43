"""Triton kernels of univigu-fast, one op per file (shipped as ``univigu_fast.kernels``).

Each ``<op>.py`` holds the Triton kernels, a launcher, the ``torch.autograd.Function`` where the op
has a backward, and ``<op>_reference``: the pure-PyTorch spec the kernel is tested against.
Submodules are imported on demand (``from univigu_fast.kernels.modality_ffn import modality_ffn``).
"""

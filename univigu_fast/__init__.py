"""univigu-fast: Triton kernels and a drop-in fast model for Uni-ViGU (Wan2.1 + a text stream).

``from univigu_fast import UniViGUModel, UniViGUConfig`` (the fast model); the reference model is
``univigu_fast.reference.UniViGUModel``. Imports are lazy so ``import univigu_fast`` stays light.
"""
__version__ = "0.1.0"

_LAZY = {
    "UniViGUModel": ("univigu_fast.model", "UniViGUModel"),
    "UniViGUConfig": ("univigu_fast.config", "UniViGUConfig"),
    "UniViGUOutput": ("univigu_fast.modeling", "UniViGUOutput"),
    "TextDecoded": ("univigu_fast.modeling", "TextDecoded"),
    "TextLoss": ("univigu_fast.modeling", "TextLoss"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'univigu_fast' has no attribute {name!r}")


__all__ = list(_LAZY)

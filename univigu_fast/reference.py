"""The reference Uni-ViGU model: pure PyTorch ops (naive routing, per-sample SDPA, eager glue).

It is the naive baseline and the spec the fast model is tested against; same config, modules,
parameter names and forward as ``univigu_fast.UniViGUModel`` (see ``univigu_fast/modeling.py``).
"""
from .modeling import TextDecoded, UniViGUModelBase, UniViGUOutput
from .ops import REFERENCE_OPS


class UniViGUModel(UniViGUModelBase):
    ops = REFERENCE_OPS


__all__ = ["UniViGUModel", "UniViGUOutput", "TextDecoded"]

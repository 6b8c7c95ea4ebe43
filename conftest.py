"""pytest setup shared by tests/ and bench/.

The repository root holds ``kernels/`` (shipped as ``univigu_fast.kernels``, DESIGN §1). On sys.path
(``python -m pytest`` puts the working directory there, and so does this file's own rootdir insertion)
that folder shadows Hugging Face's ``kernels`` package, which transformers >= 5.25 imports when it is
installed: diffusers' Wan model, the video path's oracle, then fails to import. The root stays on the
path, after site-packages.
"""
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent
_root_entries = [p for p in sys.path if Path(p or ".").resolve() == _ROOT]
sys.path[:] = [p for p in sys.path if p not in _root_entries] + _root_entries

# ... which lets an installed (non-editable) copy of the package win over the checkout: say so
import importlib.util  # noqa: E402

_spec = importlib.util.find_spec("univigu_fast")
if _spec is not None and _spec.origin and _ROOT not in Path(_spec.origin).resolve().parents:
    sys.stderr.write(f"conftest.py: testing the installed univigu_fast at {_spec.origin}, not this checkout "
                     f"({_ROOT}); install the checkout with `pip install -e .`\n")
elif _spec is not None:
    # the kernels are univigu_fast.kernels through the editable install's mapping, which points at the
    # checkout that was installed: another checkout (a worktree, a clone) would test its own Python
    # code against that one's kernels without a word
    _kernels = importlib.util.find_spec("univigu_fast.kernels")
    if _kernels is not None and _kernels.origin and _ROOT / "kernels" not in Path(_kernels.origin).resolve().parents:
        import pytest

        raise pytest.UsageError(f"univigu_fast comes from this checkout ({_ROOT}) but univigu_fast.kernels from "
                                f"{Path(_kernels.origin).parent}: run `pip install -e .` here to test this checkout")

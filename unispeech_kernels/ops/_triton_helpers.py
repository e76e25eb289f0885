"""Small pieces shared by the kernels: exact (erf) GELU and its derivative as ``@triton.jit``
helpers, launch-size helpers, how a kernel's tiles are chosen under the interpreter, and the dtype
names used by ``aot_specs()``."""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from .._runtime import interpret_mode

TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
NORM_NONE, NORM_LAYER, NORM_GROUP = 0, 1, 2  # kernel NORM constexpr values


@triton.jit
def gelu(x):
    """Exact GELU on fp32: x * Phi(x)."""
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def gelu_grad(x):
    """d GELU / dx on fp32: Phi(x) + x * phi(x)."""
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    return cdf + x * pdf


@triton.jit
def to_out(x, ptr):
    """fp32 -> the element type of ``ptr``, rounded to nearest even. For bf16 the rounding is done on
    the bits (the Triton interpreter truncates fp32 -> bf16, which biases every sum downstream);
    the result is then exact in bf16, so GPUs give the same bits as their own rounding."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    return x.to(ptr.dtype.element_ty)


@functools.lru_cache(None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """Programs that fill the device a few times over (small under the interpreter)."""
    if device.type != "cuda" or interpret_mode():
        return 4
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def split_work(n_tiles: int, other_programs: int, device: torch.device):
    """Split ``n_tiles`` tiles of a reduction axis over programs: (splits, tiles per split)."""
    splits = max(1, min(n_tiles, triton.cdiv(target_programs(device), max(1, other_programs))))
    per = triton.cdiv(n_tiles, splits)
    return triton.cdiv(n_tiles, per), per


# Under TRITON_INTERPRET autotuning means nothing (it would time CPU runs), so each kernel runs one
# small tile config there that keeps the interpreted tests fast. A test can force a GPU config
# instead (``forced_tiles``), to check on the CPU that every config the GPU may pick computes the
# right answer. Keyed by the kernel object (an Autotuner or a plain JIT function).
_FORCED_TILES: dict = {}


@contextlib.contextmanager
def forced_tiles(kernel, tiles: dict):
    """Within the block, interpreted launches of ``kernel`` use ``tiles`` (constexpr tile sizes)."""
    _FORCED_TILES[id(kernel)] = dict(tiles)
    try:
        yield
    finally:
        del _FORCED_TILES[id(kernel)]


def tile_config(kernel, gpu: dict, interpret: dict) -> dict:
    """The tiles of an untuned kernel: ``gpu``, or under the interpreter ``interpret`` (or forced)."""
    return _FORCED_TILES.get(id(kernel), interpret) if interpret_mode() else gpu


AUTOTUNED: dict = {}  # name -> triton Autotuner, every kernel made by ``autotuned``


def autotuned(name: str, configs, key, prune=None):
    """``triton.autotune`` with ``configs`` keyed on the argument names ``key``, registered under
    ``name`` so that ``tuned_choices`` can report which config won for each key."""
    def wrap(kernel):
        tuned = triton.autotune(configs, key=key,
                                prune_configs_by={"early_config_prune": prune} if prune else None)(kernel)
        AUTOTUNED[name] = tuned
        return tuned
    return wrap


def tuned_choices() -> dict:
    """{kernel name: {"key_names": [...], "picks": [{"key": [...], "config": {...}}, ...]}}: the config
    each autotuned kernel picked for each key it met in this process (key = the key arguments'
    values, then the tensor dtypes); kernels that tuned nothing are left out.
    Benchmarks store it with their results, so the config lists can follow what wins on a GPU."""
    out = {}
    for name, tuned in AUTOTUNED.items():
        picks = [{"key": [str(k) for k in key],
                  "config": dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)}
                 for key, cfg in tuned.cache.items()]
        if picks:
            out[name] = {"key_names": list(tuned.keys), "picks": picks}
    return out


def launch_tuned(tuned, grid, *args, interpret: dict, **flags):
    """Launch autotuned kernel ``tuned`` over ``grid(meta)``; under the interpreter, the plain kernel
    with the ``interpret`` tiles (or the forced ones) and no autotuning."""
    if not interpret_mode():
        return tuned[grid](*args, **flags)
    tiles = _FORCED_TILES.get(id(tuned), interpret)
    return tuned.fn[grid(tiles)](*args, **flags, **tiles)


def bucket(n: int) -> int:
    """Autotune key for a length: the next power of two (at least 1024)."""
    return max(1024, triton.next_power_of_2(n))


def aot_spec(name, fn, sig, constexprs, num_warps, num_stages=1, mma=False, divisible=()):
    """One aot_specs() entry; the signature lists every kernel argument in order. Pointers are
    16-byte aligned at model shapes (torch's allocator), which the JIT specialises on; ``divisible``
    names the integer arguments that are multiples of 16 at model shapes (512 channels and the
    strides / buckets built from them), which the JIT specialises on in the same way."""
    names = fn.arg_names
    missing = [a for a in names if a not in sig and a not in constexprs]
    if missing:
        raise RuntimeError(f"aot spec {name}: no type for {missing}")
    signature = {a: ("constexpr" if a in constexprs else sig[a]) for a in names}
    unknown = [a for a in divisible if a not in signature or signature[a] == "constexpr"]
    if unknown:
        raise RuntimeError(f"aot spec {name}: divisible names no runtime argument {unknown}")
    return {"name": name, "fn": fn, "signature": signature, "constexprs": dict(constexprs),
            "num_warps": num_warps, "num_stages": num_stages, "mma": mma,
            "divisible_by_16": [a for a in names if signature[a].startswith("*") or a in divisible]}

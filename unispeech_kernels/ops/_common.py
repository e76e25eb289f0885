"""Host-side pieces several ops share, importable without Triton: integer helpers, the norm codes
the kernels take, the length buckets of autotune keys, launch sizes, the one ``aot_specs()`` entry
builder, how a kernel's tiles are chosen (autotuned on a GPU, fixed or forced under the
interpreter), and how an op follows autocast."""
from __future__ import annotations

import contextlib
import functools

import torch

from .._runtime import interpret_mode, target_programs

# norm_mode -> the NORM code the kernels and the CUDA extension take (csrc FclNorm)
NORM_CODES = {"none": 0, "layer": 1, "group": 2}
NORM_NONE, NORM_LAYER, NORM_GROUP = NORM_CODES["none"], NORM_CODES["layer"], NORM_CODES["group"]
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what every Triton kernel takes
TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def follows_autocast(entry):
    """An op's functional entry under autocast acts as torch's convolutions do: its floating tensor
    arguments (in lists and tuples too) are cast to the autocast dtype of the first tensor's device
    and the op runs with autocast off there, so every backend sees one dtype (norm statistics stay
    fp32 inside the op). Integer tensors (lengths) pass unchanged."""

    @functools.wraps(entry)
    def run(*args, **kwargs):
        first = args[0]
        device = first.device.type if isinstance(first, torch.Tensor) else None
        if device is None or not torch.is_autocast_enabled(device):
            return entry(*args, **kwargs)
        dtype = torch.get_autocast_dtype(device)

        def cast(a):
            if isinstance(a, torch.Tensor):
                return a.to(dtype) if a.is_floating_point() else a
            return type(a)(cast(x) for x in a) if isinstance(a, (list, tuple)) else a

        with torch.autocast(device, enabled=False):
            return entry(*cast(args), **{k: cast(v) for k, v in kwargs.items()})

    return run


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def length_bucket(n: int, low: int = 1, high: int = None) -> int:
    """Autotune key for a length: the next power of two, at least ``low`` (and at most ``high``), so
    that changing audio lengths tune once per bucket."""
    bucket = max(low, next_power_of_2(n))
    return bucket if high is None else min(bucket, high)


def split_work(n_tiles: int, other_programs: int, device: torch.device):
    """Split ``n_tiles`` tiles of a reduction axis over programs: (splits, tiles per split)."""
    splits = max(1, min(n_tiles, cdiv(target_programs(device), max(1, other_programs))))
    per = cdiv(n_tiles, splits)
    return cdiv(n_tiles, per), per


def aot_spec(name, fn, types: dict, constexprs: dict, num_warps: int, num_stages: int = 1, mma: bool = False,
             divisible=()):
    """One aot_specs() entry (the format check_kernels reads): ``types`` gives every runtime argument
    ("*bf16", "i32", "fp32"...), ``constexprs`` the rest, in the kernel's argument order. Pointers are
    16-byte aligned at model shapes (torch's allocator) and ``divisible`` names the integer arguments
    that are multiples of 16 there: the JIT specialises on both, so the compile check does too."""
    names = fn.arg_names
    missing = [a for a in names if a not in types and a not in constexprs]
    if missing:
        raise RuntimeError(f"aot spec {name}: no type for {missing}")
    signature = {a: ("constexpr" if a in constexprs else types[a]) for a in names}
    unknown = [a for a in divisible if a not in signature or signature[a] == "constexpr"]
    if unknown:
        raise RuntimeError(f"aot spec {name}: divisible names no runtime argument {unknown}")
    return {"name": name, "fn": fn, "signature": signature, "constexprs": dict(constexprs),
            "num_warps": num_warps, "num_stages": num_stages, "mma": mma,
            "divisible_by_16": [a for a in names if signature[a].startswith("*") or a in divisible]}


# ---------------------------------------------------------------------------------------- tiles
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
    import triton

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

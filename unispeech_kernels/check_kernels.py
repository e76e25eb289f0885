"""Ahead-of-time kernel checks that need no GPU: ``python -m unispeech_kernels.check_kernels``.

(a) every csrc/*.cu compiles with nvcc for sm_80 and sm_90; ptxas -v gives registers, static shared
    memory and local-memory spills per kernel; every CUDA kernel here is a hot kernel, so any spill
    fails. CUDA_HOME defaults to /usr/local/cuda; without nvcc this part prints SKIPPED.
(b) every Triton kernel listed by ``aot_specs()`` in the registered op modules
    (``unispeech_kernels.ops.OP_MODULES``) compiles with
    triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32)) for cc 80 and 90; ptxas -v on
    the generated PTX gives registers and spills, the metadata gives shared memory, and kernels with
    spec["mma"] must contain tensor-core instructions (sm_80: mma.sync; sm_90: wgmma, mma.sync
    accepted and reported). A module without ``aot_specs`` is listed as "no Triton kernels".
(c) one table (kernel, arch, regs, smem, spills, tensor-core instr, status); exit status 1 on any
    failure. Registers and spills are ptxas' own report of the compile Triton ran (its log, where the
    Triton version can print it; else ptxas -v again on the PTX). Nothing is cached across runs
    (Triton's cache goes to a temporary directory) unless ``--cache DIR`` is given: then each build
    is kept there under a hash of the spec, the kernel's source (with everything it calls), the
    Triton version and TRITON_* settings, and ``python -m unispeech_kernels.perf_model`` reuses it.

An aot spec: {"name": str, "fn": @triton.jit function, "signature": {arg: "*bf16" | "i32" | "fp32" |
"constexpr" ...}, "constexprs": {arg: value}, "num_warps": int, "num_stages": int, "mma": bool}.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import importlib
import inspect
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Optional

ARCHS = (80, 90)
CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
SPEC_KEYS = ("name", "fn", "signature", "constexprs", "num_warps", "num_stages", "mma")


@dataclass
class Row:
    kernel: str
    arch: str
    regs: Optional[int] = None
    smem: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    tensor_core: str = "-"
    status: str = "ok"

    @property
    def failed(self) -> bool:
        return self.status.startswith("FAIL")


# ---- parsing --------------------------------------------------------------------------------------
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_verbose(text: str) -> list:
    """ptxas -v output -> [{name, arch, regs, smem, spill_stores, spill_loads}] per entry function."""
    records, current, props_of = [], None, None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = {"name": m.group(1), "arch": m.group(2), "regs": None, "smem": 0,
                       "spill_stores": 0, "spill_loads": 0}
            records.append(current)
            props_of = None
            continue
        m = _PROPS.search(line)
        if m:
            props_of = m.group(1)
            continue
        m = _SPILLS.search(line)
        if m and current is not None and props_of in (None, current["name"]):
            current["spill_stores"] = int(m.group(2))
            current["spill_loads"] = int(m.group(3))
            continue
        m = _REGS.search(line)
        if m and current is not None:
            current["regs"] = int(m.group(1))
            s = _SMEM.search(line)
            current["smem"] = int(s.group(1)) if s else 0
    return records


def tensor_core_instr(ptx: str) -> Optional[str]:
    """'wgmma', 'mma.sync' or None: the tensor-core instruction family present in a PTX text."""
    if re.search(r"\bwgmma\.mma_async", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return None


def short_cuda_name(mangled: str) -> str:
    """Demangled kernel name without namespaces and parameter list (mangled if c++filt is absent)."""
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return mangled
    name = subprocess.run([cxxfilt, mangled], capture_output=True, text=True).stdout.strip() or mangled
    name = re.sub(r"^void ", "", name).replace("(anonymous namespace)::", "").replace("unispeech::", "")
    return name[:name.rfind("(")] if name.endswith(")") else name


def spill_status(rec: dict) -> str:
    if rec["regs"] is None:
        return "FAIL: no ptxas report"
    if rec["spill_stores"] or rec["spill_loads"]:
        return "FAIL: spills"
    return "ok"


# ---- (a) CUDA sources -----------------------------------------------------------------------------
def cuda_home() -> str:
    return os.environ.get("CUDA_HOME") or "/usr/local/cuda"


def check_cuda_sources(archs=ARCHS, csrc=CSRC) -> tuple:
    """(rows, skipped line or None) for every csrc/*.cu."""
    nvcc = os.path.join(cuda_home(), "bin", "nvcc")
    if not os.path.exists(nvcc):
        return [], f"SKIPPED CUDA sources: nvcc not found at {nvcc} (set CUDA_HOME)"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in sorted(glob.glob(os.path.join(csrc, "*.cu"))):
            gencode = [a for cc in archs for a in ("-gencode", f"arch=compute_{cc},code=sm_{cc}")]
            cmd = [nvcc, "-c", "-O3", "-std=c++17", "-Xptxas", "-v", *gencode, source,
                   "-o", os.path.join(tmp, "kernel.o")]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            base = os.path.basename(source)
            if proc.returncode != 0:
                tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
                rows.append(Row(base, ",".join(f"sm_{cc}" for cc in archs), status=f"FAIL: nvcc: {tail}"))
                continue
            for rec in parse_ptxas_verbose(proc.stderr):
                rows.append(Row(f"{base}:{short_cuda_name(rec['name'])}", rec["arch"], rec["regs"], rec["smem"],
                                rec["spill_stores"], rec["spill_loads"], "-", spill_status(rec)))
    return rows, None


# ---- (b) Triton kernels ---------------------------------------------------------------------------
def collect_specs(module_names=None) -> list:
    """[(module name, specs or None)] of the registered op modules (or the given modules)."""
    if module_names is None:
        from .ops import OP_MODULES

        module_names = [f"unispeech_kernels.ops.{name}" for name in OP_MODULES]
    out = []
    for name in sorted(module_names):
        module = importlib.import_module(name)
        out.append((name, list(module.aot_specs()) if hasattr(module, "aot_specs") else None))
    return out


def make_ast_source(spec: dict):
    """triton.compiler.ASTSource for a spec, for triton 3.1 (constants=, signature without constexprs)
    and triton >= 3.2 (constexprs=, signature listing constexpr arguments as "constexpr")."""
    from triton.compiler import ASTSource

    constexprs = dict(spec["constexprs"])
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:
        signature = dict(spec["signature"])
        for name in constexprs:
            signature[name] = "constexpr"
        # the JIT's specialisation at model shapes: 16-aligned pointers / 16-divisible sizes
        # (vectorised loads, cp.async pipelining); without it register counts are not what runs
        names = spec["fn"].arg_names
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.get("divisible_by_16", ())}
        return ASTSource(fn=spec["fn"], signature=signature, constexprs=constexprs, attrs=attrs)
    signature = {k: v for k, v in spec["signature"].items() if v != "constexpr" and k not in constexprs}
    return ASTSource(fn=spec["fn"], signature=signature, constants=constexprs)


def triton_ptxas(cc: int) -> Optional[str]:
    """Triton's bundled ptxas for this arch, else the toolkit's, else one on PATH."""
    try:
        from triton.backends.nvidia import compiler as nv

        if hasattr(nv, "get_ptxas"):
            return nv.get_ptxas(cc).path
        if hasattr(nv, "_path_to_binary"):
            return nv._path_to_binary("ptxas")[0]
    except Exception:  # fall back to the toolkit's ptxas below
        pass
    toolkit = os.path.join(cuda_home(), "bin", "ptxas")
    return toolkit if os.path.exists(toolkit) else shutil.which("ptxas")


def ptxas_verbose(ptx: str, cc: int) -> str:
    """ptxas -v report of a PTX text, for the target named in the PTX (sm_90a for wgmma code)."""
    ptxas = triton_ptxas(cc)
    if ptxas is None:
        raise RuntimeError("no ptxas found")
    target = re.search(r"^\.target\s+(\w+)", ptx, re.M)
    arch = target.group(1) if target else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", path, "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr.strip()[-300:]}")
    return proc.stderr + proc.stdout


@dataclass
class Build:
    """One aot spec compiled by this interpreter's Triton for one compute capability."""
    name: str
    cc: int
    triton: str
    record: Optional[dict] = None  # ptxas report of the entry function (parse_ptxas_verbose)
    smem: Optional[int] = None  # bytes of shared memory per block (static + dynamic), Triton metadata
    tensor_core: Optional[str] = None  # tensor_core_instr of the PTX
    cubin: Optional[bytes] = None
    error: Optional[str] = None  # the compile's failure, as the table prints it


def spec_key(spec: dict, cc: int) -> str:
    """Hash of everything a build depends on: the spec, the kernel's source with what it calls
    (Triton's own JITFunction.cache_key), the Triton version and the TRITON_* settings."""
    import triton

    env = sorted((k, v) for k, v in os.environ.items()
                 if k.startswith("TRITON_") and k not in ("TRITON_CACHE_DIR", "TRITON_INTERPRET"))
    parts = [triton.__version__, cc, spec["fn"].cache_key, spec["signature"], spec["constexprs"],
             spec["num_warps"], spec["num_stages"], sorted(spec.get("divisible_by_16", ())), env]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()[:32]


def _compile(spec: dict, cc: int):
    """(CompiledKernel, ptxas report text). Triton >= 3.4 prints the log of its own ptxas run when
    TRITON_DUMP_PTXAS_LOG is set (always compiling, so a Triton cache hit cannot hide it); older
    versions get ptxas -v again on the PTX."""
    import triton
    from triton.backends.compiler import GPUTarget

    log = io.StringIO()
    saved = {k: os.environ.get(k) for k in ("TRITON_DUMP_PTXAS_LOG", "TRITON_ALWAYS_COMPILE")}
    os.environ.update({k: "1" for k in saved})
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(make_ast_source(spec), target=GPUTarget("cuda", cc, 32),
                                      options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    text = log.getvalue()
    if not parse_ptxas_verbose(text):
        text = ptxas_verbose(compiled.asm["ptx"], cc)
    return compiled, text


def compile_spec(spec: dict, cc: int, cache_dir: Optional[str] = None) -> Build:
    """Compile one spec for compute capability ``cc`` (from ``cache_dir`` when it holds the build)."""
    import triton

    build = Build(spec.get("name", "<unnamed>"), cc, triton.__version__)
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        build.error = f"FAIL: spec lacks {missing}"
        return build
    if not hasattr(spec["fn"], "arg_names") or type(spec["fn"]).__name__ == "InterpretedFunction":
        build.error = "FAIL: kernel defined under TRITON_INTERPRET=1; run without it"
        return build
    path = os.path.join(cache_dir, spec_key(spec, cc)) if cache_dir else None
    if path and os.path.exists(path + ".json") and os.path.exists(path + ".cubin"):
        with open(path + ".json") as f, open(path + ".cubin", "rb") as c:
            return Build(**json.load(f), cubin=c.read())
    try:
        compiled, log = _compile(spec, cc)
        records = parse_ptxas_verbose(log)
    except Exception as e:  # a compile error is this kernel's failure, reported in the table
        where = traceback.extract_tb(e.__traceback__)[-1]
        msg = " ".join(str(e).split())[:160]
        build.error = f"FAIL: {type(e).__name__} ({os.path.basename(where.filename)}:{where.lineno}): {msg}"
        return build
    if not records:
        build.error = "FAIL: no ptxas report"
        return build
    build.record = records[0]
    build.smem = getattr(compiled.metadata, "shared", None)
    build.tensor_core = tensor_core_instr(compiled.asm["ptx"])
    build.cubin = compiled.asm.get("cubin")
    if path and build.cubin:
        os.makedirs(cache_dir, exist_ok=True)
        fields = {k: v for k, v in asdict(build).items() if k != "cubin"}
        for suffix, mode, data in ((".cubin", "wb", build.cubin), (".json", "w", json.dumps(fields))):
            tmp = f"{path}{suffix}.{os.getpid()}.tmp"
            with open(tmp, mode) as f:
                f.write(data)
            os.replace(tmp, path + suffix)  # the .json last: it marks the entry whole
    return build


def judge(spec: dict, build: Build) -> Row:
    """The table row of a build: its failure, spills, or a GEMM (spec["mma"]) without tensor cores."""
    cc = build.cc
    if build.error:
        return Row(build.name, f"sm_{cc}", status=build.error)
    rec, instr = build.record, build.tensor_core
    row = Row(build.name, rec["arch"], rec["regs"], build.smem, rec["spill_stores"], rec["spill_loads"],
              instr or "none", spill_status(rec))
    if spec["mma"] and instr is None and not row.failed:
        row.status = "FAIL: no tensor-core instruction"
    elif spec["mma"] and cc >= 90 and instr == "mma.sync" and not row.failed:
        row.status = "ok (mma.sync, no wgmma)"
    return row


def check_triton_spec(spec: dict, cc: int, cache_dir: Optional[str] = None) -> Row:
    """Compile one spec for compute capability ``cc`` and judge it."""
    return judge(spec, compile_spec(spec, cc, cache_dir))


def spec_at(module_name: str, index: int) -> dict:
    """Spec ``index`` of ``module_name``.aot_specs() (what a worker process compiles)."""
    return importlib.import_module(module_name).aot_specs()[index]


def _check_spec_at(module_name: str, index: int, cc: int, cache_dir: Optional[str]) -> Row:
    return check_triton_spec(spec_at(module_name, index), cc, cache_dir)


def spec_tasks(module_names=None) -> tuple:
    """([(module, index)] of every aot spec, lines naming the modules without Triton kernels)."""
    tasks, notes = [], []
    for module, specs in collect_specs(module_names):
        if specs is None:
            notes.append(f"{module}: no Triton kernels")
        elif not specs:
            notes.append(f"{module}: aot_specs() is empty")
        tasks += [(module, i) for i in range(len(specs or ()))]
    return tasks, notes


def parallel_map(worker: Callable, tasks: list, jobs: int) -> list:
    """[worker(*task)] in task order, ``jobs`` processes at a time (fork: the workers inherit the
    imported kernels; each task is a CPU-bound compile + ptxas)."""
    if jobs > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(worker, *zip(*tasks)))
    return [worker(*task) for task in tasks]


def check_triton(archs=ARCHS, module_names=None, jobs=1, cache_dir=None) -> tuple:
    """(rows, lines naming the modules without Triton kernels); ``jobs`` compile in parallel."""
    specs, notes = spec_tasks(module_names)
    tasks = [(module, i, cc, cache_dir) for module, i in specs for cc in archs]
    return parallel_map(_check_spec_at, tasks, jobs), notes


# ---- (c) report -----------------------------------------------------------------------------------
def format_table(rows) -> str:
    def cell(v):
        return "-" if v is None else str(v)

    header = ("kernel", "arch", "regs", "smem", "spills (st/ld B)", "tensor-core", "status")
    body = [(r.kernel, r.arch, cell(r.regs), cell(r.smem),
             "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}", r.tensor_core, r.status)
            for r in rows]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(x[i].ljust(widths[i]) for i in range(len(header))).rstrip() for x in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def rerun_without_interpreter(module: str, argv=None) -> int:
    """Kernels imported under TRITON_INTERPRET=1 cannot be compiled: run ``module`` again without it."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    argv = sys.argv[1:] if argv is None else list(argv)
    return subprocess.run([sys.executable, "-m", module, *argv], env=env).returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (80 90)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the csrc/*.cu checks")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton checks")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel Triton compiles")
    parser.add_argument("--specs-from", nargs="+", metavar="MODULE",
                        help="take aot_specs() from these modules instead of the registered ops'")
    parser.add_argument("--cache", metavar="DIR", help="keep / reuse Triton builds here (see the docstring)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        return rerun_without_interpreter("unispeech_kernels.check_kernels", argv)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # nothing is reused across runs
        if args.no_cuda:
            print("SKIPPED CUDA sources: --no-cuda")
        else:
            cuda_rows, skipped = check_cuda_sources(args.arch)
            if skipped:
                print(skipped)
            rows += cuda_rows
        if args.no_triton:
            print("SKIPPED Triton kernels: --no-triton")
        else:
            cache_dir = os.path.abspath(args.cache) if args.cache else None
            triton_rows, notes = check_triton(args.arch, args.specs_from, args.jobs, cache_dir)
            for note in notes:
                print(note)
            rows += triton_rows
    print(format_table(rows))
    failed = [r for r in rows if r.failed]
    print(f"check_kernels: {len(rows)} kernel builds, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""SASS of a compiled kernel, read without a GPU: disassembly with the ``nvdisasm`` Triton ships, its
loops, and what one iteration of each loop issues.

A loop is a backward branch: ``BRA`` at offset b to a label at offset h <= b; its body is every
instruction in [h, b]. Branches to one label form one loop (the farthest branch closes it); a loop
inside another one's range is nested in it, and a loop's *own* instructions are those of its body
outside the loops nested in it. Self-branches (``.L: BRA .L``, the trap after EXIT) are not loops.
The *main loop* is the one whose own body holds the most tensor-core instructions, ties (and kernels
without any) going to the one with the most own instructions: the GEMM's K loop, the key loop of
attention, the tile loop of a reduction.

Per loop (own body) it counts, per warp and per iteration: instructions, tensor-core instructions
(HMMA = mma.sync, HGMMA = wgmma) and the FLOPs each warp's share of them does (an HGMMA m64nNk16 is
one instruction of a 4-warp group: each warp is credited a quarter of 2 * 64 * N * 16), global loads
(LDG, LDGSTS = cp.async, UTMALDG/UBLKCP = TMA) and the bytes they request (width x 32 lanes; TMA
copies' sizes are not in the instruction and count 0), global stores and atomics (STG, RED, ATOM,
UTMASTG), shared-memory loads / stores (LDS, LDSM, STS, STSM), local-memory traffic (LDL / STL: spills)
and barriers (BAR.*: __syncthreads, tl.debug_barrier and the pipeline's block-wide waits).
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Optional

_INSTR = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:\{\s*)?(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)([^;]*);")
_LABEL = re.compile(r"^\s*(\.L[\w.]+):")
_TARGET = re.compile(r"`\((\.L[\w.]+)\)")
_HGMMA_SHAPE = re.compile(r"^(\d+)x(\d+)x(\d+)$")
_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "16832": (16, 8, 32), "884": (8, 8, 4)}
_WIDTHS = {"128": 16, "64": 8, "32": 4, "U8": 1, "S8": 1, "U16": 2, "S16": 2}

GLOBAL_LOADS = ("LDG", "LDGSTS", "UTMALDG", "UBLKCP")
GLOBAL_STORES = ("STG", "RED", "REDG", "ATOM", "ATOMG", "UTMASTG")
SHARED_LOADS = ("LDS", "LDSM")
SHARED_STORES = ("STS", "STSM")


@dataclass
class Instr:
    offset: int
    opcode: str  # with its modifiers: "HGMMA.64x128x16.F32.BF16"
    operands: str
    target: Optional[str] = None  # branch target label

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


@dataclass
class LoopStats:
    """What one iteration of a loop's own body issues, per warp."""
    head: int  # offset of the first instruction
    tail: int  # offset of the backward branch
    depth: int  # 0 outermost
    instructions: int = 0
    mma: int = 0
    mma_flops: float = 0.0  # tensor FLOPs of this warp's share of the mma instructions
    global_loads: int = 0
    global_load_bytes: int = 0  # requested by all 32 lanes
    global_stores: int = 0
    shared_loads: int = 0
    shared_stores: int = 0
    local: int = 0  # LDL / STL
    barriers: int = 0


@dataclass
class SassStats:
    instructions: int  # in the kernel
    outside_loops: int  # instructions in no loop: prologue, epilogue, early exits (issued once)
    loops: list = field(default_factory=list)  # LoopStats, in code order
    main: Optional[int] = None  # index of the main loop in ``loops``
    mma_kind: Optional[str] = None  # "wgmma" (HGMMA), "mma.sync" (HMMA) or None

    def main_loop(self) -> Optional[LoopStats]:
        return None if self.main is None else self.loops[self.main]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "SassStats":
        return cls(**dict(d, loops=[LoopStats(**loop) for loop in d["loops"]]))


def nvdisasm_path() -> str:
    """The nvdisasm bundled with this interpreter's Triton (triton/backends/nvidia/bin)."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.path.exists(path):
        raise RuntimeError(f"no nvdisasm at {path}")
    return path


def disassemble(cubin: bytes, cache_dir: Optional[str] = None) -> str:
    """nvdisasm -c of a cubin; kept in ``cache_dir`` (when given) under the cubin's hash."""
    path = os.path.join(cache_dir, hashlib.sha256(cubin).hexdigest()[:32] + ".sass") if cache_dir else None
    if path and os.path.exists(path):
        with open(path) as f:
            return f.read()
    with tempfile.TemporaryDirectory() as tmp:
        binary = os.path.join(tmp, "kernel.cubin")
        with open(binary, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([nvdisasm_path(), "-c", binary], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {proc.stderr.strip()[-300:]}")
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        with open(f"{path}.{os.getpid()}.tmp", "w") as f:
            f.write(proc.stdout)
        os.replace(f"{path}.{os.getpid()}.tmp", path)
    return proc.stdout


def parse_sass(text: str) -> tuple:
    """(instructions in code order, {label: offset of the instruction it labels})."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.search(line)
        if not m:
            continue
        target = _TARGET.search(m.group(4))
        instr = Instr(int(m.group(1), 16), m.group(3), m.group(4).strip(), target.group(1) if target else None)
        for label in pending:
            labels[label] = instr.offset
        pending = []
        instrs.append(instr)
    return instrs, labels


def find_loops(instrs: list, labels: dict) -> list:
    """[(head, tail, depth)] of every loop, in code order (see the module docstring)."""
    tails = {}
    for ins in instrs:
        if ins.base in ("BRA", "JMP") and ins.target in labels:
            head = labels[ins.target]
            if head < ins.offset:
                tails[head] = max(tails.get(head, head), ins.offset)
    spans = sorted(tails.items())
    return [(h, t, sum(1 for h2, t2 in spans if (h2, t2) != (h, t) and h2 <= h and t <= t2)) for h, t in spans]


def _mma_flops(ins: Instr) -> float:
    parts = ins.opcode.split(".")
    if ins.base == "HGMMA":
        m = _HGMMA_SHAPE.match(parts[1]) if len(parts) > 1 else None
        return 2.0 * int(m.group(1)) * int(m.group(2)) * int(m.group(3)) / 4 if m else 0.0
    mnk = _HMMA_SHAPES.get(parts[1]) if len(parts) > 1 else None
    return 2.0 * mnk[0] * mnk[1] * mnk[2] if mnk else 0.0


def load_width(opcode: str) -> int:
    """Bytes per lane of a load / store: its .128 / .64 / .U8 ... modifier, 4 without one."""
    for part in reversed(opcode.split(".")[1:]):
        if part in _WIDTHS:
            return _WIDTHS[part]
    return 4


def count(instrs: list, stats: LoopStats) -> LoopStats:
    for ins in instrs:
        base = ins.base
        stats.instructions += 1
        if base in ("HMMA", "HGMMA"):
            stats.mma += 1
            stats.mma_flops += _mma_flops(ins)
        elif base in GLOBAL_LOADS:
            stats.global_loads += 1
            stats.global_load_bytes += 32 * load_width(ins.opcode) if base in ("LDG", "LDGSTS") else 0
        elif base in GLOBAL_STORES:
            stats.global_stores += 1
        elif base in SHARED_LOADS:
            stats.shared_loads += 1
        elif base in SHARED_STORES:
            stats.shared_stores += 1
        elif base in ("LDL", "STL"):
            stats.local += 1
        elif base == "BAR":
            stats.barriers += 1
    return stats


def analyse(text: str) -> SassStats:
    """Loop statistics of a disassembly (nvdisasm -c output of a one-kernel cubin)."""
    instrs, labels = parse_sass(text)
    spans = find_loops(instrs, labels)
    loops = []
    for head, tail, depth in spans:
        inner = [(h, t) for h, t, d in spans if d > depth and head <= h and t <= tail]
        own = [i for i in instrs if head <= i.offset <= tail and not any(h <= i.offset <= t for h, t in inner)]
        loops.append(count(own, LoopStats(head, tail, depth)))
    outside = [i for i in instrs if not any(h <= i.offset <= t for h, t, _ in spans)]
    kinds = {i.base for i in instrs}
    stats = SassStats(len(instrs), len(outside), loops,
                      mma_kind="wgmma" if "HGMMA" in kinds else "mma.sync" if "HMMA" in kinds else None)
    if loops:
        stats.main = max(range(len(loops)), key=lambda i: (loops[i].mma, loops[i].instructions))
    return stats

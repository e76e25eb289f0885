"""What the benchmark harness needs from a device, per device: its clock, synchronisation, peak memory,
CUDA graphs and the SDPA backend a call ran; and a dry runtime that runs nothing and charges estimates.

A runtime gives the harness (bench/harness.py):
- ``knobs``: the timing knobs of its device type (cases.TIMING);
- ``now()``: host seconds for sizing rounds and the time budget;
- ``mark()`` / ``seconds(start, end)``: the clock timed rounds are read with. CUDA: events recorded on
  the current stream, so a round is the device's time from its first launch to the end of its last
  kernel, gaps where the GPU waited for the host included (what eager code costs) and the host's
  synchronisation after it excluded; CPU: the host clock (the calls are synchronous);
- ``sync()``; ``peak_memory_mb(call)`` and ``sdpa_backend(call)``: one call's extra memory at its peak,
  the SDPA backends it ran (read from the profiler's aten op names, which does not change the call:
  patching SDPA instead would make compiled code trace again);
- ``capture(fn, input_sets)``: a callable replaying one CUDA graph per input set, or GraphUnavailable
  saying why the op cannot be captured.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the call minus what was allocated
before it (inputs, weights and the other input sets excluded); on CPU the growth of the process's
peak resident set (VmHWM, reset through /proc/self/clear_refs before the call) over the resident set
before it (after malloc_trim, so pages freed by earlier cases do not hide this call's growth) --
tracemalloc does not see torch's allocations. Where the reset is refused, ru_maxrss growth is used,
which reads 0 when an earlier case peaked higher.
"""
from __future__ import annotations

import ctypes
import resource
import time
from typing import Callable, Optional, Sequence

import torch

from .cases import TIMING

# aten ops SDPA dispatches to (forward and backward), by torch.nn.attention.SDPBackend name
SDPA_OPS = (("cudnn", "CUDNN_ATTENTION"), ("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
            ("math", "MATH"), ("overrideable", "OVERRIDEABLE"))


class GraphUnavailable(RuntimeError):
    """The op cannot be timed as a CUDA graph; the message says why."""


def sdpa_backends(op_names) -> Optional[str]:
    """"EFFICIENT_ATTENTION", "FLASH_ATTENTION+MATH", ... from profiled aten op names; None: no SDPA."""
    found = set()
    for name in op_names:
        if name.startswith("aten::_scaled_dot_product_"):
            found.update(backend for key, backend in SDPA_OPS if key in name)
    return "+".join(sorted(found)) or None


def profiled_call(call: Callable[[], object]) -> Optional[str]:
    """Run ``call`` once under the profiler (host events only) and return the SDPA backends it ran.
    Observes without changing the call: compiled code is not re-traced, as patching SDPA would."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = call()
    del out
    return sdpa_backends({event.name for event in prof.events()})


def _proc_status_mb(key: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS so the resident set before a call is its live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class CpuRuntime:
    name, timer = "cpu", "host clock"
    measures_first_call = True  # a CPU forward takes seconds: the warm-up call's memory is measured

    @property
    def knobs(self) -> dict:
        return TIMING[self.name]

    def now(self) -> float:
        return time.perf_counter()

    def mark(self):
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        return end - start

    def sync(self) -> None:
        pass

    def peak_memory_mb(self, call: Callable[[], object]) -> Optional[float]:
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            before = _proc_status_mb("VmRSS")
            out = call()
            peak = _proc_status_mb("VmHWM")
            del out
            if before is not None and peak is not None:
                return max(0.0, peak - before)
        except OSError:
            pass
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        out = call()
        del out
        return max(0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - before)

    def sdpa_backend(self, call: Callable[[], object]) -> Optional[str]:
        return profiled_call(call)

    def capture(self, fn: Callable, input_sets: Sequence[tuple]) -> Callable[[], None]:
        raise GraphUnavailable("CUDA graphs need a CUDA device")


class CudaRuntime(CpuRuntime):
    name, timer = "cuda", "CUDA events"
    measures_first_call = False  # the first call compiles and autotunes

    def mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def sync(self) -> None:
        torch.cuda.synchronize()

    def peak_memory_mb(self, call: Callable[[], object]) -> Optional[float]:
        self.sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = call()
        self.sync()
        del out
        return (torch.cuda.max_memory_allocated() - before) / 2**20

    def capture(self, fn: Callable, input_sets: Sequence[tuple]) -> Callable[[], None]:
        """Capture fn(*s) for every input set into CUDA graphs sharing one memory pool (replayed in
        the order captured, never concurrently, as sharing requires). A call that synchronises with
        the host cannot be captured: it is run once under torch's sync debug mode first, so such an
        op is reported without a capture being attempted."""
        self.sync()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn(*input_sets[0])
        except RuntimeError as e:
            raise GraphUnavailable(f"not capturable, the call synchronises with the host: {first_line(e)}") from e
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
            fn(*input_sets[0])
        torch.cuda.current_stream().wait_stream(side)
        graphs, pool = [], None
        for inputs in input_sets:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                fn(*inputs)
            pool = graph.pool()
            graphs.append(graph)

        def replay():
            for graph in graphs:
                graph.replay()

        return replay


class DryRuntime(CpuRuntime):
    """Nothing runs on a device: a fake clock advances by each case's estimate (bench/estimates.py)
    where the GPU would spend it, with a GPU's timing knobs, so the harness's own logic (sizing,
    rounds, graphs, the time budget) runs as on the GPU. ``clock_file`` holds the check's fake time
    (seconds since it started), read at start and written back as it advances, which is how the dry
    run of bench/gpu_check.py shares one clock between its steps (none: a clock from 0)."""
    name, timer = "cuda", "dry run (estimates)"
    measures_first_call = False

    def __init__(self, clock_file: Optional[str] = None):
        self.clock_file = clock_file
        self.t = 0.0
        if clock_file:
            with open(clock_file) as f:
                self.t = float(f.read() or 0.0)

    def advance(self, seconds: float) -> None:
        self.t += seconds
        if self.clock_file:
            with open(self.clock_file, "w") as f:
                f.write(repr(self.t))

    def now(self) -> float:
        return self.t

    def mark(self):
        return self.t

    def peak_memory_mb(self, call: Callable[[], object]) -> Optional[float]:
        call()
        return None

    def sdpa_backend(self, call: Callable[[], object]) -> Optional[str]:
        call()
        return None

    def op(self, first_s: float, round_s: float) -> Callable[[], None]:
        """A stand-in for a case: its first call costs ``first_s`` more (compile, autotune, models),
        every call ``round_s`` (the harness calls it once per round: one input set)."""
        calls = []

        def call():
            self.advance(round_s + (first_s if not calls else 0.0))
            calls.append(1)

        return call

    def capture(self, fn: Callable, input_sets: Sequence[tuple]) -> Callable[[], None]:
        for _ in range(2 + len(input_sets)):  # the sync probe, the warm-up, one capture per set
            fn(*input_sets[0])
        return lambda: fn(*input_sets[0])


def first_line(error: BaseException) -> str:
    """"TypeName: first line of the message", as error rows give it."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


RUNTIMES = {"cpu": CpuRuntime, "cuda": CudaRuntime}

"""The benchmark harness's clocks, CUDA graphs and SDPA probe on a CPU machine: the GPU-only branches
of bench/runtime.py run against stand-ins for CUDA events, streams and graphs; the harness's own logic
(rounds, graphs beside the eager time, the reasons rows give, waiting for the extension build) runs
against the dry runtime's fake clock, so every charged phase is counted."""
import contextlib
import os
import threading

import pytest
import torch
import torch.nn.functional as F

from bench import harness, runtime
from bench.harness import Case, Recorder, time_rounds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _case(impl="triton", op="attention_fwd"):
    return Case(op, impl, torch.float32, "tiny", {"batch": 2})


class FakeBenchmark:
    """pytest-benchmark's fixture as the harness uses it, for several cases in one test."""

    def __init__(self):
        self.group, self.extra_info, self.stats = None, {}, None

    def pedantic(self, target, setup, rounds):
        for _ in range(rounds):
            setup()
            target()
        self.stats = rounds


class FakeEvent:
    """torch.cuda.Event on a fake device timeline (milliseconds)."""
    now_ms = 0.0

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.at, self.synced = None, False

    def record(self):
        self.at = FakeEvent.now_ms

    def synchronize(self):
        self.synced = True

    def elapsed_time(self, end):
        assert end.synced, "read before the end event completed"
        return end.at - self.at


def test_time_rounds_reads_the_runtime_clock_around_each_round():
    rt = runtime.DryRuntime()
    synced = []
    rt.sync = lambda: synced.append(rt.now())
    call = rt.op(first_s=0.0, round_s=0.25)
    assert time_rounds(call, 3, rt) == [0.25, 0.25, 0.25]
    assert len(synced) == 4  # before every round, and once at the end
    driven = []
    assert time_rounds(call, 2, rt, drive=lambda one_round, n: driven.append(n) or [one_round() for _ in range(n)]) \
        == [0.25, 0.25] and driven == [2]
    assert harness.per_call_ms([0.004, 0.002, 0.006], 2) == pytest.approx((2.0, 1.4, 2.6))


def test_cuda_runtime_times_with_events(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    rt = runtime.CudaRuntime()
    FakeEvent.now_ms = 10.0
    start = rt.mark()
    FakeEvent.now_ms = 12.5  # the device ran 2.5 ms of work between the marks
    end = rt.mark()
    assert rt.seconds(start, end) == pytest.approx(2.5e-3) and end.synced
    assert rt.knobs is harness.TIMING["cuda"] and not rt.measures_first_call


class FakeCuda:
    """torch.cuda's stream, sync-debug and graph API, recording what the capture does."""

    def __init__(self, monkeypatch):
        self.mode, self.capturing, self.graphs, self.log = "default", False, [], []
        fake = self

        class Graph:
            def __init__(self):
                self.pool_given, self.replayed = None, 0
                fake.graphs.append(self)

            def pool(self):
                return ("pool of", fake.graphs.index(self))

            def replay(self):
                self.replayed += 1
                fake.log.append(("replay", fake.graphs.index(self)))

        @contextlib.contextmanager
        def graph(g, pool=None):
            g.pool_given, self.capturing = pool, True
            yield
            self.capturing = False

        class Stream:
            def wait_stream(self, other):
                pass

        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
        monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: self.mode)
        monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: setattr(self, "mode", mode))
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", graph)


def test_cuda_graph_capture_one_graph_per_input_set(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    calls = []

    def fn(x):
        calls.append((x, cuda.mode, cuda.capturing))

    replay = runtime.CudaRuntime().capture(fn, [("a",), ("b",), ("c",)])
    # the sync probe under torch's "error" mode, the side-stream warm-up, then one capture per set
    assert calls == [("a", "error", False), ("a", "default", False), ("a", "default", True),
                     ("b", "default", True), ("c", "default", True)]
    assert cuda.mode == "default"
    assert [g.pool_given for g in cuda.graphs] == [None, ("pool of", 0), ("pool of", 1)]  # one shared pool
    replay()
    assert cuda.log == [("replay", 0), ("replay", 1), ("replay", 2)]  # in the order captured


def test_cuda_graph_capture_refuses_a_call_that_syncs(monkeypatch):
    cuda = FakeCuda(monkeypatch)

    def fn(x):
        if cuda.mode == "error":
            raise RuntimeError("called a synchronizing CUDA operation\nmore text")

    with pytest.raises(runtime.GraphUnavailable, match="^not capturable, the call synchronises with the host: "
                                                       "RuntimeError: called a synchronizing CUDA operation$"):
        runtime.CudaRuntime().capture(fn, [(1,)])
    assert cuda.mode == "default" and cuda.graphs == []  # restored, and no capture was attempted


def test_recorder_charges_every_phase_and_records_the_graph_time(benchmark):
    """With the dry runtime each call costs its round: the row's time is the round, the graph time
    beside it, and the fake clock has advanced by exactly the phases the harness runs."""
    rt = runtime.DryRuntime()
    rec = Recorder(ROOT, None, 1, runtime=rt)
    rec.run(benchmark, _case(), rt.op(first_s=1.0, round_s=0.002), [()], torch.device("cpu"))
    (row,) = rec.rows
    assert row["median_ms"] == pytest.approx(2.0) and row["graph_median_ms"] == pytest.approx(2.0)
    assert row["rounds"] == 100 and row["timer"] == "dry run (estimates)" and row["sdpa_backend"] is None
    # first call + sizing round + 2 warm-ups + 100 rounds + memory + SDPA probe + capture (3) + 100 replays
    assert rec.elapsed() == pytest.approx(1.0 + 0.002 * (1 + 1 + 2 + 100 + 1 + 1 + 3 + 100))


def test_recorder_budget_and_a_failed_capture():
    class Failing(runtime.DryRuntime):
        def capture(self, fn, input_sets):
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    rt = Failing()
    rec = Recorder(ROOT, 0.5, 2, runtime=rt)
    rec.run(FakeBenchmark(), _case("sdpa"), rt.op(first_s=1.0, round_s=0.001), [()], torch.device("cpu"))
    assert rec.rows[0]["median_ms"] == pytest.approx(1.0) and rec.rows[0]["graph_median_ms"] is None
    assert rec.rows[0]["graph_error"] == ("capture failed: RuntimeError: CUDA error: operation not permitted when "
                                          "stream is capturing")
    with pytest.raises(pytest.skip.Exception):  # the 1 s first call used up the 0.5 s budget
        rec.run(FakeBenchmark(), _case("triton"), rt.op(0.0, 0.001), [()], torch.device("cpu"))
    assert rec.rows[1]["error"] == "skipped: time budget of 0 s used up"


def test_sdpa_backend_names_from_profiled_ops():
    assert runtime.sdpa_backends(["aten::_scaled_dot_product_efficient_attention", "aten::mm",
                                  "aten::_scaled_dot_product_efficient_attention_backward"]) == "EFFICIENT_ATTENTION"
    assert runtime.sdpa_backends(["aten::_scaled_dot_product_cudnn_attention",
                                  "aten::_scaled_dot_product_attention_math"]) == "CUDNN_ATTENTION+MATH"
    assert runtime.sdpa_backends(["aten::_scaled_dot_product_flash_attention_for_cpu"]) == "FLASH_ATTENTION"
    assert runtime.sdpa_backends(["aten::scaled_dot_product_attention", "aten::softmax"]) is None


def test_cpu_rows_name_the_sdpa_backend_and_why_there_is_no_graph(benchmark):
    """What ran, read from the call itself: SDPA's CPU kernel for an SDPA call, nothing for a matmul."""
    q = torch.randn(2, 2, 16, 8)
    mask = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    assert runtime.CpuRuntime().sdpa_backend(lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=mask)) \
        in {"FLASH_ATTENTION", "MATH"}
    rec = Recorder(ROOT, None, 1)
    rec.run(benchmark, _case("torch"), torch.mm, [(torch.randn(8, 8), torch.randn(8, 8))], torch.device("cpu"))
    (row,) = rec.rows
    assert row["sdpa_backend"] is None and row["timer"] == "host clock"
    assert row["graph_median_ms"] is None and row["graph_error"] == "CUDA graphs need a CUDA device"


def test_extension_rows_wait_for_the_background_build(tmp_path, monkeypatch):
    """The first "cuda" row waits until the build's return code is written, then the loader forgets
    its earlier "not built"; other rows never wait."""
    from unispeech_kernels import _cuda
    cleared = []
    monkeypatch.setattr(_cuda.load, "cache_clear", lambda: cleared.append(True))
    rc = tmp_path / "build.rc"
    writer = threading.Timer(0.2, lambda: rc.write_text("0"))
    writer.start()
    harness.await_extension_build(str(rc), timeout_s=30, poll_s=0.02)
    writer.join()
    assert rc.exists() and cleared == [True]
    waits = []
    rt = runtime.DryRuntime()
    rec = Recorder(ROOT, None, 3, runtime=rt, extension_ready=lambda: waits.append(rec.done))
    for impl in ("triton", "cuda", "cuda"):
        rec.run(FakeBenchmark(), _case(impl, "first_conv_layer_fwd"), rt.op(0.0, 0.001), [()], torch.device("cpu"))
    assert waits == [1]

"""The static performance model's pieces: the SASS loop parser (a hand-made listing and one real
compiled kernel), occupancy, the roofline arithmetic, the op aggregation, the JSON / markdown writers,
--compare and --fit. The full model run belongs to `make check-kernels`, not here."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from unispeech_kernels import check_kernels as ck
from unispeech_kernels import perf_model as pm
from unispeech_kernels import perf_report, perf_workloads
from unispeech_kernels import sass

# a kernel with an outer loop around an inner one (wgmma, cp.async, a barrier), a second loop
# (mma.sync, plain loads, a store, shared traffic), a spin loop of 2 instructions and the trap self-branch
LISTING = """\
//--------------------- .text.k --------------------------
k:
.text.k:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_CTAID.X ;
.L_x_0:
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;
.L_x_1:
        /*0030*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3], desc[UR4][R4.64] ;
        /*0040*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3+0x800], desc[UR4][R6.64] ;
        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0060*/                   WARPGROUP.ARRIVE ;
        /*0070*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24 ;
        /*0080*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24, gsb0 ;
        /*0090*/               @P0 BRA `(.L_x_1) ;
        /*00a0*/                   ISETP.GE.AND P1, PT, R2, 0x4, PT ;
        /*00b0*/              @!P1 BRA `(.L_x_0) ;
.L_x_2:
        /*00c0*/                   LDG.E.U8 R8, desc[UR4][R10.64] ;
        /*00d0*/                   LDG.E R9, desc[UR4][R12.64] ;
        /*00e0*/                   LDSM.16.M88.4 R12, [R13] ;
        /*00f0*/                   STS [R14], R9 ;
        /*0100*/                   HMMA.16816.F32.BF16 R16, R12, R18, R16 ;
        /*0110*/                   STG.E.64 desc[UR4][R20.64], R16 ;
        /*0120*/                   LDL R30, [R1] ;
        /*0130*/               @P2 BRA `(.L_x_2) ;
.L_x_3:
        /*0140*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P3, [UR4], R5 ;
        /*0150*/              @!P3 BRA `(.L_x_3) ;
        /*0160*/                   EXIT ;
.L_x_4:
        /*0170*/                   BRA `(.L_x_4);
"""


def test_sass_loops_on_a_listing():
    instrs, labels = sass.parse_sass(LISTING)
    assert len(instrs) == 24 and labels == {".L_x_0": 0x20, ".L_x_1": 0x30, ".L_x_2": 0xc0, ".L_x_3": 0x140,
                                            ".L_x_4": 0x170}
    assert instrs[7].opcode == "HGMMA.64x128x16.F32.BF16" and instrs[9].target == ".L_x_1"
    assert sass.find_loops(instrs, labels) == [(0x20, 0xb0, 0), (0x30, 0x90, 1), (0xc0, 0x130, 0),
                                               (0x140, 0x150, 0)]
    stats = sass.analyse(LISTING)
    outer, inner, second, spin = stats.loops
    assert (stats.instructions, stats.outside_loops, stats.main, stats.mma_kind) == (24, 4, 1, "wgmma")
    assert (outer.instructions, outer.mma, outer.depth) == (3, 0, 0)  # its own body: not the inner loop's
    assert (inner.instructions, inner.mma, inner.barriers, inner.global_loads, inner.global_load_bytes) == \
        (7, 2, 1, 2, 2 * 16 * 32)
    assert inner.mma_flops == 2 * (2 * 64 * 128 * 16) / 4  # one warp's share of two warpgroup HGMMAs
    assert (second.instructions, second.mma, second.mma_flops, second.global_loads, second.global_load_bytes,
            second.global_stores, second.shared_loads, second.shared_stores, second.local) == \
        (8, 1, 2 * 16 * 8 * 16, 2, 32 * (1 + 4), 1, 1, 1, 1)
    assert spin.instructions == 2 and spin.mma == 0
    assert sass.SassStats.from_json(json.loads(json.dumps(stats.to_json()))) == stats


def test_sass_main_loop_without_mma_is_the_largest():
    stats = sass.analyse(LISTING.replace("HGMMA", "FFMA").replace("HMMA", "FFMA"))
    assert stats.mma_kind is None and stats.main == 2  # 8 instructions beat 7


def test_load_width():
    assert [sass.load_width(op) for op in ("LDG.E.128", "LDG.E.64", "LDG.E", "LDG.E.U8", "LDG.E.S16",
                                           "LDGSTS.E.BYPASS.LTC128B.128")] == [16, 8, 4, 1, 2, 16]


@pytest.mark.parametrize("regs,smem,warps,expected", [
    (128, 0, 8, (2, "registers")),  # 4096 regs a warp: 4 warps per scheduler quarter, 16 warps
    (255, 0, 4, (2, "registers")),  # 8160 -> 8192 a warp: 2 per quarter
    (168, 0, 8, (1, "registers")),  # 5376 a warp: 3 per quarter = 12 warps, one 8-warp block
    (64, 131072, 4, (1, "smem")),  # 128 KB + 1 KB reserved of 228 KB
    (64, 65000, 4, (3, "smem")),  # rounded up to 65024 + 1024 per block
    (32, 0, 4, (16, "warps")),  # 64 / 4 warps (the registers would allow 16 too)
    (40, 0, 1, (32, "blocks")),
])
def test_occupancy(regs, smem, warps, expected):
    assert pm.occupancy(regs, smem, warps, pm.device("H100")) == expected


DEVICE = dict(name="test", sms=132, schedulers=4, tensor_tflops=1000.0, measured_tflops=800.0, tbps=2.0)
K = pm.Constants(clock_hz=1e9, issue_per_clock=1.0, warps_per_scheduler=2.0, mma_efficiency_wgmma=0.8,
                 mma_efficiency_mma_sync=0.5, dram_efficiency=1.0, l2_tbps=10.0, launch_us=3.0)


def _build(blocks_per_sm=2, instructions=100, outside=50, kind="wgmma", status="ok"):
    loop = sass.LoopStats(head=0, tail=0x100, depth=0, instructions=instructions, mma=2, mma_flops=8192.0,
                          global_loads=1, global_load_bytes=4096)
    stats = sass.SassStats(instructions + outside, outside, [loop], main=0, mma_kind=kind)
    return {"name": "k", "kernel": "_k", "num_warps": 4, "num_stages": 2, "status": status, "regs": 96,
            "smem": 16384, "spill_stores": 0, "spill_loads": 0, "tensor_core": kind, "sass": stats.to_json(),
            "blocks_per_sm": blocks_per_sm, "occupancy_limit": "registers"}


def _launch(work_blocks=264, trips=2640, nbytes=1e6, flops=1e9):
    return dict(op="op", part="main", model="base", seconds=10, shape="base 10s", blocks=work_blocks,
                work_blocks=work_blocks, trips=trips, outer_trips=1, flops=flops, nbytes=nbytes, op_flops=flops,
                op_bytes=nbytes)


def test_predict_arithmetic():
    p = pm.predict(_build(), _launch(), DEVICE, K)
    terms = p["terms"]
    # 264 programs on 132 SMs: 2 each, 2 x 4 = 8 warps resident = 2 per scheduler: full issue rate
    assert terms["issue"] == pytest.approx((50 * 264 + 100 * 2640) * 4 / (132 * 4 * 1e9) * 1e6, rel=1e-3)
    assert terms["mma"] == pytest.approx(8192 * 2640 * 4 / (1000e12 * 0.8) * 1e6, rel=1e-3)
    assert terms["dram"] == pytest.approx(1e6 / 2e12 * 1e6, rel=1e-3)
    assert terms["l2"] == pytest.approx(4096 * 2640 * 4 / 10e12 * 1e6, rel=1e-3)
    assert p["bound"] == "l2" and p["time_us"] == pytest.approx(terms["l2"] + 3.0, rel=1e-3)
    assert terms["launch"] == 3.0


def test_predict_partial_waves_and_latency():
    # 133 programs: one SM runs 2, the rest 1 (busiest share 2 / (133 / 132)); 1 block x 4 warps
    # resident = half the warps a full issue rate needs; mma.sync at its own efficiency
    p = pm.predict(_build(blocks_per_sm=1, kind="mma.sync"), _launch(work_blocks=133, trips=1330), DEVICE, K)
    busiest = 2 / (133 / 132)
    assert p["terms"]["issue"] == pytest.approx((50 * 133 + 100 * 1330) * 4 * busiest / (132 * 4 * 1e9 * 0.5) * 1e6,
                                                rel=1e-3)
    assert p["terms"]["mma"] == pytest.approx(8192 * 1330 * 4 * busiest / (1000e12 * 0.5) * 1e6, rel=1e-3)


def test_kernel_time_scales():
    terms = {"issue": 10.0, "mma": 20.0, "dram": 5.0, "l2": 1.0, "launch": 3.0}
    assert pm.kernel_time(terms) == (23.0, "mma")
    assert pm.kernel_time(terms, {"issue": 3.0, "launch": 0.5}) == (31.5, "issue")


class _Kernel:
    """Stands in for a @triton.jit function: the model reads only its name."""
    def __init__(self, name):
        self.__name__ = name


def _fake_document(monkeypatch, regs=(96, 80), scale=1.0):
    """Two tile configs of one kernel under two Triton versions, one op with one part."""
    def workload(spec):
        bm = spec["constexprs"]["BLOCK_M"]
        return [perf_workloads.Launch("op_fwd", "main", "large", 10, "large 10s B8", 264, 264,
                                      2640 * 64 / bm * scale, 1, 1e9, 1e6, 2e9, 2e6)]

    monkeypatch.setitem(perf_workloads.WORKLOADS, "_fake_kernel", workload)
    specs = [dict(name=f"fake_m{bm}", fn=_Kernel("_fake_kernel"), constexprs={"BLOCK_M": bm}, num_warps=4,
                  num_stages=2) for bm in (64, 128)]
    builds = {v: [dict(_build(), name=s["name"], regs=r) for s in specs] for v, r in zip(("3.6.0", "3.9.0"), regs)}
    return pm.model_document(specs, builds, K)


def test_model_document_and_writers(monkeypatch, tmp_path):
    doc = _fake_document(monkeypatch)
    assert doc["toolchains"] == ["3.6.0", "3.9.0"] and [k["name"] for k in doc["kernels"]] == ["fake_m64", "fake_m128"]
    assert doc["kernels"][0]["builds"]["3.9.0"]["blocks_per_sm"] == 6  # 80 registers: 6 warps a quarter
    (op,) = doc["ops"]
    fast = doc["kernels"][1]["launches"][0]["predicted"]["3.6.0"]["H200"]  # half the trips of the m64 config
    h200 = op["predicted"]["3.6.0"]["H200"]
    assert h200["parts"] == [["main", "fake_m128", fast["time_us"]]] and h200["time_us"] == fast["time_us"]
    assert h200["tflops"] == pytest.approx(2e9 / h200["time_us"] / 1e6, rel=1e-3)
    floor = max(2e9 / (790e12), 2e6 / 4.3e12) * 1e6
    assert h200["floor_us"] == pytest.approx(floor, rel=1e-3)
    assert h200["pct_of_floor"] == pytest.approx(100 * floor / h200["time_us"], rel=1e-2)
    assert json.loads(perf_report.dumps(doc)) == doc
    md = perf_report.markdown(doc)
    assert "| op_fwd | large 10s B8 |" in md
    assert md.count("| fake_m64 | 3.") == 2 and "| 5 (registers) |" in md and "| 6 (registers) |" in md
    assert perf_report.ops_table(doc).splitlines()[0].startswith("| op | shape | floor H200 µs | 3.6.0 H100 µs")


def test_compare_shows_deltas(monkeypatch):
    old = _fake_document(monkeypatch)
    new = _fake_document(monkeypatch, regs=(64, 80), scale=0.5)
    out = perf_report.compare(old, new)
    before = old["ops"][0]["predicted"]["3.6.0"]["H200"]["time_us"]
    after = new["ops"][0]["predicted"]["3.6.0"]["H200"]["time_us"]
    assert f"{perf_report._num(before)} → {perf_report._num(after)} µs ({100 * (after - before) / before:+.0f}%)" in out
    assert "| fake_m64 | 3.6.0 | ok | 96 → 64 (-33%) |" in out
    assert "fake_m64 | 3.9.0" in out  # its time changed, its registers did not
    assert "| fake_m64 | 3.9.0 | ok | 80 |" in out
    assert "Kernels whose build changed:\n\n(none)" in perf_report.compare(old, old)


def test_fit_recovers_a_scaled_term(monkeypatch):
    doc = _fake_document(monkeypatch, scale=10.0)  # L2-bound, the launch a small part
    op = doc["ops"][0]
    terms = doc["kernels"][1]["launches"][0]["predicted"]["3.6.0"]["H200"]["terms"]
    measured = terms["l2"] * 2.0 + terms["launch"]  # the GPU's L2 at half the constant's speed
    results = {"device": "NVIDIA H200", "triton": "3.6.0", "rows": [
        {"op": "op_fwd", "impl": "triton", "shape": "large B8", "params": {"model": "large", "seconds": 10},
         "median_ms": measured / 1e3, "error": None},
        {"op": "op_fwd", "impl": "sdpa", "shape": "large B8", "params": {"model": "large", "seconds": 10},
         "median_ms": 1.0, "error": None}]}
    fit = perf_report.fit(results, doc)
    (row,) = fit["rows"]
    assert (fit["device"], fit["model_triton"]) == ("H200", "3.6.0")
    assert row["predicted_us"] == op["predicted"]["3.6.0"]["H200"]["time_us"]
    assert row["fitted_us"] == pytest.approx(measured, rel=0.05)
    assert fit["constants"]["l2_tbps"] == pytest.approx(K.l2_tbps / fit["scales"]["l2"])
    assert fit["scales"]["l2"] == pytest.approx(2.0, rel=0.02)  # the model's bound term is blamed
    assert fit["scales"]["mma"] == fit["scales"]["issue"] == 1.0
    report = perf_report.fit_report(fit)
    assert "| op_fwd | large B8 |" in report and "l2_tbps=" in report
    with pytest.raises(ValueError, match="A100"):
        perf_report.fit(dict(results, device="NVIDIA A100-SXM4-80GB"), doc)


def test_nearest_version():
    assert perf_report.nearest_version("3.6.0", ["3.6.0", "3.9.0"]) == "3.6.0"
    assert perf_report.nearest_version("3.5.1", ["3.6.0", "3.9.0"]) == "3.6.0"
    assert perf_report.nearest_version("3.10.0", ["3.6.0", "3.9.0"]) == "3.9.0"


def test_every_shipped_spec_has_a_workload():
    """Each aot spec either runs at the benchmark shapes (positive grids, FLOPs / bytes counted) or is
    named in NO_WORKLOAD; a renamed kernel shows up here instead of silently losing its predictions."""
    names = set()
    for _, specs in ck.collect_specs():
        for spec in specs or ():
            assert spec["name"] not in names
            names.add(spec["name"])
            launches = perf_workloads.launches(spec)
            if launches is None:
                assert spec["fn"].__name__ in perf_workloads.NO_WORKLOAD, spec["name"]
                continue
            assert launches, spec["name"]
            for launch in launches:
                assert launch.blocks >= launch.work_blocks > 0 and launch.trips >= 0, (spec["name"], launch)
                assert launch.nbytes > 0 and launch.op_bytes > 0 and launch.op_flops >= launch.flops >= 0


def test_attention_specs_match_the_jit_specialisation():
    """A [B, S] bool key-padding mask has frame stride 1 (a constexpr for the JIT) and batch stride S
    (any length); packed rows and a prefix mask given by its lengths (no mask loaded) pass both as 0
    (divisible by 16)."""
    from unispeech_kernels.ops.attention import aot_specs

    for spec in aot_specs():
        if "stride_ms" not in spec["fn"].arg_names:
            continue
        if spec["constexprs"]["HAS_MASK"] and not spec["constexprs"]["PREFIX_MASK"]:
            assert spec["constexprs"]["stride_ms"] == 1 and "stride_mb" not in spec["divisible_by_16"]
        else:
            assert {"stride_mb", "stride_ms"} <= set(spec["divisible_by_16"])


PROBE = textwrap.dedent('''
    import triton
    import triton.language as tl


    @triton.jit
    def _k_loop_dot_kernel(a_ptr, b_ptr, c_ptr, K, BLOCK: tl.constexpr):
        r = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k in range(0, K, BLOCK):
            a = tl.load(a_ptr + r[:, None] * K + k + r[None, :])
            b = tl.load(b_ptr + (k + r[:, None]) * BLOCK + r[None, :])
            acc = tl.dot(a, b, acc)
        tl.store(c_ptr + r[:, None] * BLOCK + r[None, :], acc.to(tl.bfloat16))


    def aot_specs():
        return [dict(name="k_loop_dot", fn=_k_loop_dot_kernel, constexprs={"BLOCK": 64}, num_warps=4,
                     num_stages=3, mma=True, divisible_by_16=["a_ptr", "b_ptr", "c_ptr", "K"],
                     signature={"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "K": "i32",
                                "BLOCK": "constexpr"})]
''')


def test_real_kernel_end_to_end_and_compare(tmp_path):
    """One real sm_90a build through the CLI: its SASS main loop holds the K loop's wgmma and
    pipelined loads; a second run (from the cache) compared with an edited first JSON shows deltas."""
    (tmp_path / "perf_probe_specs.py").write_text(PROBE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.getcwd()]), TRITON_INTERPRET="0")
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    cmd = [sys.executable, "-m", "unispeech_kernels.perf_model", "--specs-from", "perf_probe_specs",
           "--cache", str(tmp_path / "cache"), "--jobs", "1"]
    proc = subprocess.run(cmd + ["--json", str(first)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(first.read_text())
    (kernel,) = doc["kernels"]
    build = next(iter(kernel["builds"].values()))
    main = build["sass"]["loops"][build["sass"]["main"]]
    assert build["sass"]["mma_kind"] == "wgmma" and main["mma"] >= 4 and main["global_loads"] >= 2, build
    assert build["spill_stores"] == 0 and build["blocks_per_sm"] >= 1 and kernel["launches"] == []
    assert "| k_loop_dot |" in (tmp_path / "first.md").read_text()
    build["regs"] += 10
    first.write_text(json.dumps(doc))
    proc = subprocess.run(cmd + ["--json", str(second), "--compare", str(first)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    regs = json.loads(second.read_text())["kernels"][0]["builds"][doc["toolchains"][0]]["regs"]
    assert f"{regs + 10} → {regs}" in proc.stdout

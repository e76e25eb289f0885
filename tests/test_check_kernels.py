"""unispeech_kernels.check_kernels: the ptxas / PTX parsing helpers on canned text, and the checker
end to end on small kernels (Triton compiles ahead of time for sm_80 / sm_90 without a GPU)."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from unispeech_kernels import check_kernels as ck

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z4fastPf' for 'sm_80'
ptxas info    : Function properties for _Z4fastPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 16384 bytes smem, 360 bytes cmem[0]
ptxas info    : Function properties for __internal_helper
    64 bytes stack frame, 12 bytes spill stores, 12 bytes spill loads
ptxas info    : Compiling entry function 'spilly' for 'sm_90a'
ptxas info    : Function properties for spilly
    96 bytes stack frame, 88 bytes spill stores, 72 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers
"""


def test_parse_ptxas_verbose():
    fast, spilly = ck.parse_ptxas_verbose(PTXAS_LOG)
    assert fast == {"name": "_Z4fastPf", "arch": "sm_80", "regs": 40, "smem": 16384,
                    "spill_stores": 0, "spill_loads": 0}  # a device function's spills are not the entry's
    assert spilly == {"name": "spilly", "arch": "sm_90a", "regs": 255, "smem": 0,
                      "spill_stores": 88, "spill_loads": 72}
    assert ck.spill_status(fast) == "ok"
    assert ck.spill_status(spilly) == "FAIL: spills"
    assert ck.spill_status(dict(fast, regs=None)).startswith("FAIL")
    assert ck.parse_ptxas_verbose("") == []


def test_tensor_core_instr():
    assert ck.tensor_core_instr("\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...}") == "wgmma"
    assert ck.tensor_core_instr("\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...}") == "mma.sync"
    assert ck.tensor_core_instr("\tfma.rn.f32 %f1, %f2, %f3, %f4;\n\tld.global.v4.b32") is None


def test_short_cuda_name_and_table():
    if shutil.which("c++filt"):
        assert ck.short_cuda_name("_ZN9unispeech12_GLOBAL__N_15fcl_kIfLi2EEEvNS_9FclParamsE") == "fcl_k<float, 2>"
    rows = [ck.Row("k1", "sm_80", 40, 0, 0, 0, "mma.sync", "ok"),
            ck.Row("k2", "sm_90", status="FAIL: nvcc: error")]
    table = ck.format_table(rows)
    assert table.splitlines()[0].split() == ["kernel", "arch", "regs", "smem", "spills", "(st/ld", "B)",
                                             "tensor-core", "status"]
    assert "0/0" in table and "FAIL: nvcc: error" in table
    assert rows[1].failed and not rows[0].failed


def test_cuda_sources_skip_without_nvcc(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    rows, skipped = ck.check_cuda_sources()
    assert rows == [] and skipped.startswith("SKIPPED CUDA sources: nvcc not found")


@pytest.mark.skipif(not os.path.exists(os.path.join(ck.cuda_home(), "bin", "nvcc")), reason="no nvcc")
def test_csrc_compiles_without_spills():
    rows, skipped = ck.check_cuda_sources()
    assert skipped is None
    assert {r.arch for r in rows} == {"sm_80", "sm_90"}
    assert any("fcl_conv_kernel" in r.kernel for r in rows)
    assert not [r for r in rows if r.failed], ck.format_table(rows)


SPEC_MODULE = textwrap.dedent('''
    import triton
    import triton.language as tl


    @triton.jit
    def _tile_dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
        r = tl.arange(0, BLOCK)
        a = tl.load(a_ptr + r[:, None] * BLOCK + r[None, :])
        b = tl.load(b_ptr + r[:, None] * BLOCK + r[None, :])
        tl.store(c_ptr + r[:, None] * BLOCK + r[None, :], tl.dot(a, b).to(tl.float16))


    @triton.jit
    def _scale_kernel(x_ptr, n, scale, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * scale, mask=offs < n)


    def aot_specs():
        dot = dict(name="tile_dot", fn=_tile_dot_kernel, constexprs={"BLOCK": 64}, num_warps=4, num_stages=1,
                   signature={"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16", "BLOCK": "constexpr"}, mma=True)
        scale = dict(name="scale_claims_mma", fn=_scale_kernel, constexprs={"BLOCK": 256}, num_warps=4,
                     num_stages=1, signature={"x_ptr": "*bf16", "n": "i32", "scale": "fp32", "BLOCK": "constexpr"},
                     mma=True)
        return [dot, scale]
''')


def test_check_kernels_end_to_end_on_small_specs(tmp_path):
    (tmp_path / "aot_probe_specs.py").write_text(SPEC_MODULE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.getcwd()]))
    proc = subprocess.run([sys.executable, "-m", "unispeech_kernels.check_kernels", "--no-cuda",
                           "--specs-from", "aot_probe_specs"], capture_output=True, text=True, env=env,
                          timeout=300)
    out = proc.stdout
    rows = {tuple(line.split()[:2]): line for line in out.splitlines() if line.split()[:1] in
            (["tile_dot"], ["scale_claims_mma"])}
    assert proc.returncode == 1, out + proc.stderr  # the scale kernel has no tensor-core instruction
    assert "SKIPPED CUDA sources: --no-cuda" in out
    assert "mma.sync" in rows[("tile_dot", "sm_80")] and rows[("tile_dot", "sm_80")].rstrip().endswith("ok")
    sm90 = [line for key, line in rows.items() if key[0] == "tile_dot" and key[1].startswith("sm_90")]
    assert len(sm90) == 1 and "wgmma" in sm90[0] and sm90[0].rstrip().endswith("ok"), out
    bad = [line for key, line in rows.items() if key[0] == "scale_claims_mma"]
    assert len(bad) == 2 and all("FAIL: no tensor-core instruction" in line for line in bad), out
    assert "4 kernel builds, 2 failed" in out

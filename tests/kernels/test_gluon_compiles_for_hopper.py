"""Every Gluon kernel, at the tiles its wrapper picks, compiles for sm_90a without spills, and the
ones built to overlap a wgmma with the previous step's scaling keep it in flight.

ptxas silently serializes wgmma (`wgmma.wait_group 0` semantics, `WARPGROUP.DEPBAR.LE gsb0, 0x0`
before every use) when it decides that the code reads an in-flight accumulator, and says so only
as an info line (C7514). A first version of the MoE prefill GEMM 1 (its K loop in a helper called
once per pass) compiled that way, which no GPU test would notice: the results stay right, only
slower. This test compiles each kernel ahead of time with Triton's bundled ptxas (no GPU needed)
in a subprocess (conftest.py's interpreter flag replaces @triton.jit for the whole process).

    python tests/kernels/test_gluon_compiles_for_hopper.py      # the report, per kernel
"""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


def _desc(block: list[int], dtype: str = "fp8e4nv") -> str:
    from triton.experimental.gluon import language as gl

    layout = gl.NVMMASharedLayout.get_default_for(
        block, getattr(gl, {"fp8e4nv": "float8e4nv", "bf16": "bfloat16"}[dtype])
    )
    return f"tensordesc<{dtype}[{', '.join(map(str, block))}],{layout!r}>"


def _cases() -> list:
    """(label, kernel, pointer / descriptor types, constexprs, must keep wgmma in flight (True:
    one, the DEPBAR 0x1; or the DEPBAR count that must appear)[, spill bytes allowed])."""
    from nmoe_serve.kernels import (
        fp8_gemm,
        fp8_gemm_gluon,
        fused_moe,
        fused_moe_gluon,
        fused_moe_gluon_prefill,
    )

    f32, i32 = "*fp32", "*i32"
    cases = []
    for T, N, K in ((256, 7168, 16384), (4096, 1536, 7168)):
        cfg = fp8_gemm.gluon_config(T, N, K, num_sms=132)
        bt, bw = cfg["BLOCK_T"], cfg["BLOCK_W"]
        types = dict(x_desc=_desc([bt, 128]), w_desc=_desc([bw, 128]), xs_ptr=f32, ws_ptr=f32, y_ptr="*bf16")
        constexprs = dict(BLOCK_T=bt, BLOCK_W=bw, STAGES=cfg["STAGES"], num_warps=cfg["num_warps"])
        cases.append((f"fp8_gemm_gluon T={T}", fp8_gemm_gluon.fp8_gemm_gluon_kernel, types, constexprs, True))
    for label, decode in (
        ("", fused_moe.GLUON_DECODE),
        (" wide (128-slot GEMM 1, GEMM 2 on halves)", fused_moe.GLUON_DECODE_WIDE),
    ):
        for gemm, kernel in (
            ("gemm1", fused_moe_gluon.moe_gemm1_gluon_kernel),
            ("gemm2", fused_moe_gluon.moe_gemm2_gluon_kernel),
        ):
            tiles = decode[gemm]
            types = dict(x_desc=_desc([tiles["BLOCK_T"], 128]), w_desc=_desc([128, 128]))
            types |= dict(xs_ptr=f32, ws_ptr=f32, block_expert_ptr=i32)
            constexprs = dict(STAGES=tiles["STAGES"], MAX_BLOCKS=128, num_warps=tiles["num_warps"])
            if gemm == "gemm1":
                types |= dict(h_ptr="*fp8e4nv", hs_ptr=f32)
                constexprs |= dict(FP8_MAX=448.0, AMAX_EPS=1e-10)
            else:  # the wide config's GEMM 2 takes the 64-slot halves of GEMM 1's blocks
                types |= dict(y_ptr="*bf16", sorted_pair_ids_ptr=i32, block_base_ptr=i32)
                constexprs |= dict(INDIRECT=decode is fused_moe.GLUON_DECODE_WIDE)
            # The decode GEMMs wait for each step's products (they are bound by the weight
            # stream); GEMM 1 on 128-slot blocks keeps one half product in flight (DEPBAR 0x1).
            in_flight = decode is fused_moe.GLUON_DECODE_WIDE and gemm == "gemm1"
            cases.append((f"fused_moe_gluon{label} {gemm}", kernel, types, constexprs, in_flight))
    prefill = fused_moe.GLUON_PREFILL
    gemm1_types = dict(x_desc=_desc([128, 128]), w_desc=_desc([64, 128]), h_ptr="*fp8e4nv")
    gemm1_types |= dict(xs_ptr=f32, ws_ptr=f32, hs_ptr=f32, block_expert_ptr=i32)
    gemm2_types = dict(h_desc=_desc([128, 128]), w_desc=_desc([128, 128]), y_ptr="*bf16")
    gemm2_types |= dict(hs_ptr=f32, ws_ptr=f32, sorted_pair_ids_ptr=i32, block_expert_ptr=i32)
    for stages in sorted({prefill["gemm1"]["STAGES"], 2, 3}):
        cases.append(
            (
                f"fused_moe_gluon_prefill gemm1 stages={stages}",
                fused_moe_gluon_prefill.moe_gemm1_prefill_kernel,
                gemm1_types,
                dict(STAGES=stages, FP8_MAX=448.0, AMAX_EPS=1e-10, num_warps=prefill["gemm1"]["num_warps"]),
                True,
            )
        )
    for stages in sorted({prefill["gemm2"]["STAGES"], 2, 5}):
        cases.append(
            (
                f"fused_moe_gluon_prefill gemm2 stages={stages}",
                fused_moe_gluon_prefill.moe_gemm2_prefill_kernel,
                gemm2_types,
                dict(STAGES=stages, num_warps=prefill["gemm2"]["num_warps"]),
                True,
            )
        )
    import triton
    from triton.experimental.gluon import language as gl

    from nmoe_serve.kernels import mla_decode_gluon

    bf16 = gl.bfloat16
    for splits in (1, 4):
        types = dict(q_nope_ptr="*bf16", q_pe_ptr="*bf16", kv_ptr="*bf16", page_table_ptr=i32)
        types |= dict(ckv_desc=_desc([64, 256], "bf16"), kpe_desc=_desc([64, 64], "bf16"))
        types |= dict(
            context_lens_ptr=i32, o_ptr="*bf16" if splits == 1 else f32, lse_ptr=f32, scale_log2="fp32"
        )
        constexprs = dict(P=64, HALF_L=256, R=64, NUM_SPLITS=splits, BLOCK_H=64, BLOCK_N=64, STAGES=2)
        constexprs |= dict(
            q_layout=gl.NVMMASharedLayout.get_default_for([64, 256], bf16),
            qpe_layout=gl.NVMMASharedLayout.get_default_for([64, 64], bf16),
            p_layout=gl.NVMMASharedLayout.get_default_for([64, 64], bf16),
            num_warps=mla_decode_gluon.NUM_WARPS,
        )
        # Each step waits for its weighted sum with the next scores' three dots in flight (0x3).
        # At 255 registers the GPU host's Triton 3.6 spills nothing here (held to 0); later
        # releases (3.9 on the dev machines and CI) spill 24 bytes since the tiles' three pieces.
        label = f"mla_decode_gluon DeepSeek-V3 dims, {splits} split(s)"
        spill_allowed = 0 if triton.__version__.startswith("3.6.") else 32
        cases.append(
            (label, mla_decode_gluon.mla_decode_gluon_kernel, types, constexprs, "0x3", spill_allowed)
        )
    from nmoe_serve.kernels import mla_decode_fp8_gluon

    fp8 = gl.float8e4nv
    for splits in (1, 4):
        types = dict(q_nope_ptr="*bf16", q_pe_ptr="*bf16", scale_ptr=f32, page_table_ptr=i32)
        types |= dict(ckv_desc=_desc([64, 256]), kpe_desc=_desc([64, 64]), context_lens_ptr=i32)
        types |= dict(o_ptr="*bf16" if splits == 1 else f32, lse_ptr=f32, scale_log2="fp32")
        constexprs = dict(P=64, HALF_L=256, R=64, ROW4=148, NUM_SPLITS=splits, BLOCK_H=64, BLOCK_N=64)
        constexprs |= dict(
            STAGES=mla_decode_fp8_gluon.STAGES,
            q_layout=gl.NVMMASharedLayout.get_default_for([64, 256], fp8),
            qpe_layout=gl.NVMMASharedLayout.get_default_for([64, 64], fp8),
            p_layout=gl.NVMMASharedLayout.get_default_for([64, 64], fp8),
            vt_layout=gl.NVMMASharedLayout.get_default_for([256, 64], fp8),
            sc_layout=gl.SwizzledSharedLayout(1, 1, 1, [0]),
            num_warps=mla_decode_fp8_gluon.NUM_WARPS,
        )
        # The weighted sum stays in flight while the next tile's softmax runs (0x2: the scores'
        # groups waited, the sum's two left). At 255 registers ptxas spills a few loop-invariant
        # wgmma descriptors (64-72 bytes on 3.6 and 3.9), reloaded once a step.
        cases.append(
            (
                f"mla_decode_fp8_gluon DeepSeek-V3 dims, {splits} split(s)",
                mla_decode_fp8_gluon.mla_decode_fp8_gluon_kernel,
                types,
                constexprs,
                "0x2",
                128,
            )
        )
    return cases


def _compile(kernel, types: dict, constexprs: dict):
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    signature = {
        name: "constexpr" if name in constexprs else types.get(name, "i32")
        for name in inspect.signature(kernel.fn).parameters
    }
    source = GluonASTSource(kernel, signature, constexprs, {})
    return triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=constexprs["num_warps"])
    )


def _check(compiled, in_flight: bool | str, spill_allowed: int = 0) -> tuple[str, list[str]]:
    """(report line, problems) from ptxas -v on the PTX and the cubin's SASS."""
    from triton.backends.nvidia.compiler import get_ptxas

    bin_dir = Path(get_ptxas(90).path).parent
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp, "k.ptx")
        ptx.write_text(compiled.asm["ptx"])
        info = subprocess.run(
            [get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(Path(tmp, "k.cubin"))],
            capture_output=True,
            text=True,
        ).stderr
        sass = subprocess.run(
            [bin_dir / "cuobjdump", "-sass", str(Path(tmp, "k.cubin"))], capture_output=True, text=True
        ).stdout
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    depbar = sorted(set(re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x\d)", sass)))
    problems = []
    if regs is None or spills is None:
        problems.append(f"no ptxas report: {info[-500:]}")
    elif max(map(int, spills.groups())) > spill_allowed:
        problems.append(f"spills ({spills.group(0)})")
    if "C7514" in info:
        problems.append("ptxas serializes its wgmma (C7514)")
    if in_flight and ("0x1" if in_flight is True else in_flight) not in depbar:
        problems.append(f"no wgmma left in flight (DEPBAR waits: {depbar})")
    line = f"regs {regs.group(1) if regs else '?'}, shared {compiled.metadata.shared} B, DEPBAR {depbar}"
    return line, problems


def main(verbose: bool) -> int:
    failed = 0
    for label, kernel, types, constexprs, in_flight, *spill_allowed in _cases():
        try:
            line, problems = _check(_compile(kernel, types, constexprs), in_flight, *spill_allowed)
        except Exception as e:
            line, problems = "", [f"{type(e).__name__}: {str(e)[:1500]}"]
        if problems:
            failed += 1
            print(f"FAILED {label}: {'; '.join(problems)} ({line})")
        elif verbose:
            print(f"{label:45s} {line}")
    return 1 if failed else 0


def _has_gluon_and_ptxas() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.experimental.gluon._runtime import GluonASTSource  # noqa: F401

        return Path(get_ptxas(90).path).exists()
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(
    not _has_gluon_and_ptxas(), reason="Triton's Gluon or its NVIDIA backend (ptxas) is missing"
)
def test_gluon_kernels_compile_for_sm90_without_serialized_wgmma():
    from tests.kernels.test_compiles_for_hopper import run_compile_script

    run_compile_script(Path(__file__), timeout=600)


if __name__ == "__main__":
    sys.exit(main(verbose="--quiet" not in sys.argv))

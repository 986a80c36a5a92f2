"""Every kernel, at the tiles its wrapper picks for DeepSeek-V3 shapes, compiles for sm_90.

The interpreter runs the kernels' Python, not Triton's GPU compiler, so this test compiles them
ahead of time for Hopper (Triton's bundled ptxas; no GPU needed). It runs in a subprocess,
because the interpreter flag set by conftest.py replaces @triton.jit for the whole process.

Run by hand to see the register use and spills per kernel (tuning input for the GPU session):

    python tests/kernels/test_compiles_for_hopper.py
"""

import inspect
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

# Int arguments whose DeepSeek-V3 values are multiples of 16, as Triton specializes them at launch
# (scale-row strides such as 56 = 7168 / 128 are not).
DIV16 = {"H", "inter", "N", "K", "L", "R", "P", "T", "num_pairs", "numel", "E"}
NOT_DIV16_STRIDES = {
    "stride_s",
    "stride_xs",
    "stride_ws",
    "stride_hs",
    "stride_wse",
    "stride_wsn",
    "stride_pt",
}


def _cases():
    """(label, kernel, pointer and float argument types, constexprs, num_warps, num_stages)."""
    from nmoe_serve.kernels import fp8_gemm, fp8_quant, fused_moe, gather_sum, mla_decode, mla_prefill_keys

    f32, bf16, fp8, i32 = "*fp32", "*bf16", "*fp8e4nv", "*i32"
    cases = [
        (
            "fp8_quant",
            fp8_quant.fp8_quant_kernel,
            dict(x_ptr=bf16, q_ptr=fp8, s_ptr=f32),
            dict(GROUP=128, BLOCK_G=8, FP8_MAX=448.0, AMAX_EPS=1e-10),
            4,
            1,
        )
    ]
    for T in (1, 32, 256, 4096):
        cfg = fp8_gemm.default_config(T, 1536, 7168, num_sms=132)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        cfg.pop("SPLIT_K")
        cases.append(
            (
                f"fp8_gemm T={T}",
                fp8_gemm.fp8_gemm_kernel,
                dict(x_ptr=fp8, xs_ptr=f32, w_ptr=fp8, ws_ptr=f32, y_ptr=bf16),
                dict(BLOCK_K=128, SCALE_BLOCK_N=128, GROUP_T=8, DOT_FP32=False, **cfg),
                warps,
                stages,
            )
        )
    cases.append(
        (
            "gather_sum",
            gather_sum.gather_sum_kernel,
            dict(src_ptr=bf16, index_ptr="*i64", out_ptr=bf16),
            dict(BLOCK_H=gather_sum.BLOCK_H),
            4,
            1,
        )
    )
    cases.append(
        (
            "mla_prefill_keys",
            mla_prefill_keys.mla_prefill_keys_kernel,
            dict(nope_ptr=bf16, pe_ptr=bf16, k_ptr=bf16),
            dict(BLOCK_N=mla_prefill_keys.BLOCK_N, BLOCK_D=128, BLOCK_R=64),
            4,
            1,
        )
    )
    cases.append(
        (
            "fp8_gemm_reduce",
            fp8_gemm.fp8_gemm_reduce_kernel,
            dict(partial_ptr=f32, y_ptr=bf16),
            dict(SPLIT_K=8, BLOCK=1024),
            4,
            1,
        )
    )
    for is_fp8 in (False, True):
        w = fp8 if is_fp8 else bf16
        configs = [(f"T={T}", fused_moe.default_config(T * 8, 32, is_fp8)) for T in (1, 32, 128, 990, 4096)]
        if is_fp8:
            # The variants bench/sweep_moe.py times besides the defaults.
            decode, prefill = (
                fused_moe.default_config(256, 32, True),
                fused_moe.default_config(32768, 32, True),
            )
            plain = dict(MERGE_GU=False, SCALAR_WS=False)
            configs += [
                ("decode unmerged", {g: dict(t, **plain) for g, t in decode.items()}),
                ("prefill unmerged", {g: dict(t, **plain) for g, t in prefill.items()}),
                ("decode merged vector-scales", {g: dict(t, SCALAR_WS=False) for g, t in decode.items()}),
                (
                    "decode BT64",
                    dict(gemm1=dict(decode["gemm1"], BLOCK_T=64, num_warps=8), gemm2=prefill["gemm2"]),
                ),
                ("prefill gemm2 BT128", dict(prefill, gemm2=dict(prefill["gemm2"], BLOCK_T=128))),
            ]
        for name, cfg in configs:
            ids = dict(sorted_pair_ids_ptr=i32, block_expert_ptr=i32)
            for gemm, kernel, types, extra in (
                (
                    1,
                    fused_moe.fused_moe_gemm1_kernel,
                    dict(x_ptr=w, xs_ptr=f32, w_ptr=w, ws_ptr=f32, h_ptr=w, hs_ptr=f32, **ids),
                    dict(FP8_MAX=448.0, AMAX_EPS=1e-10),
                ),
                (
                    2,
                    fused_moe.fused_moe_gemm2_kernel,
                    dict(h_ptr=w, hs_ptr=f32, w_ptr=w, ws_ptr=f32, y_ptr=bf16, **ids),
                    {},
                ),
            ):
                tiles, _ = fused_moe.kernel_tiles(cfg[f"gemm{gemm}"], gemm, 7168, 2048, num_blocks=64)
                warps, stages = tiles.pop("num_warps"), tiles.pop("num_stages")
                constexprs = dict(DOT_FP32=False, SCALE_BLOCK_N=128, FP8=is_fp8, **tiles, **extra)
                cases.append(
                    (f"fused_moe_gemm{gemm} {w[1:]} {name}", kernel, types, constexprs, warps, stages)
                )
    cases += [
        (
            "moe_align_count",
            fused_moe.moe_align_count_kernel,
            dict(ids_ptr=i32, counts_ptr=i32),
            dict(CHUNK=256, SUB=256, BLOCK_E=32),
            4,
            1,
        ),
        *(
            (
                f"moe_align_scatter BLOCK_T={block_t}{' halves' if halves else ''}",
                fused_moe.moe_align_scatter_kernel,
                dict(
                    ids_ptr=i32,
                    counts_ptr=i32,
                    sorted_pair_ids_ptr=i32,
                    block_expert_ptr=i32,
                    half_expert_ptr=i32,
                    half_base_ptr=i32,
                ),
                dict(
                    BLOCK_T=block_t,
                    CHUNK=256,
                    SUB=256,
                    BLOCK_E=32,
                    BLOCK_C=128,
                    FILL_BLOCKS=max(1, min(16, 2048 // block_t)),
                    HALVES=halves,
                ),
                4,
                1,
            )
            for block_t, halves in ((16, False), (128, True))
        ),
    ]
    cases.append(
        (
            "moe_combine",
            fused_moe.moe_combine_kernel,
            dict(y_ptr=bf16, ids_ptr=i32, weights_ptr=f32, out_ptr=bf16),
            dict(TOP_K=8, BLOCK_H=1024),
            4,
            1,
        )
    )
    # Each of mla_decode's variants (the sweep's candidates) at B = 128, and the default at B = 1.
    mla_types = dict(
        q_nope_ptr=bf16, q_pe_ptr=bf16, kv_ptr=bf16, page_table_ptr=i32, context_lens_ptr=i32, lse_ptr=f32
    )
    mla_runs = [(B, name) for name in mla_decode.VARIANTS for B in (128,)] + [(1, None)]
    for B, name in mla_runs:
        cfg = mla_decode.default_config(B, 128, 512, 64, 64, 2, 16384, num_sms=132)  # H100 SXM
        label = f"mla_decode {cfg['VARIANT']} B={B}" if name is None else f"mla_decode {name} B={B}"
        if name is not None:
            cfg = mla_decode.variant_config(cfg, name)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        types = dict(mla_types, o_ptr=f32 if cfg["NUM_SPLITS"] > 1 else bf16, scale_log2="fp32")
        if cfg.pop("VARIANT") == "generic":
            kernel = mla_decode.mla_decode_kernel
            constexprs = dict(BLOCK_L=512, BLOCK_R=64, PAGE_ALIGNED=True, DOT_FP32=False, **cfg)
        else:
            kernel = mla_decode.mla_decode_paged_kernel
            descs = dict(
                ckv_desc=f"tensordesc<bf16[{cfg['BLOCK_N']}, 256]>",
                kpe_desc=f"tensordesc<bf16[{cfg['BLOCK_N']}, 64]>",
            )
            if cfg.pop("TMA"):
                types |= descs
                constexprs = {}
            else:
                constexprs = dict(ckv_desc=None, kpe_desc=None)
            constexprs |= dict(HALF_L=256, R=64, DOT_FP32=False, **cfg)
        cases.append((f"{label} splits={cfg['NUM_SPLITS']}", kernel, types, constexprs, warps, stages))
    cases.append(
        (
            "mla_decode_merge",
            mla_decode.mla_decode_merge_kernel,
            dict(o_part_ptr=f32, lse_ptr=f32, out_ptr=bf16),
            dict(NUM_SPLITS=64, BLOCK_S=64, BLOCK_L=512),
            4,
            1,
        )
    )
    cases += _fp8_kv_cases(bf16, f32, fp8, i32)
    cases += _pointwise_cases(bf16, f32, i32)
    return cases


def _fp8_kv_cases(bf16: str, f32: str, fp8: str, i32: str) -> list:
    """The FP8 KV cache's kernels: mla_decode_fp8's variants at B = 128 and its default at B = 1,
    and the FP8 cache write."""
    from nmoe_serve.kernels import mla_decode_fp8, mla_kv_write

    types = dict(
        q_nope_ptr=bf16, q_pe_ptr=bf16, kv_ptr=fp8, scale_ptr=f32, page_table_ptr=i32, context_lens_ptr=i32,
        lse_ptr=f32, scale_log2="fp32",
    )  # fmt: skip
    cases = []
    for B, name in [(128, name) for name in mla_decode_fp8.VARIANTS] + [(1, None)]:
        cfg = mla_decode_fp8.default_config(B, 128, 512, 64, 64, 16384, num_sms=132)
        if name is not None:
            cfg = mla_decode_fp8.variant_config(cfg, name)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        case_types = dict(types, o_ptr=f32 if cfg["NUM_SPLITS"] > 1 else bf16)
        constexprs = dict(HALF_L=256, R=64, TAIL=16)
        if cfg.pop("TMA"):
            case_types |= dict(
                ckv_desc=f"tensordesc<fp8e4nv[{cfg['BLOCK_N']}, 256]>",
                kpe_desc=f"tensordesc<fp8e4nv[{cfg['BLOCK_N']}, 64]>",
            )
        else:
            constexprs |= dict(ckv_desc=None, kpe_desc=None)
        label = f"mla_decode_fp8 {name or 'default'} B={B} splits={cfg['NUM_SPLITS']}"
        cases.append(
            (label, mla_decode_fp8.mla_decode_fp8_kernel, case_types, constexprs | cfg, warps, stages)
        )
    cases.append(
        (
            "mla_kv_write_fp8",
            mla_kv_write.mla_kv_write_fp8_kernel,
            dict(
                kv_a_ptr=bf16,
                w_ptr=bf16,
                cos_ptr=f32,
                sin_ptr=f32,
                cache_ptr=fp8,
                scale_ptr=f32,
                slots_ptr="*i64",
                eps="fp32",
            ),
            dict(BLOCK_L=512, R=64, TAIL=16),
            4,
            1,
        )
    )
    return cases


def _pointwise_cases(bf16: str, f32: str, i32: str) -> list:
    """The small fused kernels of a layer (kernels/rms_norm, rope, mla_kv_write, router, silu_mul)."""
    from nmoe_serve.kernels import mla_kv_write, rms_norm, rope, router, silu_mul

    return [
        (
            f"rms_norm add={add}",
            rms_norm.rms_norm_kernel,
            dict(x_ptr=bf16, r_ptr=bf16, w_ptr=bf16, out_ptr=bf16, sum_ptr=bf16, eps="fp32"),
            dict(ADD=add, BLOCK=8192),
            8,
            1,
        )
        for add in (False, True)
    ] + [
        (
            "rope",
            rope.rope_kernel,
            dict(x_ptr=bf16, cos_ptr=f32, sin_ptr=f32),
            dict(BLOCK_N=64, R=64),
            4,
            1,
        ),
        (
            "mla_kv_write",
            mla_kv_write.mla_kv_write_kernel,
            dict(
                kv_a_ptr=bf16,
                w_ptr=bf16,
                cos_ptr=f32,
                sin_ptr=f32,
                cache_ptr=bf16,
                slots_ptr="*i64",
                eps="fp32",
            ),
            dict(BLOCK_L=512, R=64),
            4,
            1,
        ),
        (
            "grouped_topk",
            router.grouped_topk_kernel,
            dict(logits_ptr=f32, bias_ptr=f32, weights_ptr=f32, ids_ptr="*i64", route_scale="fp32"),
            dict(TOPK_GROUPS=4, TOP_K=8, NORMALIZE=True, BLOCK_G=8, BLOCK_GS=32, BLOCK_K=8),
            4,
            1,
        ),
        (
            "silu_mul",
            silu_mul.silu_mul_kernel,
            dict(gu_ptr=bf16, h_ptr=bf16),
            dict(BLOCK=1024),
            4,
            1,
        ),
    ]


def _compile(kernel, types, constexprs, num_warps, num_stages):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(inspect.signature(kernel.fn).parameters):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = types.get(name, "i32")
        if (
            signature[name].startswith("*")
            or name in DIV16
            or (name.startswith("stride") and name not in NOT_DIV16_STRIDES)
        ):
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def _resource_usage(compiled) -> str:
    import re
    import tempfile

    import triton

    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:\d+ STACK:\d+", usage)
    mma = sorted(set(re.findall(r"\b([HQ]GMMA|HMMA)\b", sass)))
    return f"{found.group(0) if found else '?'} spill-loads:{sass.count('LDL')} mma:{','.join(mma) or '-'}"


def _compile_case(index: int, verbose: bool) -> str | None:
    """Compile case `index`; return its report line (verbose) or None, or a line starting FAILED."""
    label, kernel, types, constexprs, num_warps, num_stages = _cases()[index]
    try:
        compiled = _compile(kernel, types, constexprs, num_warps, num_stages)
    except Exception as e:
        return f"FAILED {label}: {type(e).__name__}: {str(e)[:1500]}"
    if verbose:
        return f"{label:40s} shared {compiled.metadata.shared:>6} B  {_resource_usage(compiled)}"
    return None


def main(verbose: bool) -> int:
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        lines = list(pool.map(_compile_case, range(len(_cases())), [verbose] * len(_cases())))
    for line in lines:
        if line:
            print(line)
    return 1 if any(line and line.startswith("FAILED") for line in lines) else 0


def _has_ptxas() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return Path(get_ptxas(90).path).exists()
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _has_ptxas(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_for_sm90():
    run_compile_script(Path(__file__), timeout=300)


def run_compile_script(script: Path, timeout: int) -> None:
    """Run a compile-for-Hopper test file as a script (`--quiet`) in a subprocess without the
    interpreter flag, and fail with its output unless it exits 0."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(script), "--quiet"],
        cwd=script.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


if __name__ == "__main__":
    sys.exit(main(verbose="--quiet" not in sys.argv))

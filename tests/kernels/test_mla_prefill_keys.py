"""mla_prefill_keys (prefill attention's keys) against torch.cat: a copy, so equal bit for bit."""

import pytest
import torch

from nmoe_serve.kernels.mla_prefill_keys import mla_prefill_keys, mla_prefill_keys_ref


def _inputs(S: int, N: int, D: int, Dv: int, R: int, L: int, dtype, device):
    """k_nope as the model slices it from kv_b_proj's output, k_pe from the latent cache's rows."""
    kv = torch.randn(S, N, D + Dv, device=device).to(dtype)
    cached = torch.randn(S, L + R, device=device).to(dtype)
    return kv[..., :D], cached[:, L:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "S, N, D, Dv, R, L", [(5, 4, 16, 16, 8, 32), (3, 11, 32, 32, 32, 128), (1, 9, 24, 8, 12, 20)]
)
def test_mla_prefill_keys_equals_cat(S, N, D, Dv, R, L, dtype, device):
    k_nope, k_pe = _inputs(S, N, D, Dv, R, L, dtype, device)
    got = mla_prefill_keys(k_nope, k_pe)
    assert got.shape == (S, N, D + R) and got.is_contiguous()
    assert torch.equal(got, mla_prefill_keys_ref(k_nope, k_pe))


def test_mla_prefill_keys_takes_no_tokens(device):
    k_nope, k_pe = _inputs(0, 4, 16, 16, 8, 32, torch.float32, device)
    assert mla_prefill_keys(k_nope, k_pe).shape == (0, 4, 24)


@pytest.mark.parametrize(
    "k_nope, k_pe, match",
    [
        (torch.zeros(3, 4), torch.zeros(3, 8), "k_nope must be 3-D"),
        (torch.zeros(3, 4, 16), torch.zeros(2, 8), "one rope key per context token"),
        (torch.zeros(3, 4, 16), torch.zeros(3, 8, dtype=torch.bfloat16), "k_pe has dtype torch.bfloat16"),
        (torch.zeros(3, 16, 4).transpose(1, 2), torch.zeros(3, 8), "contiguous last dimension"),
    ],
)
def test_mla_prefill_keys_rejects_bad_arguments(k_nope, k_pe, match):
    for op in (mla_prefill_keys, mla_prefill_keys_ref):
        with pytest.raises(ValueError, match=match):
            op(k_nope, k_pe)


@pytest.mark.gpu
def test_mla_prefill_keys_gpu_deepseek_shapes():
    """DeepSeek-V3: 128 heads, D 128, Dv 128, R 64, L 512, 16k context tokens, bf16."""
    k_nope, k_pe = _inputs(16384, 128, 128, 128, 64, 512, torch.bfloat16, "cuda")
    assert torch.equal(mla_prefill_keys(k_nope, k_pe), mla_prefill_keys_ref(k_nope, k_pe))

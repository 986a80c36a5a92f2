"""gather_sum (the expert-parallel combine) against its torch reference and against index_add;
on the GPU (`gpu`) bit-equal to the reference at EP 8 and DeepSeek-V3's H."""

import pytest
import torch

from nmoe_serve.kernels.gather_sum import gather_sum, gather_sum_ref


def _index(T: int, R: int, M: int, device, fill: float = 0.6) -> torch.Tensor:
    """[T, R] rows of a [M, H] source, about `fill` of them present, the rest -1."""
    rows = torch.randint(0, M, (T, R), device=device)
    return torch.where(torch.rand(T, R, device=device) < fill, rows, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, R, M, H", [(5, 8, 20, 64), (1, 1, 1, 1000), (7, 3, 4, 2100), (3, 8, 0, 64)])
def test_gather_sum_matches_reference(T, R, M, H, dtype, device):
    src = torch.randn(M, H, device=device).to(dtype)
    index = _index(T, R, M, device) if M else torch.full((T, R), -1, device=device)
    got, want = gather_sum(src, index), gather_sum_ref(src, index)
    assert got.shape == (T, H) and got.dtype == dtype
    # Both sum in float32 in the order of r and round once; the CPU interpreter's bf16 stores
    # truncate instead of rounding (PITFALLS.md): a bf16 ulp there, exact on the GPU (below).
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got, want, **tol)


def test_gather_sum_is_index_add_of_the_present_rows(device):
    T, R, M, H = 6, 4, 15, 96
    src = torch.randn(M, H, device=device, dtype=torch.float64).float()
    index = _index(T, R, M, device).to(torch.int32)
    t, r = (index >= 0).nonzero(as_tuple=True)
    want = torch.zeros(T, H, device=device, dtype=torch.float64).index_add_(
        0, t, src[index[t, r].long()].double()
    )
    torch.testing.assert_close(gather_sum(src, index).double(), want, rtol=1e-6, atol=1e-6)


def test_gather_sum_gives_zeros_to_tokens_without_rows_and_takes_no_tokens(device):
    src = torch.randn(4, 32, device=device)
    index = torch.tensor([[-1, -1], [2, -1], [-1, -1]], device=device)
    out = gather_sum(src, index)
    assert torch.equal(out[0], torch.zeros(32, device=device)) and torch.equal(out[2], out[0])
    torch.testing.assert_close(out[1], src[2])
    assert gather_sum(src, index[:0]).shape == (0, 32)


def test_gather_sum_reads_a_strided_source(device):
    wide = torch.randn(10, 300, device=device)
    index = _index(4, 3, 10, device)
    torch.testing.assert_close(
        gather_sum(wide[:, :200], index), gather_sum_ref(wide[:, :200].contiguous(), index)
    )


@pytest.mark.parametrize(
    "src, index, match",
    [
        (torch.zeros(4, 8), torch.zeros(3, dtype=torch.int64), "index must be 2-D"),
        (torch.zeros(4, 8), torch.zeros(3, 2), "index has dtype torch.float32"),
        (torch.zeros(4, 8, 2), torch.zeros(3, 2, dtype=torch.int64), "src must be 2-D"),
        (
            torch.zeros(4, 8, dtype=torch.int32),
            torch.zeros(3, 2, dtype=torch.int64),
            "src has dtype torch.int32",
        ),
        (torch.zeros(8, 4).t(), torch.zeros(3, 2, dtype=torch.int64), "contiguous last dimension"),
    ],
)
def test_gather_sum_rejects_bad_arguments(src, index, match):
    for op in (gather_sum, gather_sum_ref):
        with pytest.raises(ValueError, match=match):
            op(src, index)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [256, 16384])
def test_gather_sum_gpu_expert_parallel_shapes(T):
    """The combine of EP 8 at DeepSeek-V3's H: each token's rows from 1-8 ranks, bf16,
    deterministic and equal to the reference (same order of float32 sums)."""
    from nmoe_serve.model.transport import combine_index  # the variable exchange's index

    H, R = 7168, 8
    to_rank = torch.rand(T, R, device="cuda") < 0.5
    to_rank[torch.arange(T), torch.randint(0, R, (T,))] = True
    index = combine_index(to_rank)
    src = torch.randn(int(to_rank.sum()), H, device="cuda").to(torch.bfloat16)
    out = gather_sum(src, index)
    assert torch.equal(out, gather_sum_ref(src, index))
    assert torch.equal(out, gather_sum(src, index)), "not deterministic"

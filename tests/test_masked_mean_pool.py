"""masked_mean_pool: Triton kernel (interpreter on CPU) and torch path against a float64 reference."""
import os
from pathlib import Path

if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run in the interpreter


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_grace.kernels import (all_reduce_masked_mean, masked_mean_pool, masked_mean_pool_reference,
                                    masked_sum_pool_partial)
from megatron_grace.kernels._triton import use_triton
from megatron_grace.kernels.masked_mean_pool import masked_mean_pool_triton
from megatron_grace.utils import free_port

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
needs_triton = pytest.mark.skipif(not use_triton(torch.empty(0, device=DEVICE)),
                                  reason="Triton needs CUDA or TRITON_INTERPRET=1 set before triton is imported")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def torch_path(hidden, mask, normalize=False, **kwargs):
    """What the dispatcher runs off CUDA without the interpreter: the reference on an fp32 upcast."""
    return masked_mean_pool_reference(hidden.float(), mask, normalize, **kwargs)


IMPLEMENTATIONS = [pytest.param(masked_mean_pool_triton, id="triton", marks=needs_triton),
                   pytest.param(torch_path, id="torch")]


def random_mask(batch, seq_len, generator):
    """Leading zeros (a system prompt of random length) and trailing zeros (padding); row 0 has no padding and the
    last row keeps a single valid token."""
    system_len = torch.randint(0, max(seq_len // 4, 1), (batch,), generator=generator)
    end = torch.randint(1, seq_len + 1, (batch,), generator=generator).maximum(system_len + 1)
    end[0] = seq_len
    system_len[0] = min(int(system_len[0]), seq_len - 1)
    end[-1] = system_len[-1] + 1
    positions = torch.arange(seq_len)
    return (positions >= system_len[:, None]) & (positions < end[:, None])


def random_inputs(batch, seq_len, hidden_size, dtype, seq_first, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (seq_len, batch, hidden_size) if seq_first else (batch, seq_len, hidden_size)
    hidden = (torch.randn(shape, generator=generator) + 0.5).to(dtype)  # +0.5: a mean away from zero
    return hidden.to(DEVICE), random_mask(batch, seq_len, generator).to(DEVICE)


def max_error(result, exact):
    return (result.double() - exact).abs().max().item()


def assert_within_eager_error(result, eager, exact, floor):
    """The tolerance rule: error vs float64 at most twice torch eager's error in the same dtype, plus a floor."""
    assert torch.isfinite(result).all()
    error, eager_error = max_error(result, exact), max_error(eager, exact)
    assert error <= 2 * eager_error + floor, f"error {error:.3g} vs torch eager {eager_error:.3g}"


@pytest.mark.parametrize("pool", IMPLEMENTATIONS)
@pytest.mark.parametrize("seq_first", [False, True])
def test_hand_computed_mean(pool, seq_first):
    # Row 0: system prompt (token 0) excluded -> mean of [3, 4] and [5, 6]; row 1: padding (token 2) excluded.
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],
                           [[2.0, 0.0], [0.0, 4.0], [9.0, 9.0]]], device=DEVICE)
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]], device=DEVICE)
    if seq_first:
        hidden = hidden.transpose(0, 1)
    pooled = pool(hidden, mask, seq_first=seq_first)
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, torch.tensor([[4.0, 5.0], [1.0, 2.0]], device=DEVICE))
    normalized = pool(hidden, mask, True, seq_first=seq_first)
    torch.testing.assert_close(normalized, torch.tensor([[4.0, 5.0], [1.0, 2.0]], device=DEVICE)
                               / torch.tensor([[41.0 ** 0.5], [5.0 ** 0.5]], device=DEVICE))


# Odd sizes: S and H not multiples of the blocks (several S chunks and H blocks under the interpreter), and B = 1.
SHAPES = [(1, 1, 1), (1, 7, 5), (3, 300, 37), (2, 129, 259)]


@pytest.mark.parametrize("pool", IMPLEMENTATIONS)
@pytest.mark.parametrize("batch,seq_len,hidden_size", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("seq_first", [False, True])
def test_matches_float64_reference(pool, batch, seq_len, hidden_size, dtype, normalize, seq_first):
    hidden, mask = random_inputs(batch, seq_len, hidden_size, dtype, seq_first)
    result = pool(hidden, mask, normalize, seq_first=seq_first)
    assert result.shape == (batch, hidden_size) and result.dtype == torch.float32
    exact = masked_mean_pool_reference(hidden.double(), mask, normalize, seq_first=seq_first)
    eager = masked_mean_pool_reference(hidden, mask, normalize, seq_first=seq_first)
    assert_within_eager_error(result, eager, exact, floor=1e-6)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("seq_first", [False, True])
def test_backward_matches_reference_autograd(dtype, normalize, seq_first):
    hidden, mask = random_inputs(3, 150, 37, dtype, seq_first, seed=1)
    grad_pooled = torch.randn(3, 37, generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def hidden_grad(pool, hidden_in):
        leaf = hidden_in.detach().requires_grad_()
        pool(leaf, mask, normalize, seq_first=seq_first).backward(grad_pooled.to(leaf.dtype))
        return leaf.grad

    grad = hidden_grad(masked_mean_pool_triton, hidden)
    assert grad.dtype == dtype and grad.shape == hidden.shape
    exact = hidden_grad(masked_mean_pool_reference, hidden.double())
    eager = hidden_grad(masked_mean_pool_reference, hidden)
    assert_within_eager_error(grad, eager, exact, floor=1e-7)


def test_dispatcher_picks_triton_under_interpreter_or_cuda_else_torch():
    hidden, mask = random_inputs(2, 40, 33, torch.bfloat16, False)
    expected_path = masked_mean_pool_triton if use_triton(hidden) else torch_path
    assert use_triton(hidden) == (hidden.is_cuda or INTERPRETED)
    assert torch.equal(masked_mean_pool(hidden, mask, True), expected_path(hidden, mask, True))


@pytest.mark.parametrize("pool", IMPLEMENTATIONS + [pytest.param(masked_mean_pool, id="dispatcher")])
def test_empty_row_raises_naming_the_rows(pool):
    hidden, mask = random_inputs(5, 20, 8, torch.float32, False)
    mask[1] = False
    mask[3] = False
    with pytest.raises(ValueError, match=r"row\(s\) \[1, 3\] have no valid token"):
        pool(hidden, mask)
    unchecked = pool(hidden, mask, True, check_empty_rows=False)
    assert torch.isfinite(unchecked).all() and not unchecked[[1, 3]].any()


def test_mask_shape_is_checked():
    hidden, mask = random_inputs(2, 10, 4, torch.float32, seq_first=True)
    with pytest.raises(ValueError, match="mask must be"):
        masked_mean_pool(hidden, mask.T, seq_first=True)


# ----------------------------------------------------------------------------------------------------------------
# Sequence-parallel partial sums: 2 gloo ranks, each holding half of the sequence ([S, B, H] as Megatron shards it).
# ----------------------------------------------------------------------------------------------------------------
def _sequence_parallel_worker(rank, world_size, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        seq_len, batch, hidden_size = 90, 3, 37
        hidden, mask = random_inputs(batch, seq_len, hidden_size, torch.bfloat16, seq_first=True, seed=3)
        hidden, mask = hidden.cpu(), mask.cpu()
        mask[0, :60] = False  # row 0's system prompt covers rank 0's whole shard
        shard = slice(rank * seq_len // world_size, (rank + 1) * seq_len // world_size)
        sums, counts = masked_sum_pool_partial(hidden[shard], mask[:, shard], seq_first=True)
        assert sums.dtype == counts.dtype == torch.float32 and sums.shape == (batch, hidden_size)
        assert counts.tolist() == mask[:, shard].sum(1).tolist()
        pooled = all_reduce_masked_mean(sums, counts, normalize=True)
        exact = masked_mean_pool_reference(hidden.double(), mask, True, seq_first=True)
        assert max_error(pooled, exact) < 1e-6

        mask[2] = False  # empty on every shard: both ranks raise after the one all-reduce (no rank hangs)
        sums, counts = masked_sum_pool_partial(hidden[shard], mask[:, shard], seq_first=True)
        try:
            all_reduce_masked_mean(sums, counts)
        except ValueError as error:
            assert "row(s) [2]" in str(error)
        else:
            raise AssertionError("a row empty on all ranks must raise")
    finally:
        dist.destroy_process_group()


def test_partial_sums_all_reduce_on_two_gloo_ranks():
    mp.spawn(_sequence_parallel_worker, args=(2, free_port()), nprocs=2, join=True)

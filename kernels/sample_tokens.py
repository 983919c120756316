"""Token sampling for rollouts: Gumbel-max over temperature-scaled logits with counter-based noise, a Triton kernel
and its torch reference.

``sample_tokens(logits, temperatures, row_seeds, positions)`` draws one token per row from softmax(logits / T) and
returns it with its log-probability under that distribution. The Gumbel noise of (row seed, position, vocabulary id)
is a pure function of those three integers (a 32-bit integer hash), never the state of a generator, so:

* a row's tokens do not depend on its batch mates, the batch order, the data-parallel size or the resume point;
* ``positions`` is the index of the token within the row's response, so the same row gives the same tokens whatever
  padding or prefill layout put it at another column of the batch;
* under tensor parallelism each rank samples over its own vocabulary shard with the noise of the *global* ids, and one
  all-gather of four numbers per row picks the winner (:func:`sample_tokens` with ``group``): the full logits are
  never gathered, and TP2 gives the tokens of TP1.

Only [rows] tokens and log-probabilities leave the logits' device. Padded vocabulary columns (``vocab_size`` below the
shard's width) are never sampled. Temperatures must be positive (T → 0 tends to the argmax).

Dispatch (``_triton.use_triton``, shared by the ops): Triton on CUDA or under ``TRITON_INTERPRET=1``, otherwise the torch reference
with its element-wise part compiled into one pass.
"""
import torch
import torch.distributed as dist
import triton
import triton.language as tl

from ._triton import use_triton

_MASK32 = 0xFFFFFFFF
# Gumbel noise from 23 random bits: u = (k + 0.5) / 2^23 is exact in float32 and lies in [2^-24, 1 - 2^-24], so
# -log(-log(u)) is finite. (With 24 bits the top value, (2^24 - 0.5) / 2^24, rounds to 1.0 and the noise to +inf.)
_UNIFORM_BITS = 23
_UNIFORM_SCALE = 1.0 / (1 << _UNIFORM_BITS)


def row_seed(seed: int, step: int, sample_id: int, rollout_index: int) -> int:
    """A row's 63-bit sampling seed from the run seed and the row's identity (SplitMix64 finaliser of a mixed key):
    what the counter-based noise below is keyed on, so a row's tokens depend on nothing else."""
    value = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + sample_id * 0x94D049BB133111EB
             + rollout_index * 0xD6E8FEB86659FD93) & 0xFFFFFFFFFFFFFFFF
    value ^= value >> 30
    value = (value * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    value ^= value >> 27
    value = (value * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (value ^ (value >> 31)) >> 1


# ----------------------------------------------------------------------------------------------------------------
# Counter-based noise: the same integer arithmetic in torch and in Triton (int64 lanes holding 32-bit values)
# ----------------------------------------------------------------------------------------------------------------
def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (Wellons' two-multiply finaliser) on int64 values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def row_position_keys(row_seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[rows] int64 keys in [0, 2^32) from 63-bit row seeds and response positions (both int64)."""
    seed_low, seed_high = row_seeds & _MASK32, (row_seeds >> 32) & _MASK32
    return _mix32(_mix32(_mix32(seed_low) ^ seed_high) ^ (positions & _MASK32))


def gumbel_noise_reference(keys: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """float32 [rows, V] Gumbel(0, 1) noise of keys [rows] and global vocabulary ids [V]."""
    bits = _mix32(keys.unsqueeze(1) ^ _mix32(vocab_ids).unsqueeze(0))
    uniform = ((bits >> (32 - _UNIFORM_BITS)).to(torch.float32) + 0.5) * _UNIFORM_SCALE
    return -torch.log(-torch.log(uniform))


# ----------------------------------------------------------------------------------------------------------------
# Torch reference: local (one vocabulary shard) statistics
# ----------------------------------------------------------------------------------------------------------------
def _scaled_and_scores(logits, temperatures, keys, vocab_ids):
    """(logits / T, logits / T + noise), both float32 [rows, V]."""
    scaled = logits.float() / temperatures.float().unsqueeze(1)
    return scaled, scaled + gumbel_noise_reference(keys, vocab_ids)


# The CPU dispatch path: the same element-wise ops fused into one pass over [rows, V] instead of a dozen, which the
# eager reference makes through memory (the hash's integer steps are exact; the logs may round differently in the last
# bit, docs/performance.md). Dynamic shapes: the row count falls as finished rows leave the batch.
_scaled_and_scores_compiled = torch.compile(_scaled_and_scores, dynamic=True)


def _local_sample_reference(logits, temperatures, keys, valid: int, vocab_start: int, *,
                            scaled_and_scores=_scaled_and_scores):
    """Per row of this shard: best noisy score, its global id, the shard's log-sum-exp of logits / T and the winning
    scaled logit. Columns from ``valid`` on are padding."""
    vocab_ids = torch.arange(vocab_start, vocab_start + valid, device=logits.device, dtype=torch.int64)
    scaled, scores = scaled_and_scores(logits[:, :valid], temperatures, keys, vocab_ids)
    best_score, best_local = scores.max(dim=1)
    return (best_score, best_local + vocab_start, torch.logsumexp(scaled, dim=1),
            scaled.gather(1, best_local.unsqueeze(1)).squeeze(1))


def _local_sample_compiled(logits, temperatures, keys, valid: int, vocab_start: int):
    return _local_sample_reference(logits, temperatures, keys, valid, vocab_start,
                                   scaled_and_scores=_scaled_and_scores_compiled)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel: one program per row streams its logits once (online log-sum-exp and running best score)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _mix32_triton(x):
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


@triton.jit
def _sample_tokens_kernel(logits_ptr, stride_row, temperature_ptr, key_ptr, best_score_ptr, best_index_ptr,
                          log_sum_exp_ptr, best_logit_ptr, valid_columns, vocab_start, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    inverse_temperature = 1.0 / tl.load(temperature_ptr + row).to(tl.float32)
    key = tl.load(key_ptr + row)
    offsets = tl.arange(0, BLOCK)
    best_score = tl.full((), float("-inf"), tl.float32)
    best_index = tl.full((), 0, tl.int64)
    best_logit = tl.full((), 0.0, tl.float32)
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.full((), 0.0, tl.float32)
    for start in range(0, valid_columns, BLOCK):
        columns = start + offsets
        valid = columns < valid_columns
        scaled = tl.load(logits_ptr + row * stride_row + columns, mask=valid,
                         other=float("-inf")).to(tl.float32) * inverse_temperature
        bits = _mix32_triton(key ^ _mix32_triton(columns.to(tl.int64) + vocab_start))
        uniform = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)  # as _UNIFORM_BITS = 23
        scores = tl.where(valid, scaled - tl.log(-tl.log(uniform)), float("-inf"))
        block_best = tl.max(scores, axis=0)
        block_index = tl.argmax(scores, axis=0)
        block_logit = tl.sum(tl.where(offsets == block_index, scaled, 0.0), axis=0)
        better = block_best > best_score  # strict: the first maximum wins, as in torch.max
        best_index = tl.where(better, (start + block_index).to(tl.int64), best_index)
        best_logit = tl.where(better, block_logit, best_logit)
        best_score = tl.where(better, block_best, best_score)
        block_max = tl.max(scaled, axis=0)
        new_max = tl.maximum(running_max, block_max)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(scaled - new_max), axis=0)
        running_max = new_max
    tl.store(best_score_ptr + row, best_score)
    tl.store(best_index_ptr + row, best_index + vocab_start)
    tl.store(log_sum_exp_ptr + row, running_max + tl.log(running_sum))
    tl.store(best_logit_ptr + row, best_logit)


def _local_sample_triton(logits, temperatures, keys, valid: int, vocab_start: int):
    rows = logits.shape[0]
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    best_score = torch.empty(rows, dtype=torch.float32, device=logits.device)
    best_index = torch.empty(rows, dtype=torch.int64, device=logits.device)
    log_sum_exp = torch.empty_like(best_score)
    best_logit = torch.empty_like(best_score)
    # Under the interpreter the cost is per program × loop iteration: one large block.
    block = 8192 if logits.is_cuda else triton.next_power_of_2(max(valid, 16))
    _sample_tokens_kernel[(rows,)](logits, logits.stride(0), temperatures.float().contiguous(), keys.contiguous(),
                                   best_score, best_index, log_sum_exp, best_logit, valid, vocab_start, BLOCK=block)
    return best_score, best_index, log_sum_exp, best_logit


# ----------------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------------
def pick_across_shards(stacked: torch.Tensor):
    """[shards, rows, 4] (best score, global id, log-sum-exp, winning scaled logit) → (tokens, winning scaled logits,
    log-sum-exps over the whole vocabulary). The highest score wins; on a tie the first shard (lowest ids)."""
    winner = stacked[:, :, 0].argmax(dim=0)
    chosen = stacked.gather(0, winner.view(1, -1, 1).expand(1, -1, 4)).squeeze(0)
    return chosen[:, 1].long(), chosen[:, 3], torch.logsumexp(stacked[:, :, 2], dim=0)


def _combine_shards(best_score, best_index, log_sum_exp, best_logit, group):
    """One all-gather of [rows, 4] float64 values over the TP group (ids are exact in float64)."""
    packed = torch.stack([best_score.double(), best_index.double(), log_sum_exp.double(), best_logit.double()], 1)
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, packed, group=group)
    return pick_across_shards(torch.stack(parts))


def _sample(local_sample, logits, temperatures, row_seeds, positions, vocab_size, vocab_start, group):
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, vocab], got {tuple(logits.shape)}")
    width = logits.shape[1]
    valid = width if vocab_size is None else max(min(width, vocab_size - vocab_start), 0)  # this shard's real columns
    keys = row_position_keys(row_seeds.to(logits.device, torch.int64), positions.to(logits.device, torch.int64))
    best_score, best_index, log_sum_exp, best_logit = local_sample(logits, temperatures.to(logits.device), keys,
                                                                   valid, vocab_start)
    if group is not None and dist.get_world_size(group) > 1:
        tokens, best_logit, log_sum_exp = _combine_shards(best_score, best_index, log_sum_exp, best_logit, group)
    else:
        tokens = best_index
    return tokens, (best_logit.double() - log_sum_exp.double()).float()


def sample_tokens_reference(logits, temperatures, row_seeds, positions, *, vocab_size=None, vocab_start=0,
                            group=None):
    """Torch reference of :func:`sample_tokens` (same noise, same combination across shards)."""
    return _sample(_local_sample_reference, logits, temperatures, row_seeds, positions, vocab_size, vocab_start,
                   group)


def sample_tokens(logits, temperatures, row_seeds, positions, *, vocab_size=None, vocab_start=0, group=None):
    """Sample one token per row. ``logits`` [rows, V_shard] (this rank's vocabulary shard, starting at global id
    ``vocab_start``; columns from ``vocab_size`` on are padding and never drawn), ``temperatures`` [rows] (> 0),
    ``row_seeds`` [rows] int64, ``positions`` [rows] int64 (index of the token in the row's response). ``group``: the
    TP group the vocabulary is split over. Returns (tokens [rows] int64, log-probs [rows] float32 under
    softmax(logits / T) over the whole vocabulary)."""
    local_sample = _local_sample_triton if use_triton(logits) else _local_sample_compiled
    return _sample(local_sample, logits, temperatures, row_seeds, positions, vocab_size, vocab_start, group)

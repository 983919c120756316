"""kernels/sample_tokens.py: counter-based Gumbel-max sampling.

* Triton kernel (interpreter on CPU, compiled on GPU) = torch reference: identical tokens, log-probs ≤ 1e-5 absolute
  (float32 online log-sum-exp vs torch.logsumexp), and log-probs = float64 log_softmax(logits / T)[token] ≤ 1e-5.
* The CPU dispatch path (the reference with its element-wise part compiled) = the eager reference: identical tokens,
  and log-probs to 1e-6 (a log may round differently in the last bit), over row counts the compaction produces.
* Batch invariance: a row's token does not depend on its batch mates or their order.
* Vocabulary shards (TP): sampling each shard with its global ids and picking across shards gives the tokens and
  log-probs of the whole vocabulary (≤ 1e-6).
* Frequencies (the reference, whose noise the kernel reproduces): 40,000 draws of one row (distinct positions) over
  8 tokens pass a chi-square test against
  softmax(logits / T) at p = 0.001 (critical value 24.32 for 7 degrees of freedom).
* T → 0 gives the argmax; padded vocabulary columns are never drawn.
* On every device there is (CUDA where present, the CPU interpreter otherwise), float32 logits: the kernel draws the
  CPU reference's tokens for the same seeds (the noise is integer arithmetic, the same on both), and its draws follow
  the tempered softmax (the chi-square test above, run there).
"""
import pytest
import torch

from megatron_grace.kernels.sample_tokens import (_local_sample_compiled, _local_sample_reference, _sample,
                                                  pick_across_shards, sample_tokens, sample_tokens_reference)


def inputs(rows=6, vocab=1000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator) * 3
    temperatures = torch.tensor([1.0, 0.5, 1.0, 2.0, 0.7, 1.0])[:rows]
    row_seeds = torch.randint(0, 2**62, (rows,), generator=generator)
    positions = torch.randint(0, 2048, (rows,), generator=generator)
    return logits, temperatures, row_seeds, positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_reference_and_float64_log_probs(dtype):
    logits, temperatures, row_seeds, positions = inputs()
    logits = logits.to(dtype)
    tokens, log_probs = sample_tokens(logits, temperatures, row_seeds, positions, vocab_size=990)
    ref_tokens, ref_log_probs = sample_tokens_reference(logits, temperatures, row_seeds, positions, vocab_size=990)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(log_probs, ref_log_probs, rtol=0, atol=1e-5)
    exact = torch.log_softmax(logits[:, :990].double() / temperatures.double().unsqueeze(1), dim=1)
    torch.testing.assert_close(log_probs.double(), exact.gather(1, tokens.unsqueeze(1)).squeeze(1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("rows", [40, 17, 1])
def test_compiled_cpu_path_equals_the_eager_reference(rows):
    generator = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, 49_152, generator=generator) * 4
    temperatures = torch.rand(rows, generator=generator) + 0.3
    row_seeds = torch.randint(0, 2**62, (rows,), generator=generator)
    positions = torch.randint(0, 2048, (rows,), generator=generator)
    compiled = _sample(_local_sample_compiled, logits, temperatures, row_seeds, positions, 49_000, 0, None)
    eager = _sample(_local_sample_reference, logits, temperatures, row_seeds, positions, 49_000, 0, None)
    assert torch.equal(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1], rtol=0, atol=1e-6)


def test_rows_do_not_depend_on_batch_mates_or_order():
    logits, temperatures, row_seeds, positions = inputs()
    tokens, _ = sample_tokens(logits, temperatures, row_seeds, positions)
    order = torch.tensor([4, 0, 5, 2, 1, 3])
    shuffled, _ = sample_tokens(logits[order], temperatures[order], row_seeds[order], positions[order])
    assert torch.equal(shuffled, tokens[order])
    for row in range(len(tokens)):
        alone, _ = sample_tokens(logits[row: row + 1], temperatures[row: row + 1], row_seeds[row: row + 1],
                                 positions[row: row + 1])
        assert alone.item() == tokens[row].item()


def test_vocabulary_shards_give_the_whole_vocabulary_result():
    logits, temperatures, row_seeds, positions = inputs()
    vocab_size, shards = 990, 4  # 250 columns per shard, the last one with 10 padded columns
    from megatron_grace.kernels.sample_tokens import row_position_keys

    keys = row_position_keys(row_seeds, positions)
    width = logits.shape[1] // shards
    stacked = torch.stack([torch.stack([value.double() for value in _local_sample_reference(
        logits[:, shard * width: (shard + 1) * width], temperatures, keys, min(width, vocab_size - shard * width),
        shard * width)], dim=1)
        for shard in range(shards)])
    tokens, winning_logit, log_sum_exp = pick_across_shards(stacked)
    expected_tokens, expected_log_probs = sample_tokens_reference(logits, temperatures, row_seeds, positions,
                                                                  vocab_size=vocab_size)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close((winning_logit - log_sum_exp).float(), expected_log_probs, rtol=0, atol=1e-6)


def test_frequencies_follow_the_tempered_softmax():
    draws, temperature = 40_000, 0.8
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2]]).expand(draws, -1)
    # The reference: its noise is the kernel's (first test), and 40,000 interpreted kernel programs would take minutes.
    tokens, _ = sample_tokens_reference(logits.contiguous(), torch.full((draws,), temperature),
                                        torch.full((draws,), 12345), torch.arange(draws))
    observed = torch.bincount(tokens, minlength=8).double()
    expected = torch.softmax(logits[0].double() / temperature, dim=0) * draws
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    assert chi_square < 24.32, chi_square


def test_low_temperature_is_argmax_and_padding_is_never_drawn():
    logits, _, row_seeds, positions = inputs()
    logits[:, 995:] = 1e4  # padded columns with huge logits
    tokens, log_probs = sample_tokens(logits, torch.full((6,), 1e-4), row_seeds, positions, vocab_size=995)
    assert torch.equal(tokens, logits[:, :995].argmax(dim=1))
    assert torch.all(log_probs > -1e-3)


def _inverse_mix32(value: int) -> int:
    """The inverse of kernels.sample_tokens._mix32, by hand: xor-shifts undone by repeated shifting, multiplications
    by the constants' inverses modulo 2^32."""
    def unshift(x, shift):
        result = x
        for _ in range(32 // shift):
            result = x ^ (result >> shift)
        return result & 0xFFFFFFFF

    value = unshift(value, 15)
    value = (value * pow(0x735A2D97, -1, 1 << 32)) & 0xFFFFFFFF
    value = unshift(value, 15)
    value = (value * pow(0x21F0AAAD, -1, 1 << 32)) & 0xFFFFFFFF
    return unshift(value, 16)


@pytest.mark.parametrize("hash_bits", [0xFFFFFFFF, 0xFFFFFF00, 0x000000FF])
def test_extreme_hash_values_give_finite_noise(hash_bits):
    """A token whose hash is all ones (or zero) gets finite noise and is drawn by its logit, not always.

    Regression: u = (bits >> 8 + 0.5) / 2^24 rounded to 1.0 in float32 for the top value, the noise became +inf and
    that token won whatever its logit (one token in 2^24 per row and position: ~0.3 % of tokens at vocab 49,152)."""
    from megatron_grace.kernels.sample_tokens import _mix32, gumbel_noise_reference, row_position_keys

    vocab_id, row_seed_low = 3, None
    # Choose the row seed (high half 0, position 0) whose key makes hash(key ^ mix(vocab id)) == hash_bits.
    key = _inverse_mix32(hash_bits) ^ int(_mix32(torch.tensor(vocab_id)))
    row_seed_low = _inverse_mix32(_inverse_mix32(_inverse_mix32(key)))
    row_seeds, positions = torch.tensor([row_seed_low]), torch.tensor([0])
    assert int(row_position_keys(row_seeds, positions)) == key
    noise = gumbel_noise_reference(torch.tensor([key]), torch.arange(8))
    assert torch.isfinite(noise).all() and float(noise.abs().max()) < 20.0
    logits = torch.zeros(1, 8)
    logits[0, vocab_id] = -60.0  # exp(-60): never drawn from softmax
    for sample in (sample_tokens, sample_tokens_reference):
        token, log_prob = sample(logits, torch.ones(1), row_seeds, positions)
        assert int(token) != vocab_id and torch.isfinite(log_prob).all(), sample.__name__


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_on_each_device_draws_the_cpu_references_tokens(device):
    generator = torch.Generator().manual_seed(11)
    rows = 64
    logits = torch.randn(rows, 151_936 if device == "cuda" else 4_000, generator=generator) * 3
    temperatures = torch.rand(rows, generator=generator) + 0.3
    row_seeds = torch.randint(0, 2**62, (rows,), generator=generator)
    positions = torch.randint(0, 2048, (rows,), generator=generator)
    expected, expected_log_probs = sample_tokens_reference(logits, temperatures, row_seeds, positions)
    tokens, log_probs = sample_tokens(logits.to(device), temperatures.to(device), row_seeds.to(device),
                                      positions.to(device))
    assert torch.equal(tokens.cpu(), expected)
    torch.testing.assert_close(log_probs.cpu(), expected_log_probs, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: on CPU the reference's frequencies are tested "
                                                          "above and the interpreted kernel equals the reference")
def test_device_frequencies_follow_the_tempered_softmax():
    device = "cuda"
    draws = 40_000
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2]]).expand(draws, -1).contiguous()
    temperature = 0.8
    tokens, _ = sample_tokens(logits.to(device), torch.full((draws,), temperature, device=device),
                              torch.full((draws,), 777, device=device), torch.arange(draws, device=device))
    counts = torch.bincount(tokens.cpu(), minlength=8).double()
    expected = torch.softmax(logits[0].double() / temperature, dim=0) * draws
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 24.32, chi_square  # p = 0.001, 7 degrees of freedom

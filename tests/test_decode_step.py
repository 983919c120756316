"""Our decode step (megatron_grace/rollout/decode_step.py) against Megatron-Core, on tiny Llama / Qwen2 / Qwen3 (TP1,
one process; TP2 runs in tests/distributed/layouts_worker.py).

* Logits at every position equal the Megatron forward's over the same left-padded batch (rows with different starts,
  absolute positions, the padding mask the engine builds): float64 to 1e-10, bf16 to 0.05 absolute on logits of
  magnitude ~5 (both sides round activations to bf16 in every layer; the order of the roundings differs).
* Whole rollouts equal the Megatron-decoded engine's (float64: same tokens, log-probs to 1e-9), compaction on and off.
* Capturability proxy (the CUDA graph itself needs a GPU): one whole engine step (model step, sampler, bookkeeping)
  compiles with ``torch.compile(fullgraph=True, dynamic=False)`` and gives the eager step's tokens, state and results.
* With the Triton decode attention (interpreter on CPU, the op the GPU step uses) the step gives the torch path's
  logits.
"""
import os
from pathlib import Path
from types import SimpleNamespace

if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from megatron_grace.config import RolloutConfig
from megatron_grace.kernels.decode_attention import decode_attention_triton
from megatron_grace.kernels._triton import use_triton
from megatron_grace.kernels.sample_tokens import sample_tokens_reference
from megatron_grace.models import architecture_from_hf_config
from megatron_grace.models.builder import build_gpt_model, make_transformer_config
from megatron_grace.models.hf_io import load_hf_weights
from megatron_grace.platform import ParallelLayout, destroy_distributed, initialize_distributed
from megatron_grace.rollout import RolloutEngine, RolloutRequest
from megatron_grace.kernels.sample_tokens import row_seed
from megatron_grace.rollout.decode_step import KVCache, decode_step, stage_weights
from megatron_grace.rollout.engine import RolloutResults, SamplingSetup, sample_and_record
from megatron_grace.testing import FAMILIES, decode_logits_column_by_column, left_padded_batch, tiny_hf_model

EOS = 2
VOCAB = 512


@pytest.fixture(scope="module", autouse=True)
def distributed():
    initialize_distributed(ParallelLayout())
    yield
    destroy_distributed()


_STAGES = {}


def stage_of(family: str, dtype: torch.dtype, *, ending: bool = False):
    """A tiny policy stage with weights from HF; ``ending``: an EOS row scaled up so that some responses end (untied
    families; it also scales the EOS logit's rounding error, so the logits test runs without it)."""
    if (family, dtype, ending) not in _STAGES:
        scale = 50.0 if ending and family == "qwen3" else 1.0
        hf_model = tiny_hf_model(family, eos_token_id=EOS, vocab_size=VOCAB, eos_logit_scale=scale)
        arch = architecture_from_hf_config({**hf_model.config.to_dict(),
                                            "architectures": [type(hf_model).__name__]})
        stage = build_gpt_model(arch, make_transformer_config(arch, params_dtype=dtype))
        load_hf_weights(stage, hf_model.state_dict(), arch)
        _STAGES[family, dtype, ending] = stage.eval()
    return _STAGES[family, dtype, ending]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.bfloat16, 5e-2)])
def test_logits_equal_the_megatron_forward_at_every_position(family, dtype, tolerance):
    stage = stage_of(family, dtype)
    tokens, starts, mask = left_padded_batch([9, 4, 13, 1], VOCAB, torch.Generator().manual_seed(0))
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        expected = stage(tokens, positions, mask)  # [rows, width, V]: batch-first logits
        ours = decode_logits_column_by_column(stage, tokens, starts)
    real = torch.arange(tokens.shape[1]).unsqueeze(0) >= starts.unsqueeze(1)
    assert ours.dtype == dtype and real.sum() == 27
    vocab = stage.arch.vocab_size
    torch.testing.assert_close(ours[real][:, :vocab].double(), expected[real][:, :vocab].double(), rtol=0,
                               atol=tolerance)


@pytest.mark.skipif(not use_triton(torch.empty(0)), reason="needs TRITON_INTERPRET=1 set before triton is imported")
def test_triton_attention_in_the_step_gives_the_torch_paths_logits():
    stage = stage_of("qwen2", torch.float32)
    tokens, starts, _ = left_padded_batch([6, 3], VOCAB, torch.Generator().manual_seed(1))

    def triton_attention(query, keys, values, starts, ends, scale, key_length):
        return decode_attention_triton(query, keys, values, starts, ends, scale, num_splits=2)

    with torch.no_grad():
        expected = decode_logits_column_by_column(stage, tokens, starts)
        ours = decode_logits_column_by_column(stage, tokens, starts, attention=triton_attention)
    real = torch.arange(tokens.shape[1]).unsqueeze(0) >= starts.unsqueeze(1)
    torch.testing.assert_close(ours[real], expected[real], rtol=0, atol=1e-5)


def requests(count=6):
    generator = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (length,), generator=generator).tolist() for length in (5, 11, 8)]
    return [RolloutRequest(prompts[row % 3], 1.0 if row < 4 else 0.5, row_seed(1234, 3, sample_id=row,
                                                                               rollout_index=row // 3))
            for row in range(count)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("compact", [True, False])
def test_rollouts_equal_the_megatron_decoded_engine(family, compact):
    stage = stage_of(family, torch.float64, ending=True)
    rollouts = {}
    for decode in ("ours", "megatron"):
        engine = RolloutEngine(stage, RolloutConfig(rollout_sync_interval=2, rollout_decode_step=decode),
                               eos_token_ids=[EOS], pad_token_id=0, compact_finished_rows=compact)
        rollouts[decode] = engine.generate(requests(), 12)
        assert engine.stats.decode_step == decode
    if family == "qwen3":  # the scaled EOS row ends some responses early: compaction has rows to drop
        assert any(not r.truncated for r in rollouts["ours"]) and any(r.truncated for r in rollouts["ours"])
    for ours, reference in zip(rollouts["ours"], rollouts["megatron"]):
        assert ours.response == reference.response and ours.truncated == reference.truncated
        torch.testing.assert_close(torch.tensor(ours.log_probs, dtype=torch.float64),
                                   torch.tensor(reference.log_probs, dtype=torch.float64), rtol=0, atol=1e-6)


def emulated_capture(run, before_capture, pool):
    """What a CUDA graph does, on CPU: the warm-up runs, the state is restored, and a replay runs the captured step
    again on the same tensors (the compile test below checks the step has nothing a replay could not repeat)."""
    run()
    before_capture()
    return SimpleNamespace(replay=run, pool=lambda: None)


@pytest.mark.parametrize("sync_interval", [1, 3])
def test_row_buckets_with_padding_rows_give_the_eager_tokens(sync_interval):
    """The CUDA-graph path's bookkeeping on CPU: rows decode in power-of-two buckets padded with done rows that write
    to a scratch row, each bucket's step captured once after a warm-up whose effects are undone."""
    stage = stage_of("qwen3", torch.float64, ending=True)
    rows = requests(7)
    results = {}
    for graphed in (False, True):
        engine = RolloutEngine(stage, RolloutConfig(rollout_sync_interval=sync_interval), eos_token_ids=[EOS],
                               pad_token_id=0)
        if graphed:
            engine.graph_capture = emulated_capture
        results[graphed] = (engine.generate(rows, 12), engine.stats)
    (eager, eager_stats), (graphed, stats) = results[False], results[True]
    assert eager_stats.graphed_buckets == [] and stats.graphed_buckets
    assert set(stats.forward_rows) <= {7, 4, 2, 1} and set(stats.graphed_buckets) == set(stats.forward_rows)
    assert stats.forward_rows[-1] < 7  # rows finished and the batch moved to a smaller bucket
    for ours, reference in zip(graphed, eager):
        assert ours.response == reference.response and ours.truncated == reference.truncated
        assert ours.log_probs == reference.log_probs


def test_row_buckets():
    from megatron_grace.rollout.engine import row_buckets

    assert row_buckets(80) == [1, 2, 4, 8, 16, 32, 64, 80]
    assert row_buckets(64) == [1, 2, 4, 8, 16, 32, 64] and row_buckets(1) == [1] and row_buckets(3) == [1, 2, 3]


def test_the_whole_step_compiles_without_graph_breaks_and_gives_the_same_tokens():
    """What a CUDA graph needs from the step, checked on CPU: ``fullgraph=True`` fails on any graph break (a host
    read, a data-dependent shape, an unsupported Python construct), ``dynamic=False`` on shapes that change."""
    stage = stage_of("qwen3", torch.float32, ending=True)
    rows, width, max_new = 4, 24, 8
    tokens, starts, mask = left_padded_batch([7, 3, 9, 5], VOCAB, torch.Generator().manual_seed(2))
    prefill_end = tokens.shape[1]
    weights = stage_weights(stage, width)
    setup = SamplingSetup(vocab_size=stage.arch.vocab_size, vocab_start=0, tp_group=None,
                          eos_ids=torch.tensor([EOS]), pad_token_id=0, max_new_tokens=max_new)

    def fresh():
        cache = KVCache.allocate(weights, rows, width, torch.float32, "cpu")
        for column in range(prefill_end - 1):  # fill the prompt's cache with the step itself
            positions = torch.full((rows,), column)
            decode_step(weights, cache, tokens[:, column], positions, torch.minimum(starts, positions))
        state = {"tokens": torch.nn.functional.pad(tokens, (0, width - prefill_end)),
                 "temperatures": torch.tensor([1.0, 0.7, 1.0, 0.5]), "row_seeds": torch.arange(rows) * 977 + 5,
                 "prompt_starts": starts, "response_starts": torch.full((rows,), prefill_end),
                 "done": torch.zeros(rows, dtype=torch.bool), "rows": torch.arange(rows),
                 "input_tokens": tokens[:, -1].clone(), "positions": torch.full((rows,), prefill_end - 1)}
        return cache, state, RolloutResults.allocate(rows, max_new, "cpu")

    def step(cache, state, results):
        logits = decode_step(weights, cache, state["input_tokens"], state["positions"], state["prompt_starts"])
        column = state["positions"] + 1
        state["input_tokens"].copy_(sample_and_record(state, logits, column, results, setup,
                                                      sampler=sample_tokens_reference))
        state["positions"].copy_(column)

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    outcomes = []
    for run in (step, compiled):
        cache, state, results = fresh()
        with torch.no_grad():
            for _ in range(max_new):
                run(cache, state, results)
        outcomes.append((state, results))
    (eager_state, eager), (compiled_state, ours) = outcomes
    assert (eager.lengths[:rows] >= 1).all() and eager_state["done"].any()  # EOS ended some rows, others ran on
    assert torch.equal(ours.responses, eager.responses) and torch.equal(ours.lengths, eager.lengths)
    torch.testing.assert_close(ours.log_probs, eager.log_probs, rtol=0, atol=1e-5)
    assert torch.equal(compiled_state["done"], eager_state["done"])

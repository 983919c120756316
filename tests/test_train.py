"""GRACE training end to end on a tiny model (one 4-rank torchrun launch, see distributed/train_worker.py).

Tolerances: across layouts (TP1PP1/DP4 vs TP2PP2/DP1) the rollout tokens are identical (seeded per row), so response
lengths and truncation match exactly and float metrics to 1e-4 relative (reduction order differs); a resume at the
same layout is exact (==); a resume at another layout matches to 1e-4.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from megatron_grace.testing import LAYOUT_DEPENDENT_METRICS, run_torchrun, save_tiny_hf_model

WORKER = Path(__file__).parent / "distributed" / "train_worker.py"
DATA = Path(__file__).resolve().parent.parent / "examples" / "data"
EXACT_KEYS = ("step", "response_length_mean", "response_length_max", "query_response_length_mean",
              "truncation_rate")


@pytest.fixture(scope="module")
def train_results(tmp_path_factory, smollm2_tokenizer_dir):
    work = tmp_path_factory.mktemp("train")
    # The tokenizer's exact vocabulary (no TP padding), as real models have: log-probs take the labels= path.
    model = save_tiny_hf_model("qwen3", work / "tiny", smollm2_tokenizer_dir, eos_logit_scale=70.0, vocab_size=49152)
    supervised = work / "supervised.jsonl"
    supervised.write_text("".join((DATA / "train_supervised.jsonl").read_text().splitlines(True)[:32]))
    unsupervised = work / "unsupervised.txt"
    unsupervised.write_text("".join((DATA / "train_unsupervised.txt").read_text().splitlines(True)[:32]))
    run_torchrun(WORKER, model, supervised, unsupervised, work, nproc=4)
    return {**json.loads((work / "results.json").read_text()), "work": str(work)}


def assert_metrics_close(actual: dict, expected: dict, rel: float, *, across_layouts: bool = False) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if across_layouts and key in LAYOUT_DEPENDENT_METRICS:
            assert 0.0 <= actual[key] < 1.0 and 0.0 <= value < 1.0, key
            continue
        if key in EXACT_KEYS or rel == 0:
            assert actual[key] == value or (math.isnan(value) and math.isnan(actual[key])), key
        else:
            assert actual[key] == pytest.approx(value, rel=rel, abs=1e-5), key


def test_rewards_and_updates_are_real(train_results):
    first = train_results["tp1pp1"][0]
    assert 0 < first["truncation_rate"] < 1  # both finished and truncated responses
    assert first["reward_std"] > 0 and first["advantage_abs_max"] > 0
    assert abs(first["advantage_mean"]) < 1e-5  # mean-centred per group
    assert first["grad_norm"] > 0 and first["loss"] != 0
    assert first["logprob_mismatch"] < 1e-4  # rollout vs training forward log-probs
    for term in ("pos", "neg", "clust", "cross"):
        assert -1.0 <= first[f"reward_{term}_mean"] <= 1.0
    # Each term's share of the advantage variance: they add up to one, and in the code variant the negative and
    # cross-group terms are constant within a group, so the group-mean baseline cancels them.
    shares = {term: first[f"advantage_share_{term}"] for term in ("pos", "neg", "clust", "cross", "length")}
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
    assert abs(shares["neg"]) < 1e-9 and abs(shares["cross"]) < 1e-9 and shares["pos"] != 0
    # The policy changes between steps: step 2 samples from updated weights.
    assert train_results["tp1pp1"][1] != first


def test_tp2pp2_matches_tp1pp1(train_results):
    for ours, reference in zip(train_results["tp2pp2"], train_results["tp1pp1"]):
        assert_metrics_close(ours, reference, rel=1e-4, across_layouts=True)


def test_export_of_the_live_model_equals_the_checkpoint_conversion(train_results, tmp_path):
    """``--export-hf`` gathers the TP2PP2 model of the running job to rank 0 (TP shards, fused gate/up, pipeline
    stages, tied output layer); converting the same step's checkpoint with ``tools/convert_hf.py`` must give the
    same HF folder, every tensor bit-identical."""
    from safetensors.torch import load_file

    from tools.convert_hf import main as convert

    work = Path(train_results["work"])
    converted = tmp_path / "converted"
    convert(["mcore-to-hf", "--load", str(work / "run" / "iter_0000003"), "--save", str(converted)])
    exported = load_file(work / "export_tp2pp2" / "model.safetensors")
    expected = load_file(converted / "model.safetensors")
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (work / "export_tp2pp2" / name).read_text() == (converted / name).read_text(), name


def test_resume_is_exact(train_results):
    uninterrupted = train_results["uninterrupted"]
    assert train_results["uninterrupted"][:2] == [{**m} for m in train_results["tp2pp2"]]
    assert len(train_results["resumed_tp2pp2"]) == 1
    assert_metrics_close(train_results["resumed_tp2pp2"][0], uninterrupted[2], rel=0)
    assert_metrics_close(train_results["resumed_tp1pp1"][0], uninterrupted[2], rel=1e-4, across_layouts=True)


def test_unsupervised_mode(train_results):
    sequence_parallel, = train_results["unsupervised_tp2_sp"]
    reference, = train_results["unsupervised_tp1"]
    assert sequence_parallel["reward_neg_mean"] == 0.0  # no negative stream
    assert_metrics_close(sequence_parallel, reference, rel=1e-4, across_layouts=True)


def test_kl_and_entropy_terms(train_results):
    step, = train_results["kl_entropy_tp2pp2"]
    # First step: policy == reference, so the KL is exactly 0 before any update; entropy of a random model is large.
    assert step["kl"] == pytest.approx(0.0, abs=1e-6)
    assert step["entropy"] > 1.0


def test_per_rollout_reward_variant_reaches_the_advantage(train_results):
    per_rollout, = train_results["per_rollout_tp2pp2"]
    code = train_results["tp1pp1"][0]
    # Same policy, same rollouts: the terms both variants share agree; neg and cross are measured per rollout.
    for key in ("reward_pos_mean", "reward_clust_mean", "response_length_mean", "truncation_rate"):
        assert per_rollout[key] == pytest.approx(code[key], rel=1e-4, abs=1e-6), key
    assert per_rollout["reward_neg_mean"] != pytest.approx(code["reward_neg_mean"], abs=1e-4)
    shares = {term: per_rollout[f"advantage_share_{term}"] for term in ("pos", "neg", "clust", "cross", "length")}
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
    assert abs(shares["neg"]) > 1e-4 and abs(shares["cross"]) > 1e-4


def test_log_probs_follow_the_sampling_temperature(train_results):
    """Rollouts at T 0.7: the one-pass forward's old log-probs are taken under softmax(logits / 0.7), the
    distribution the tokens came from, so they match the sampler's (at T 1 they would differ by ~0.3 per token on a
    real model). Same rollouts as at T 1 would not be: the tokens change, so only the mismatch is compared."""
    tempered, = train_results["tempered_tp2pp2"]
    assert tempered["logprob_mismatch"] < 1e-4
    assert tempered["grad_norm"] > 0


def test_infonce_learns_the_same_at_every_layout(train_results):
    first, second = train_results["infonce_tp1pp1"]
    assert first["loss"] > 0 and first["grad_norm"] > 0 and 0 <= first["top1_accuracy"] <= 1
    assert -1 <= first["negative_cos_mean"] < first["reward_pos_mean"] <= 1  # a tiny random model still ranks
    assert first["response_length_mean"] == 0.0 and first["truncation_rate"] == 0.0  # no rationale
    assert second["loss"] != first["loss"]  # the update moved the embeddings
    # DP4 gathers the in-batch candidates from four ranks, DP1 holds them all: same loss, same gradients.
    for ours, reference in zip(train_results["infonce_tp2pp2"], train_results["infonce_tp1pp1"]):
        assert_metrics_close(ours, reference, rel=1e-4, across_layouts=True)


def test_infonce_with_sequence_parallel_pooling(train_results):
    # Step 2 runs on the weights step 1's gradients produced, so it checks the backward through the sharded pool.
    for ours, reference in zip(train_results["infonce_tp2_sp"], train_results["infonce_tp2"]):
        assert_metrics_close(ours, reference, rel=1e-4, across_layouts=True)


def test_infonce_resume_is_exact(train_results):
    uninterrupted = train_results["infonce_uninterrupted"]
    assert uninterrupted[:2] == train_results["infonce_tp2pp2"]
    resumed, = train_results["infonce_resumed"]
    assert_metrics_close(resumed, uninterrupted[2], rel=0)


def test_simcse_dropout_views_and_layouts(train_results):
    reference = train_results["simcse_tp1pp4"]
    first = reference[0]
    # Two dropout views of each text: similar but not identical, and the loss trains on telling texts apart.
    assert 0.5 < first["reward_pos_mean"] < 1 - 1e-4
    assert first["loss"] > 0 and first["grad_norm"] > 0
    # The masks are seeded per (micro-batch, global layer number): the pipeline layout does not change them.
    for ours, expected in zip(train_results["simcse_tp2pp2"], reference):
        assert_metrics_close(ours, expected, rel=1e-4, across_layouts=True)

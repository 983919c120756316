"""The contrastive baselines (megatron_grace/contrastive.py) against independent references:

* the InfoNCE loss against a float64 computation written out term by term;
* the two-pass (GradCache) gradient of the Megatron model against plain back-propagation through the HF transformers
  model with the same weights in float64: loss and parameter gradients;
* SimCSE's dropout replay: the gradient pass sees exactly the masks of the embedding pass.
Layout equality (TP2PP2 = TP1PP1) and the trainer end to end run in tests/distributed/train_worker.py.
"""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_grace.contrastive import ContrastiveRows, contrastive_backward, info_nce_loss_sum
from megatron_grace.data.prompts import PromptBuilder
from megatron_grace.grpo.experience import one_pass_forward, pool_hidden
from megatron_grace.models import architecture_from_hf_dir
from megatron_grace.models.builder import build_gpt_model, make_transformer_config
from megatron_grace.models.hf_io import load_hf_weights
from megatron_grace.config import OptimConfig
from megatron_grace.optim import wrap_for_training
from megatron_grace.platform import ParallelLayout, destroy_distributed, initialize_distributed
from megatron_grace.schedule import run_microbatches
from megatron_grace.testing import save_tiny_hf_model
from megatron_grace.utils import unwrap

QUERIES = ["impose and collect", "put quickly or forcibly", "work as a page"]
POSITIVES = ["levy, impose: levy a fine", "clap: The judge clapped him in jail", "page: He is paging in Congress"]
NEGATIVES = ["tithe: The church was tithed", "recess: recess lights", "pull one's weight: Bob never pulled his"]
TEMPERATURE = 0.05


def test_info_nce_matches_float64_hand_computation():
    generator = torch.Generator().manual_seed(0)
    anchors, candidates = torch.randn(5, 16, generator=generator), torch.randn(12, 16, generator=generator)
    expected = 0.0
    for i in range(5):
        a = anchors[i].double()
        logits = [float(a @ c.double() / (a.norm() * c.double().norm())) / TEMPERATURE for c in candidates]
        expected += math.log(sum(math.exp(value) for value in logits)) - logits[i]
    loss_sum, similarities = info_nce_loss_sum(anchors, candidates, TEMPERATURE)
    assert similarities.shape == (5, 12)
    assert abs(float(loss_sum) - expected) <= 1e-4 * abs(expected)  # fp32 logits up to 1/τ = 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_tokenizer_dir):
    hf_dir = save_tiny_hf_model("qwen3", tmp_path_factory.mktemp("tiny"), smollm2_tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    builder = PromptBuilder(tokenizer)
    return hf_dir, tokenizer, builder


def _megatron_model(hf_dir, hidden_dropout=0.0):
    arch = architecture_from_hf_dir(hf_dir)
    model = build_gpt_model(arch, make_transformer_config(arch, hidden_dropout=hidden_dropout))
    load_hf_weights(model, hf_dir, arch)
    ddp_model, _ = wrap_for_training(model, OptimConfig())
    return arch, ddp_model


def test_two_pass_gradient_equals_backprop_through_hf(tiny):
    hf_dir, tokenizer, builder = tiny
    prompts = [builder.build(text) for text in QUERIES + POSITIVES + NEGATIVES]
    rows = ContrastiveRows(prompts, groups=3, num_negatives=1)

    # Reference: the HF model in float64, embeddings with gradients, the loss written out, one backward.
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64)
    pooled = []
    for prompt in prompts:
        hidden = hf(torch.tensor([prompt.input_ids]), output_hidden_states=True).hidden_states[-1][0]
        pooled.append(hidden[prompt.pool_start:].mean(dim=0))
    embeddings = torch.nn.functional.normalize(torch.stack(pooled), dim=-1)
    logits = embeddings[:3] @ embeddings[3:].T / TEMPERATURE
    expected_loss = (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()
    expected_loss.backward()

    initialize_distributed(ParallelLayout())
    try:
        arch, model = _megatron_model(hf_dir)
        batch = rows.sequence_batch(pad_token_id=tokenizer.pad_token_id)
        # 9 rows in micro-batches of 2: the last one carries a filler row, whose gradient must not count.
        outputs, metrics = contrastive_backward(model, batch, rows, micro_batch_size=2, temperature=TEMPERATURE,
                                                hidden_size=arch.hidden_size)
        stage = unwrap(model)
        grads = {"final norm": (stage.decoder.final_layernorm.weight.main_grad, hf.model.norm.weight.grad),
                 "layer 0 fc2": (stage.decoder.layers[0].mlp.linear_fc2.weight.main_grad,
                                 hf.model.layers[0].mlp.down_proj.weight.grad),
                 "word embeddings": (stage.embedding.word_embeddings.weight.main_grad[: arch.vocab_size],
                                     hf.model.embed_tokens.weight.grad)}
    finally:
        destroy_distributed()
    assert len(outputs) == 5
    assert abs(metrics["loss"] - float(expected_loss)) <= 1e-5 * float(expected_loss)
    for name, (ours, reference) in grads.items():
        scale = float(reference.abs().max())
        assert scale > 0, name
        # fp32 (ours) against fp64: errors relative to the largest entry.
        torch.testing.assert_close(ours.double() / scale, reference / scale, rtol=0, atol=2e-4, msg=name)


def test_simcse_dropout_masks_replay_in_the_gradient_pass(tiny):
    hf_dir, tokenizer, builder = tiny
    prompts = [builder.build(text) for text in POSITIVES]
    rows = ContrastiveRows(prompts * 2, groups=3, num_negatives=0)
    initialize_distributed(ParallelLayout())
    try:
        _, model = _megatron_model(hf_dir, hidden_dropout=0.1)
        batch = rows.sequence_batch(pad_token_id=tokenizer.pad_token_id)
        first = one_pass_forward(model, batch, 2, dropout_seed=7).embeddings
        again = one_pass_forward(model, batch, 2, dropout_seed=7).embeddings
        other_seed = one_pass_forward(model, batch, 2, dropout_seed=8).embeddings
        no_dropout = one_pass_forward(model, batch, 2).embeddings

        def collect(micro, output):
            pooled = pool_hidden(output.hidden, micro["pool_mask"])
            keep = ~micro["is_filler"]
            return pooled.sum() * 0, torch.tensor(1), {"pooled": pooled[keep].detach(), "rows": micro["rows"][keep]}

        outputs = run_microbatches(model, batch.microbatches(2), collect, forward_only=False, dropout_seed=7)
    finally:
        destroy_distributed()
    replayed = torch.empty_like(first)
    for output in outputs:
        replayed[output["rows"]] = output["pooled"]
    assert torch.equal(first, again) and torch.equal(replayed, first)
    assert (first - other_seed).abs().max() > 1e-3
    assert (first[:3] - first[3:]).abs().max() > 1e-3  # the two views of a text differ
    torch.testing.assert_close(no_dropout[:3], no_dropout[3:], rtol=0, atol=1e-6)  # eval mode: no dropout

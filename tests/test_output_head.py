"""The output head of GraceGPTModel (megatron_grace/models/output.py).

* ``linear_cross_entropy`` (chunked) against ``-log_softmax(h @ W.T)[label]`` computed in
  float64 over the unpadded vocabulary, forward and both gradients, with chunks that do not divide the token count.
  Tolerances per input dtype: float64 1e-10, float32 2e-5 absolute; bfloat16 (the reference on the same bf16-rounded
  inputs) 1e-2 relative, 2.5 bf16 ulps: the chunk's GEMM rounds logits of magnitude ~10 to bf16. Gradients: the same
  tolerance, relative to the largest entry.
* The model's ``labels=`` path (also with a ``loss_mask``) and its batch-first logits against HF transformers (fp32,
  tiny Qwen3, TP1), with an unpadded and a TP-padded vocabulary. Layouts TP2/PP2/SP go through the same head in
  tests/test_layouts.py.
"""
import pytest
import torch

from megatron_grace.models import output
from megatron_grace.models.output import linear_cross_entropy
from megatron_grace.platform import ParallelLayout, destroy_distributed, initialize_distributed


@pytest.fixture(scope="module")
def world_of_one():
    initialize_distributed(ParallelLayout())
    yield
    destroy_distributed()


def reference_losses(hidden, weight, labels, vocab_size):
    logits = hidden.double() @ weight.double()[:vocab_size].t()
    return -torch.log_softmax(logits, dim=-1).gather(1, labels.unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float64, 1e-10, 0), (torch.float32, 2e-5, 0),
                                             (torch.bfloat16, 1e-2, 1e-2)])
@pytest.mark.parametrize("padded_rows", [0, 5])
def test_linear_cross_entropy_matches_float64(world_of_one, monkeypatch, dtype, atol, rtol, padded_rows):
    from megatron.core import parallel_state

    vocab_size, hidden_size, tokens = 37, 16, 23
    monkeypatch.setitem(output.CHUNK_LOGIT_ELEMENTS, "cpu", 5 * (vocab_size + padded_rows))  # 5 chunks, the last of 3
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=generator).to(dtype).requires_grad_()
    weight = torch.randn(vocab_size + padded_rows, hidden_size, generator=generator).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab_size, (tokens,), generator=generator)
    upstream = torch.rand(tokens, generator=generator, dtype=torch.float64)

    losses = linear_cross_entropy(hidden, weight, labels, vocab_size, parallel_state.get_tensor_model_parallel_group())
    (losses.double() * upstream).sum().backward()

    hidden_ref = hidden.detach().double().requires_grad_()
    weight_ref = weight.detach().double().requires_grad_()
    expected = reference_losses(hidden_ref, weight_ref, labels, vocab_size)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(losses.double(), expected.detach(), rtol=rtol, atol=atol)
    for grad, grad_ref in ((hidden.grad, hidden_ref.grad), (weight.grad, weight_ref.grad)):
        assert grad.dtype == dtype
        scale = grad_ref.abs().max().item()
        torch.testing.assert_close(grad.double(), grad_ref, rtol=0, atol=max(atol, rtol) * max(scale, 1.0))
    assert torch.all(weight.grad[vocab_size:] == 0)  # padded rows never get probability mass


@pytest.mark.parametrize("vocab_size", [49152, 49229])  # the tokenizer's vocabulary; one padded for TP
def test_model_log_probs_and_logits_match_hf(world_of_one, tmp_path, smollm2_tokenizer_dir, vocab_size):
    from transformers import AutoModelForCausalLM

    from megatron_grace.models import architecture_from_hf_dir
    from megatron_grace.models.builder import build_gpt_model, make_transformer_config
    from megatron_grace.models.hf_io import load_hf_weights
    from megatron_grace.testing import save_tiny_hf_model

    hf_dir = save_tiny_hf_model("qwen3", tmp_path / "tiny", smollm2_tokenizer_dir, vocab_size=vocab_size)
    arch = architecture_from_hf_dir(hf_dir)
    assert (arch.padded_vocab_size > arch.vocab_size) == (vocab_size == 49229)
    model = build_gpt_model(arch, make_transformer_config(arch))
    load_hf_weights(model, hf_dir, arch)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    tokens = torch.randint(0, vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(11).expand(3, -1)
    labels = torch.roll(tokens, -1, dims=1)
    with torch.no_grad():
        hf_logits = hf_model(input_ids=tokens).logits
        expected = -torch.log_softmax(hf_logits.double(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        losses = model(tokens, positions, None, labels=labels)
        logits = model(tokens, positions, None)
    assert losses.shape == (3, 11) and logits.shape == (3, 11, arch.padded_vocab_size) and logits.is_contiguous()
    torch.testing.assert_close(losses.double(), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(logits[..., :vocab_size], hf_logits, rtol=0, atol=1e-4)

    # loss_mask: only the selected positions are computed (the same values), the others are exactly 0.
    loss_mask = torch.rand(3, 11, generator=torch.Generator().manual_seed(2)) > 0.6
    with torch.no_grad():
        masked = model(tokens, positions, None, labels=labels, loss_mask=loss_mask)
    assert torch.all(masked[~loss_mask] == 0) and loss_mask.sum() > 0
    torch.testing.assert_close(masked[loss_mask], losses[loss_mask], rtol=0, atol=1e-6)

"""GraceEncoder: determinism, pooling against hand-computed HF hidden states, EOS handling, truncation and the cache.

The model is a random 2-layer Llama (hidden 64) with SmolLM2's tokenizer (fixture ``tiny_llama_dir``).
"""
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from megatron_grace.data.prompts import PromptBuilder
from megatron_grace.eval.encoder import GraceEncoder, model_fingerprint

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map texts to vectors.",
    "A considerably longer sentence, so that the batch needs padding: it keeps going for a while before it ends.",
    "short",
    "Another text about the weather in spring, when it rains and the days get longer.",
]


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    """The same model and tokenizer loaded independently of the encoder."""
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


def hand_pooled(model, token_ids, pool_start):
    """Unbatched HF forward; mean of the final-norm last-layer states from pool_start on, L2-normalised."""
    with torch.no_grad():
        hidden = model(torch.tensor([token_ids]), output_hidden_states=True).hidden_states[-1][0]
    vector = hidden[pool_start:].double().mean(0)
    return (vector / vector.norm()).numpy()


def test_hf_last_hidden_state_is_after_the_final_norm(reference):
    model, tokenizer = reference
    ids = torch.tensor([PromptBuilder(tokenizer).build(TEXTS[0]).input_ids])
    captured = {}
    handle = model.model.norm.register_forward_hook(lambda module, inputs, output: captured.setdefault("out", output))
    with torch.no_grad():
        hidden_states = model(ids, output_hidden_states=True).hidden_states
    handle.remove()
    assert len(hidden_states) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(hidden_states[-1], captured["out"], rtol=0, atol=0)


def test_same_seed_same_embeddings_whatever_the_batching(tiny_llama_dir):
    first = GraceEncoder.from_pretrained(tiny_llama_dir, device="cpu")
    second = GraceEncoder.from_pretrained(tiny_llama_dir, device="cpu")  # its own, empty cache
    settings = dict(max_new_tokens=12, temperature=1.0, seed=7)
    vectors = first.encode(TEXTS, batch_size=2, **settings)
    reordered = second.encode(TEXTS[::-1], batch_size=5, **settings)[::-1]
    # Per-text generators: the sampled rationales are identical; only float noise from padding remains.
    np.testing.assert_allclose(vectors, reordered, rtol=0, atol=1e-5)
    other_seed = second.encode(TEXTS, batch_size=2, **dict(settings, seed=8))
    assert np.abs(vectors - other_seed).max(axis=1).min() > 1e-3, "another seed must sample other rationales"

    prompts = [first.prompts.build(t) for t in TEXTS[:3]]
    alone = first.generate_rationales(prompts[2:], max_new_tokens=12, temperature=1.0, seeds=[11])
    batched = first.generate_rationales(prompts, max_new_tokens=12, temperature=1.0, seeds=[5, 6, 11])
    assert alone[0] == batched[2]


def test_embeddings_equal_a_hand_computed_masked_mean(tiny_llama_dir, reference):
    model, tokenizer = reference
    encoder = GraceEncoder.from_pretrained(tiny_llama_dir, device="cpu")
    builder = PromptBuilder(tokenizer)

    base = encoder.encode(TEXTS, batch_size=3, rationale=False)
    for text, vector in zip(TEXTS, base):
        prompt = builder.build(text)
        assert 0 < prompt.pool_start < len(prompt) - 1
        np.testing.assert_allclose(vector, hand_pooled(model, prompt.input_ids, prompt.pool_start), atol=2e-5)

    with_rationale = encoder.encode(TEXTS, batch_size=3, max_new_tokens=10, seed=3)
    prompts = [builder.build(t) for t in TEXTS]
    from megatron_grace.eval.encoder import text_seed

    rationales = encoder.generate_rationales(prompts, max_new_tokens=10, temperature=1.0,
                                             seeds=[text_seed(3, t) for t in TEXTS])
    for prompt, rationale, vector in zip(prompts, rationales, with_rationale):
        assert 0 < len(rationale) <= 10
        expected = hand_pooled(model, prompt.input_ids + rationale, prompt.pool_start)
        np.testing.assert_allclose(vector, expected, atol=2e-5)
    assert np.abs(with_rationale - base).max() > 1e-3


def test_last_and_eos_pooling_and_layer_choice(tiny_llama_dir, reference):
    model, tokenizer = reference
    prompt = PromptBuilder(tokenizer).build(TEXTS[1])
    with torch.no_grad():
        eos = tokenizer.eos_token_id
        states = model(torch.tensor([prompt.input_ids + [eos]]), output_hidden_states=True).hidden_states

    def unit(v):
        v = v.double().numpy()
        return v / np.linalg.norm(v)

    last = GraceEncoder.from_pretrained(tiny_llama_dir, device="cpu", pooling="last")
    np.testing.assert_allclose(last.encode([TEXTS[1]], rationale=False)[0], unit(states[-1][0, -2]), atol=2e-5)
    eos_pool = GraceEncoder.from_pretrained(tiny_llama_dir, device="cpu", pooling="eos")  # appends the EOS
    np.testing.assert_allclose(eos_pool.encode([TEXTS[1]], rationale=False)[0], unit(states[-1][0, -1]), atol=2e-5)
    penultimate = GraceEncoder.from_pretrained(tiny_llama_dir, device="cpu", layer=-2)
    expected = unit(states[-2][0, prompt.pool_start:-1].mean(0))
    np.testing.assert_allclose(penultimate.encode([TEXTS[1]], rationale=False)[0], expected, atol=2e-5)


def test_rationale_ends_at_the_first_eos_which_is_kept(tiny_llama_dir, monkeypatch):
    encoder = GraceEncoder.from_pretrained(tiny_llama_dir, device="cpu")
    eos, pad = encoder.eos_token_ids[0], encoder.pad_token_id
    prompts = [encoder.prompts.build(t) for t in TEXTS[:2]]
    width = max(len(p) for p in prompts)
    new_tokens = torch.tensor([[100, 101, eos, pad, pad], [200, 201, 202, 203, 204]])

    def fake_generate(input_ids, **kwargs):
        assert input_ids.shape[1] == width
        return torch.cat([input_ids, new_tokens], dim=1)

    monkeypatch.setattr(encoder.model, "generate", fake_generate)
    rationales = encoder.generate_rationales(prompts, max_new_tokens=5, temperature=1.0, seeds=[0, 1])
    assert rationales == [[100, 101, eos], [200, 201, 202, 203, 204]]


def test_long_text_is_cut_without_losing_the_template(tiny_llama_dir, reference):
    model, tokenizer = reference
    encoder = GraceEncoder.from_pretrained(tiny_llama_dir, device="cpu", max_prompt_tokens=60)
    long_text = " ".join(["word"] * 500)
    prompt = PromptBuilder(tokenizer).build(long_text, max_length=60, truncate=True)
    tail = PromptBuilder(tokenizer).build("x").input_ids[-3:]  # end of turn, assistant header
    assert len(prompt) == 60 and prompt.input_ids[-3:] == tail
    np.testing.assert_allclose(encoder.encode([long_text], rationale=False)[0],
                               hand_pooled(model, prompt.input_ids, prompt.pool_start), atol=2e-5)


def test_cache_is_keyed_by_model_text_and_settings(tiny_llama_dir, tmp_path, monkeypatch):
    encoder = GraceEncoder.from_pretrained(tiny_llama_dir, device="cpu", cache_dir=tmp_path / "cache")
    computed = []
    original = encoder._embed_prompts
    monkeypatch.setattr(encoder, "_embed_prompts",
                        lambda prompts, *args: computed.extend(prompts) or original(prompts, *args))
    first = encoder.encode(TEXTS[:2], max_new_tokens=4)
    assert len(computed) == 2
    np.testing.assert_array_equal(encoder.encode(TEXTS[:2] + TEXTS[:1], max_new_tokens=4), np.vstack([first, first[:1]]))
    assert len(computed) == 2, "repeated texts come from the cache"
    encoder.encode(TEXTS[:1], max_new_tokens=5)
    assert len(computed) == 3, "other settings are another key"
    base = encoder.encode(TEXTS[:1], rationale=False, max_new_tokens=4)
    assert len(computed) == 4
    np.testing.assert_array_equal(encoder.encode(TEXTS[:1], rationale=False, max_new_tokens=9, seed=5), base)
    assert len(computed) == 4, "generation settings do not split the Base cache"

    from_disk = GraceEncoder.from_pretrained(tiny_llama_dir, device="cpu", cache_dir=tmp_path / "cache")
    monkeypatch.setattr(from_disk, "_embed_prompts", lambda *args: pytest.fail("expected a disk-cache hit"))
    np.testing.assert_array_equal(from_disk.encode(TEXTS[:2], max_new_tokens=4), first)

    # Another model (same files, one weight changed) has another identity, so it never reads these entries.
    changed = tmp_path / "changed"
    shutil.copytree(tiny_llama_dir, changed)
    model = LlamaForCausalLM.from_pretrained(changed)
    with torch.no_grad():
        model.model.norm.weight.mul_(2)
    model.save_pretrained(changed)
    assert model_fingerprint(changed) != model_fingerprint(tiny_llama_dir)
    other_model = GraceEncoder.from_pretrained(changed, device="cpu", cache_dir=tmp_path / "cache")
    recomputed = []
    monkeypatch.setattr(other_model, "_embed_prompts", lambda prompts, *args: recomputed.extend(prompts) or
                        GraceEncoder._embed_prompts(other_model, prompts, *args))
    assert np.abs(other_model.encode(TEXTS[:2], max_new_tokens=4) - first).max() > 1e-4
    assert len(recomputed) == 2

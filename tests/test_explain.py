"""Rationale inspection: ``GraceEncoder.explain`` and ``grace-explain`` (tools/explain.py) on a tiny model.

The "with rationale" matrix must be the cosine matrix of what ``encode`` gives for the same seed and settings (the
same rationales), the "without" one that of the Base embeddings, both computed here in float64 from those vectors;
the rationales printed must be the tokens ``generate_rationales`` samples, decoded.
"""
import numpy as np
import pytest

from megatron_grace.cli import explain as explain_cli
from megatron_grace.eval.encoder import GraceEncoder, text_seed

TEXTS = ["a cat sat on the mat", "a kitten rests on a rug", "stock prices fell sharply"]
SETTINGS = {"max_new_tokens": 6, "temperature": 1.0}


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    unit = vectors.astype(np.float64) / np.linalg.norm(vectors.astype(np.float64), axis=1, keepdims=True)
    return unit @ unit.T


def test_explain_matches_encode_and_the_sampled_rationales(tiny_llama_dir):
    encoder = GraceEncoder.from_pretrained(tiny_llama_dir, device="cpu")
    explanation = encoder.explain(TEXTS, seed=7, **SETTINGS)
    with_rationale = encoder.encode(TEXTS, rationale=True, seed=7, **SETTINGS)
    without_rationale = encoder.encode(TEXTS, rationale=False)
    np.testing.assert_allclose(explanation.similarity_with_rationale, cosine_matrix(with_rationale), atol=1e-6)
    np.testing.assert_allclose(explanation.similarity_without_rationale, cosine_matrix(without_rationale), atol=1e-6)
    assert not np.allclose(explanation.similarity_with_rationale, explanation.similarity_without_rationale)

    prompts = [encoder.prompts.build(text, encoder.max_prompt_tokens, truncate=True) for text in TEXTS]
    tokens = encoder.generate_rationales(prompts, seeds=[text_seed(7, text) for text in TEXTS], **SETTINGS)
    assert explanation.rationales == [encoder.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    assert explanation.rationale_tokens == [len(t) for t in tokens]
    assert explanation.truncated == [t[-1] not in encoder.eos_token_ids for t in tokens]
    other_seed = encoder.explain(TEXTS, seed=8, **SETTINGS)
    assert other_seed.rationales != explanation.rationales
    assert other_seed.similarity_without_rationale == pytest.approx(explanation.similarity_without_rationale)


def test_command_prints_both_matrices_and_writes_a_page(tiny_llama_dir, tmp_path, capsys):
    page = tmp_path / "explain.html"
    assert explain_cli.main(["--model", str(tiny_llama_dir), *TEXTS, "--seed", "7", "--max-new-tokens", "6",
                             "--html", str(page)]) == 0
    printed = capsys.readouterr().out
    explanation = GraceEncoder.from_pretrained(tiny_llama_dir, device="cpu").explain(TEXTS, seed=7, **SETTINGS)
    for index, (text, rationale) in enumerate(zip(TEXTS, explanation.rationales), start=1):
        assert f"[{index}] {text}" in printed and rationale.strip() in printed
    assert explain_cli.format_matrices(explanation.similarity_with_rationale,
                                       explanation.similarity_without_rationale) in printed
    html = page.read_text()
    assert "with rationale (GRACE)" in html and "without rationale (Base)" in html
    assert f"{explanation.similarity_with_rationale[0, 1]:.3f}" in html


def test_command_refuses_bad_input(tiny_llama_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        explain_cli.main(["--model", str(tmp_path), "some text"])
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        explain_cli.main(["--model", str(tiny_llama_dir), "fine", "  "])
    assert "non-empty" in capsys.readouterr().err

"""Show what a GRACE embedder "thinks" of a few texts: each text's rationale, and the cosine similarities of their
embeddings with the rationale (GRACE) and without it (the Base), side by side.

    grace-explain --model HF_DIR "a cat sat on the mat" "a kitten rests on a rug" "stock prices fell" \
        [--seed 0] [--max-new-tokens 256] [--temperature 1.0] [--html explain.html]     (or python tools/explain.py)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from megatron_grace.console import configure_console


def format_matrices(with_rationale: np.ndarray, without_rationale: np.ndarray) -> str:
    """The two matrices side by side, rows and columns numbered like the texts."""
    count = len(with_rationale)
    labels = [f"[{i + 1}]" for i in range(count)]
    width = 7
    block = width * (count + 1)
    lines = [f"{'with rationale':<{block}}   without rationale",
             "".join(f"{label:>{width}}" for label in ["", *labels]) + "   "
             + "".join(f"{label:>{width}}" for label in ["", *labels])]
    for i, label in enumerate(labels):
        left = "".join(f"{value:>{width}.3f}" for value in with_rationale[i])
        right = "".join(f"{value:>{width}.3f}" for value in without_rationale[i])
        lines.append(f"{label:>{width}}{left}   {label:>{width}}{right}")
    return "\n".join(lines)


def format_explanation(explanation) -> str:
    lines = []
    for index, (text, rationale, tokens, truncated) in enumerate(zip(
            explanation.texts, explanation.rationales, explanation.rationale_tokens, explanation.truncated), start=1):
        lines.append(f"[{index}] {text}")
        lines.append(f"    rationale ({tokens} tokens{', truncated' if truncated else ''}): {rationale.strip()}")
    lines.append("")
    lines.append("cosine similarity of the embeddings")
    lines.append(format_matrices(explanation.similarity_with_rationale, explanation.similarity_without_rationale))
    return "\n".join(lines)


def write_html(explanation, path: Path) -> Path:
    from megatron_grace.report import escape, section, write_page

    def matrix_table(matrix: np.ndarray) -> str:
        head = "<tr><th></th>" + "".join(f"<th>[{j + 1}]</th>" for j in range(len(matrix))) + "</tr>"
        rows = "".join(f"<tr><th>[{i + 1}]</th>" + "".join(f"<td>{value:.3f}</td>" for value in row) + "</tr>"
                       for i, row in enumerate(matrix))
        return f"<table class='numbers'>{head}{rows}</table>"

    cards = "".join(
        f"<div class='sample'><div class='sample-head'>[{i}] · {tokens} tokens"
        f"{' · <span class=truncated>truncated</span>' if truncated else ''}</div>"
        f"<div class='text'>{escape(text)}</div><div class='rationale'>{escape(rationale)}</div></div>"
        for i, (text, rationale, tokens, truncated) in enumerate(zip(
            explanation.texts, explanation.rationales, explanation.rationale_tokens, explanation.truncated), start=1))
    matrices = ("<table><tr><th>with rationale (GRACE)</th><th>without rationale (Base)</th></tr><tr>"
                f"<td>{matrix_table(explanation.similarity_with_rationale)}</td>"
                f"<td>{matrix_table(explanation.similarity_without_rationale)}</td></tr></table>")
    settings = ", ".join(f"{key}={value}" for key, value in explanation.settings.items())
    return write_page(path, "GRACE rationales", f"<h1>GRACE rationales</h1><p class='meta'>{escape(settings)}</p>",
                      [section("rationales", "Rationales", cards),
                       section("similarity", "Cosine similarity", matrices)])


def main(argv: list[str] | None = None) -> int:
    configure_console()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", required=True, metavar="HF_DIR", help="Hugging Face model folder")
    parser.add_argument("texts", nargs="+", metavar="TEXT")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (each text's generator derives from it)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--pooling", choices=("mean", "last", "eos"), default="mean")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--html", type=Path, default=None, metavar="FILE", help="also write the same as a page")
    args = parser.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there; expected a Hugging Face model folder")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if any(not text.strip() for text in args.texts):
        parser.error("every TEXT must be non-empty")
    from megatron_grace.eval.encoder import GraceEncoder

    encoder = GraceEncoder.from_pretrained(args.model, device=args.device, pooling=args.pooling)
    explanation = encoder.explain(args.texts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  seed=args.seed)
    print(format_explanation(explanation))
    if args.html:
        print(f"wrote {write_html(explanation, args.html)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build the bundled sample data in examples/data/ from WordNet 3.0, reproducibly and offline.

    python tools/build_sample_data.py [--wordnet-dir DIR] [--output-dir examples/data] [--seed 0]

WordNet comes from the Debian package ``wordnet-base`` (``apt-get download wordnet-base && dpkg -x``, done here into
``<cache>/wordnet`` when neither ``--wordnet-dir`` nor an installed /usr/share/wordnet is found; the cache is
``$MEGATRON_GRACE_CACHE`` or ~/.cache/megatron_grace). The data.noun / data.verb / data.adj files are parsed here.

What is written (see examples/data/README.md for the why):

* ``train_supervised.jsonl``: ``query`` = a synset's definition; ``positive`` = its lemmas and a usage example
  ("fold, folding: he gave the napkins a double fold"); ``negative`` = the same for a sibling synset (same hypernym;
  for satellite adjectives, same head adjective): same category and format, different meaning.
* ``train_unsupervised.txt``: usage example sentences, one a line.
* ``heldout_synsets.txt``: every synset reserved for evaluation, ``OFFSET-TYPE`` (``00406800-n``), one a line. A synset
  is held out when ``int(sha256(b"OFFSET-TYPE").hexdigest(), 16) % 100 < heldout_percent``. No text of a held-out
  synset (definition or example) occurs in the training files, not even through another synset that shares the string.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from megatron_grace import sample_data_dir
from megatron_grace.default_model import resolve_cache_dir

DATA_FILES = ("data.noun", "data.verb", "data.adj")
SYSTEM_WORDNET = Path("/usr/share/wordnet")
HYPERNYM_POINTERS = ("@", "@i")  # hypernym, instance hypernym
SIMILAR_TO_POINTER = "&"  # a satellite adjective points to its head adjective
QUOTED_EXAMPLE = re.compile(r'"([^"]+)"(\s*-+\s*[^;"]*)?')  # an example, with an optional "- Author" attribution
ADJECTIVE_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # syntactic markers such as long(a), galore(ip)
MIN_UNSUPERVISED_WORDS = 5


@dataclass
class Synset:
    key: str  # "OFFSET-TYPE", e.g. "00406800-n"; TYPE is n, v, a or s (satellite adjective)
    lemmas: list[str]
    parent: str | None  # first hypernym, or a satellite's head adjective
    definition: str
    examples: list[str]

    def entry(self) -> str:
        """The document side of a triplet: lemmas and the first usage example."""
        return f"{', '.join(self.lemmas)}: {self.examples[0]}"

    def texts(self) -> list[str]:
        return [self.definition, *self.examples]


def is_held_out(key: str, heldout_percent: int) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100 < heldout_percent


def parse_gloss(gloss: str) -> tuple[str, list[str]]:
    """Split a WordNet gloss into its definition and its quoted usage examples."""
    examples = [match.group(1).strip() for match in QUOTED_EXAMPLE.finditer(gloss)]
    definition = QUOTED_EXAMPLE.sub("", gloss)
    definition = "; ".join(part.strip() for part in definition.split(";") if part.strip())
    return definition, [example for example in examples if example]


def parse_data_line(line: str) -> Synset:
    """One line of a WordNet data file (format: wndb(5WN))."""
    fields, _, gloss = line.partition(" | ")
    tokens = fields.split()
    offset, ss_type, word_count = tokens[0], tokens[2], int(tokens[3], 16)
    words = tokens[4:4 + 2 * word_count:2]
    lemmas = list(dict.fromkeys(ADJECTIVE_MARKER.sub("", word).replace("_", " ") for word in words))
    pointer_at = 4 + 2 * word_count
    pointers = [tokens[pointer_at + 1 + 4 * i:pointer_at + 5 + 4 * i] for i in range(int(tokens[pointer_at]))]
    parent_symbols = (SIMILAR_TO_POINTER,) if ss_type == "s" else HYPERNYM_POINTERS
    parents = [f"{target}-{pos}" for symbol, target, pos, _ in pointers if symbol in parent_symbols]
    definition, examples = parse_gloss(gloss.strip())
    return Synset(f"{offset}-{ss_type}", lemmas, parents[0] if parents else None, definition, examples)


def read_wordnet(wordnet_dir: Path) -> list[Synset]:
    synsets = []
    for name in DATA_FILES:
        with open(wordnet_dir / name, encoding="utf-8") as handle:
            synsets.extend(parse_data_line(line) for line in handle if not line.startswith("  "))  # "  " = licence
    return synsets


def find_wordnet(wordnet_dir: Path | None, cache_dir: Path | None) -> Path:
    if wordnet_dir is not None:
        if not (wordnet_dir / "data.noun").is_file():
            raise SystemExit(f"error: --wordnet-dir {wordnet_dir} has no data.noun")
        return wordnet_dir
    if (SYSTEM_WORDNET / "data.noun").is_file():
        return SYSTEM_WORDNET
    unpacked = resolve_cache_dir(cache_dir) / "wordnet"
    if not (unpacked / "usr/share/wordnet/data.noun").is_file():
        print(f"fetching the Debian package wordnet-base into {unpacked}", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            download = subprocess.run(["apt-get", "download", "wordnet-base"], cwd=tmp, capture_output=True, text=True)
            debs = list(Path(tmp).glob("wordnet-base_*.deb"))
            if download.returncode != 0 or len(debs) != 1:
                raise SystemExit(f"error: `apt-get download wordnet-base` failed (try `apt-get update`, or pass "
                                 f"--wordnet-dir):\n{download.stderr}")
            staging = Path(tmp) / "unpacked"
            subprocess.run(["dpkg", "-x", str(debs[0]), str(staging)], check=True)
            (staging / "source_package.txt").write_text(debs[0].name + "\n")
            unpacked.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(unpacked, ignore_errors=True)
            shutil.move(str(staging), unpacked)
    return unpacked / "usr/share/wordnet"


def build(synsets: list[Synset], *, heldout_percent: int, num_supervised: int, num_unsupervised: int, seed: int):
    """Held-out keys, supervised triplets and unsupervised sentences, all deterministic given the arguments."""
    heldout = {s.key for s in synsets if is_held_out(s.key, heldout_percent)}
    heldout_texts = {text for s in synsets if s.key in heldout for text in s.texts()}
    # Training synsets share no text with any held-out synset, so an evaluation built from held-out synsets is unseen.
    # About 20 WordNet glosses have an unbalanced quote, which leaves the definition/example split unreliable: skipped.
    usable = [s for s in synsets if s.key not in heldout and not heldout_texts.intersection(s.texts())
              and '"' not in s.definition]
    by_parent: dict[str, list[Synset]] = {}
    for synset in usable:
        if synset.parent is not None and synset.examples:
            by_parent.setdefault(synset.parent, []).append(synset)
    rng = random.Random(seed)
    triplets = []
    for siblings in by_parent.values():
        if len(siblings) < 2:
            continue
        for synset in siblings:
            negative = rng.choice([s for s in siblings if s is not synset])
            triplets.append({"query": synset.definition, "positive": synset.entry(), "negative": negative.entry()})
    rng.shuffle(triplets)
    sentences = sorted({e for s in usable for e in s.examples if len(e.split()) >= MIN_UNSUPERVISED_WORDS})
    rng.shuffle(sentences)
    return sorted(heldout), triplets[:num_supervised], sentences[:num_unsupervised]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wordnet-dir", type=Path, help="folder with data.noun, data.verb, data.adj")
    parser.add_argument("--cache-dir", type=Path, help="where wordnet-base is unpacked when it must be fetched")
    parser.add_argument("--output-dir", type=Path, default=sample_data_dir(),
                        help="where the files go (default: the bundled sample, examples/data in a checkout)")
    parser.add_argument("--num-supervised", type=int, default=3000)
    parser.add_argument("--num-unsupervised", type=int, default=3000)
    parser.add_argument("--heldout-percent", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    wordnet_dir = find_wordnet(args.wordnet_dir, args.cache_dir)
    synsets = read_wordnet(wordnet_dir)
    heldout, triplets, sentences = build(synsets, heldout_percent=args.heldout_percent, seed=args.seed,
                                         num_supervised=args.num_supervised, num_unsupervised=args.num_unsupervised)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    outputs = {
        "train_supervised.jsonl": [json.dumps(t, ensure_ascii=False) for t in triplets],
        "train_unsupervised.txt": sentences,
        "heldout_synsets.txt": heldout,
    }
    for name, lines in outputs.items():
        (args.output_dir / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    print(f"read {len(synsets)} synsets from {wordnet_dir}; held out {len(heldout)} ({args.heldout_percent}%)")
    for name, lines in outputs.items():
        print(f"wrote {len(lines)} lines to {args.output_dir / name} ({(args.output_dir / name).stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

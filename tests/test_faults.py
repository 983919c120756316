"""Fault-injection suite (issue 7): every fault is injected for real and its outcome asserted.

Launches (2 ranks each, TP1PP1/DP2, tiny Qwen3, 4 GRPO steps, checkpoints after steps 2 and 4):

* ``python -m megatron_grace.train`` as users run it: the reference run; the same command killed with SIGKILL in the
  update of step 3, restarted and killed again while saving step 4, restarted to the end; a run whose rank stalls;
* ``distributed/fault_worker.py``: one launch of in-process checks (fallback, other layouts, NaN/Inf, degenerate
  groups, full disk, unwritable --save, another model, strict and empty data).

Every command uses ``--load`` and ``--save`` on the same run directory, so one command serves the first launch and every
restart. The training file mixes 6 valid rows with one bad row of each kind (see ``BAD_ROWS``); with a global batch of 4
the sample stream crosses an epoch boundary at steps 2 and 3.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from megatron_grace.utils import free_port
from megatron_grace.checkpointing import CheckpointError, iteration_dir, resolve_checkpoint
from megatron_grace.guards import NonFiniteError, NonFiniteGuard, SaveLocationError, check_save_location
from megatron_grace.testing import (LAYOUT_DEPENDENT_METRICS, run_torchrun, save_tiny_hf_model, stable_metrics,
                                    tiny_grpo_run)

WORKER = Path(__file__).parent / "distributed" / "fault_worker.py"
DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "train_supervised.jsonl"
TRAIN_ITERS = 4
SAVE_INTERVAL = 2
# 1-based line numbers of the bad rows in the training file, and the 0-based sample ids of the 6 rows kept.
BAD_ROWS = {"invalid JSON": 4, "invalid UTF-8": 6, "missing field 'positive'": 7, "empty field 'query'": 8,
            "main prompt over 128 tokens": 10}
KEPT_SAMPLE_IDS = [0, 1, 2, 4, 8, 10]
LONG_TEXT = "word " * 400  # ~400 tokens: over --max-prompt-length 128


def training_file(path: Path) -> Path:
    good = [json.loads(line) for line in DATA.read_text().splitlines()[:6]]
    lines = [json.dumps(row).encode() for row in good[:3]]
    lines += [b'{"query": "cut short', json.dumps(good[3]).encode(),
              b'{"query": "caf\xff", "positive": "p", "negative": "n"}',
              json.dumps({"query": "q", "negative": "n"}).encode(),
              json.dumps({"query": "  ", "positive": "p", "negative": "n"}).encode(),
              json.dumps(good[4]).encode(),
              json.dumps({**good[5], "positive": LONG_TEXT}).encode(),
              json.dumps({**good[5], "query": LONG_TEXT}).encode()]  # kept: the query prompt is truncated
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@dataclass
class Workspace:
    root: Path
    model: Path
    flags: list[str]


@dataclass
class Launch:
    returncode: int
    output: str
    seconds: float


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, smollm2_tokenizer_dir) -> Workspace:
    root = tmp_path_factory.mktemp("faults")
    model, flags = tiny_grpo_run(root, smollm2_tokenizer_dir, training_file(root / "train.jsonl"),
                                 ppo_mini_batch_size=2, max_response_length=10)
    return Workspace(root, model, flags)


def launch(workspace: Workspace, run_dir: Path, *extra: str, faults: dict | None = None,
           timeout: float = 300) -> Launch:
    """``torchrun -m megatron_grace.train`` on 2 ranks with the run directory as both --load and --save."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONWARNINGS="ignore", **(faults or {}))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
               "-m", "megatron_grace.train", *workspace.flags, "--train-iters", str(TRAIN_ITERS),
               "--save", str(run_dir), "--load", str(run_dir), "--save-interval", str(SAVE_INTERVAL), *extra]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    return Launch(result.returncode, result.stdout + result.stderr, time.perf_counter() - start)


def metrics_lines(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [stable_metrics(json.loads(line)) for line in lines]


def run_state(run_dir: Path) -> dict:
    return {"latest": (run_dir / "latest_checkpointed_iteration.txt").read_text().strip(),
            "folders": sorted(p.name for p in run_dir.glob("iter_*")), "metrics": metrics_lines(run_dir)}


@pytest.fixture(scope="module")
def crashes(workspace) -> dict:
    reference_dir, crashed_dir = workspace.root / "reference", workspace.root / "crashed"
    crashed_dir.mkdir()  # an empty --load directory on the first launch
    results = {"reference": launch(workspace, reference_dir)}
    assert results["reference"].returncode == 0, results["reference"].output[-6000:]
    results["reference_state"] = run_state(reference_dir)
    results["killed_mid_step"] = launch(workspace, crashed_dir, faults={"GRACE_FAULT_KILL": "update:3"})
    results["after_mid_step_kill"] = run_state(crashed_dir)
    results["killed_in_save"] = launch(workspace, crashed_dir, faults={"GRACE_FAULT_KILL": "save:4"})
    results["after_save_kill"] = run_state(crashed_dir)
    results["restarted"] = launch(workspace, crashed_dir)
    results["final_state"] = run_state(crashed_dir)
    results["reference_dir"] = reference_dir
    return results


@pytest.fixture(scope="module")
def worker(workspace, crashes, smollm2_tokenizer_dir) -> dict:
    root = workspace.root
    other = save_tiny_hf_model("qwen2", root / "tiny_qwen2", smollm2_tokenizer_dir)
    # Without the EOS boost a random model practically never samples EOS: every response is truncated.
    never_ending = save_tiny_hf_model("qwen3", root / "tiny_never_ending", smollm2_tokenizer_dir)
    out = root / "worker"
    out.mkdir()
    run_torchrun(WORKER, json.dumps(workspace.flags), workspace.model, other, never_ending, crashes["reference_dir"],
                 out, nproc=2)
    return json.loads((out / "results.json").read_text())


POST_UPDATE_KEYS = ("loss", "clip_fraction", "dual_clip_fraction", "grad_norm")


def before_update(metrics: dict) -> dict:
    """A step's metrics without those of its second mini-batch, which runs after the step's first optimizer update:
    that update differs after a resume (see test_resumed_optimizer_updates_are_exact)."""
    return {k: v for k, v in metrics.items() if k not in POST_UPDATE_KEYS}


def layout_independent(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in LAYOUT_DEPENDENT_METRICS}


def assert_close(actual: dict, expected: dict, rel: float = 1e-4) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float) and not math.isnan(value):
            assert actual[key] == pytest.approx(value, rel=rel, abs=1e-5), key
        else:
            assert actual[key] == value or math.isnan(actual[key]), key


# ------------------------------------------------------------------------------------------ 1, 10, 12: crashes
def test_reference_run_starts_fresh_on_missing_or_empty_load_dir(crashes):
    reference = crashes["reference"]
    assert reference.returncode == 0, reference.output[-3000:]
    for launch_ in (reference, crashes["killed_mid_step"]):  # missing directory, then an empty one
        assert "holds no checkpoint; starting from" in launch_.output
    state = crashes["reference_state"]
    assert state["latest"] == "4" and state["folders"] == ["iter_0000002", "iter_0000004"]
    assert [m["step"] for m in state["metrics"]] == [1, 2, 3, 4]


def test_kill_mid_step_resumes_from_last_complete_checkpoint(crashes):
    killed = crashes["killed_mid_step"]
    assert killed.returncode != 0
    assert "SIGKILL in stage 'update' of step 3" in killed.output and "Signal 9" in killed.output
    state = crashes["after_mid_step_kill"]
    assert state["latest"] == "2" and state["folders"] == ["iter_0000002"]
    reference = crashes["reference_state"]["metrics"]
    # The restart resumes after step 2 and its next step equals the uninterrupted run's step 3.
    assert re.search(r"resumed from \S+iter_0000002 at iteration 2", crashes["killed_in_save"].output)
    assert before_update(crashes["after_save_kill"]["metrics"][2]) == before_update(reference[2])


def test_kill_during_save_keeps_previous_checkpoint_and_resume_matches(crashes):
    killed = crashes["killed_in_save"]
    assert killed.returncode != 0 and "SIGKILL in stage 'save' of step 4" in killed.output
    state = crashes["after_save_kill"]
    assert state["latest"] == "2"
    assert state["folders"] == ["iter_0000002", "iter_0000004.tmp"]  # the half-written checkpoint is never read
    restarted = crashes["restarted"]
    assert restarted.returncode == 0, restarted.output[-3000:]
    assert re.search(r"resumed from \S+iter_0000002 at iteration 2", restarted.output)
    final = crashes["final_state"]
    assert final["latest"] == "4" and final["folders"] == ["iter_0000002", "iter_0000004"]
    reference = crashes["reference_state"]["metrics"]
    assert final["metrics"][:2] == reference[:2] and before_update(final["metrics"][2]) == before_update(reference[2])


def test_resumed_optimizer_updates_are_exact(crashes):
    """Two optimizer updates per step: catches AdamW step counters shared between parameters after a load
    (see optim._fix_torch_adamw_checkpoint_loading)."""
    assert crashes["final_state"]["metrics"] == crashes["reference_state"]["metrics"]


def test_same_seed_and_layout_give_identical_metrics(crashes):
    """Separate processes: the run killed at step 3 logged steps 1-2 before dying, identical to the reference."""
    reference = crashes["reference_state"]["metrics"]
    assert crashes["after_mid_step_kill"]["metrics"] == reference[:2]
    # Real updates, not a trivially equal run (a step whose groups all truncate has zero advantages and loss).
    assert any(step["loss"] != 0 and step["grad_norm"] > 0 for step in reference[:2])


# ------------------------------------------------------------------------------------------ 4, 5: data
def test_resume_across_epoch_boundary_skips_and_repeats_nothing(crashes):
    ids = [i for m in crashes["final_state"]["metrics"] for i in m["sample_ids"]]
    assert len(ids) == TRAIN_ITERS * 4
    epochs = [ids[0:6], ids[6:12], ids[12:]]
    assert sorted(epochs[0]) == sorted(epochs[1]) == KEPT_SAMPLE_IDS
    assert len(set(epochs[2])) == len(epochs[2])
    assert epochs[1] != epochs[0]  # each epoch has its own order


def test_bad_rows_are_reported_with_line_numbers(crashes):
    output = crashes["reference"].output
    assert "11 lines read, 6 examples kept, 5 skipped" in output
    for reason, line in BAD_ROWS.items():
        assert f"skipped 1 x {reason}: line {line}" in output
    assert "truncated 1 query prompt(s) to fit: line 11" in output


def test_strict_and_empty_data_fail_at_the_entry_point(worker, workspace):
    data = workspace.root / "train.jsonl"
    assert worker["strict_data"].startswith(f"DataError: {data}:4: invalid JSON (")
    assert worker["strict_data"].endswith("[strict mode]")
    assert "DataError" in worker["empty_file"] and "empty.jsonl is empty" in worker["empty_file"]
    assert worker["infonce_without_negatives"].startswith("DataError: --algorithm infonce needs hard negatives")
    assert "no_negatives.jsonl have no 'negative' field" in worker["infonce_without_negatives"]


# ------------------------------------------------------------------------------------------ 2, 3, 10: checkpoints
@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete_shard"])
def test_damaged_checkpoint_file_is_named_at_load(crashes, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(crashes["reference_dir"], run, ignore=shutil.ignore_patterns("tensorboard"))
    shard = sorted(iteration_dir(run, 4).glob("*.distcp"))[0]
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[:-10])
    elif damage == "flip_byte":
        shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        shard.unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(shard))):
        resolve_checkpoint(run)
    messages = []
    assert resolve_checkpoint(run, fallback_to_previous=True, log=messages.append) == iteration_dir(run, 2)
    assert str(shard) in messages[0] and "falling back to the previous checkpoint" in messages[0]


def test_training_falls_back_to_previous_checkpoint_when_asked(worker, crashes):
    assert "--fallback-to-previous-checkpoint" in worker["no_fallback_error"]
    assert ".distcp does not match its sha256" in worker["no_fallback_error"]
    assert "falling back to the previous checkpoint" in worker["fallback_log"]
    assert worker["fallback_iteration"] == 2
    assert before_update(worker["fallback_step"]) == before_update(crashes["reference_state"]["metrics"][2])


@pytest.mark.parametrize("layout", ["tp2_step", "pp2_step"])
def test_resume_at_another_layout_keeps_the_data_position(worker, crashes, layout):
    expected = crashes["reference_state"]["metrics"][2]
    assert worker[layout]["sample_ids"] == expected["sample_ids"]
    assert_close(layout_independent(before_update(worker[layout])), layout_independent(before_update(expected)))


def test_checkpoint_of_another_model_names_the_differences(worker):
    error = worker["other_model_error"]
    assert error.startswith("CheckpointError") and "is for a different model" in error
    assert "qk_layernorm: checkpoint True vs model False" in error


# ------------------------------------------------------------------------------------------ 6, 7: numerics
def test_nonfinite_values_skip_updates_then_stop_the_run(worker):
    result = worker["nonfinite"]
    reward, grad, loss = result["steps"]
    assert reward["skipped_updates"] == 1 and "step 1: non-finite reward on rank(s) 1" in reward["log"]
    assert grad["skipped_updates"] == 2 and "step 2: non-finite gradient on rank(s) 1" in grad["log"]
    assert "step 3: non-finite loss on rank(s) 1; optimizer update skipped" in loss["log"]
    assert loss["error"].startswith("NonFiniteError: step 3: 3 steps in a row")
    assert "--max-nonfinite-steps 3" in loss["error"]
    assert all(step["weights_unchanged"] for step in result["steps"])
    assert result["nonfinite_save_error"].startswith(
        "NonFiniteError: refusing to save iteration 3: non-finite weights on rank(s) 0")
    assert not result["nonfinite_save_written"]


def test_a_finite_step_resets_the_nonfinite_count():
    guard = NonFiniteGuard(2, log=lambda message: None)
    import torch

    for step, value in enumerate([float("nan"), 1.0, float("inf")], start=1):
        guard.check(step, "loss", [torch.tensor(value)])
        guard.finish_step(step)
    guard.check(4, "loss", [torch.tensor(float("nan"))])
    with pytest.raises(NonFiniteError, match="2 steps in a row"):
        guard.finish_step(4)


@pytest.mark.parametrize("variant", ["plain", "std_normalised"])
def test_all_truncated_groups_get_penalties_and_zero_advantages(worker, variant):
    step = worker["degenerate"][variant]
    assert step["truncation_rate"] == 1.0
    assert step["reward_mean"] == -1.0 and step["reward_std"] == 0.0  # every reward is the length penalty
    assert step["advantage_abs_max"] == 0.0 and step["loss"] == 0.0
    assert step["skipped_updates"] == 0 and math.isfinite(step["grad_norm"])


# ------------------------------------------------------------------------------------------ 8: hangs
def test_stalled_rank_ends_the_job_naming_the_stage(workspace):
    timeout_minutes = 0.25
    stalled = launch(workspace, workspace.root / "stalled", "--distributed-timeout-minutes", str(timeout_minutes),
                     faults={"GRACE_FAULT_STALL": "update:1"}, timeout=240)
    assert stalled.returncode != 0
    assert "stalling in stage 'update' of step 1" in stalled.output
    waited = re.search(r"stage 'update' of step 1 has not finished after ([\d.]+) s", stalled.output)
    assert waited, stalled.output[-3000:]
    assert float(waited.group(1)) <= timeout_minutes * 60


# ------------------------------------------------------------------------------------------ 9: --save
def test_unwritable_save_fails_before_training(worker):
    assert re.fullmatch(r"SaveLocationError: --save \S+/a_file/run is not writable: .*", worker["unwritable_save"])


def test_save_location_without_room_fails_preflight(tmp_path):
    with pytest.raises(SaveLocationError, match=r"GB free, but a checkpoint needs about"):
        check_save_location(tmp_path / "run", required_bytes=1 << 62)
    check_save_location(tmp_path / "run", required_bytes=1)


def test_disk_full_during_save_keeps_previous_checkpoint(worker):
    result = worker["degenerate"]
    assert "No space left on device" in result["enospc_error"]
    assert "iteration 1 stays the latest checkpoint" in result["enospc_error"]
    assert result["latest_after_enospc"] == 1 and result["leftovers"] == ["iter_0000001"]
    assert result["previous_intact"] is None


# ------------------------------------------------------------------------------------------ 11: config
@pytest.mark.parametrize("world_size, flags, message", [
    (4, ["--global-batch-size", "6"], "--global-batch-size 6 is not divisible by the data-parallel size 4"),
    (1, ["--micro-batch-size", "3"], "--micro-batch-size 3 does not divide"),
    (3, ["--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size 3 does not divide the model's 4 "
                                               "attention heads"),
    (4, ["--tensor-model-parallel-size", "4"], "--tensor-model-parallel-size 4 does not divide the model's 2 KV heads"),
    (8, ["--pipeline-model-parallel-size", "8"], "--pipeline-model-parallel-size 8 exceeds the model's 4 layers"),
    (1, ["--rollout-n", "1"], "--rollout-n 1: GRPO needs at least 2"),
    (1, ["--max-nonfinite-steps", "0"], "--max-nonfinite-steps must be positive"),
    (1, ["--rollout-sync-interval", "0"], "--rollout-sync-interval must be positive"),
    (1, ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (1, ["--hidden-dropout", "0.1"], "--hidden-dropout 0.1 with --algorithm grace"),
    (1, ["--hidden-dropout", "1.5", "--algorithm", "simcse", "--train-mode", "unsupervised"],
     "--hidden-dropout 1.5 must be in [0, 1)"),
    (1, ["--algorithm", "infonce", "--train-mode", "unsupervised"],
     "--algorithm infonce trains on supervised data: give --train-mode supervised"),
    (1, ["--algorithm", "simcse"], "--algorithm simcse trains on unsupervised data"),
    (2, ["--algorithm", "simcse", "--train-mode", "unsupervised", "--tensor-model-parallel-size", "2",
         "--sequence-parallel"], "--hidden-dropout with --sequence-parallel"),
    (1, ["--algorithm", "infonce", "--contrastive-temperature", "0"], "--contrastive-temperature must be positive"),
    (1, ["--algorithm", "infonce", "--kl-coef", "0.1"], "--kl-coef / --entropy-coef are GRPO terms"),
])
def test_config_errors_name_the_flag_before_any_heavy_work(workspace, monkeypatch, capsys, world_size, flags,
                                                           message):
    from megatron_grace import train

    def heavy_work(*args, **kwargs):
        raise AssertionError("distributed start-up reached: the configuration error was not caught before it")

    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setattr(train, "initialize_distributed", heavy_work)
    with pytest.raises(SystemExit) as stopped:
        train.main(["--hf-model", str(workspace.model), "--global-batch-size", "8", "--ppo-mini-batch-size", "8",
                    "--rollout-n", "4", "--micro-batch-size", "4", *flags])
    assert message in f"{stopped.value.code} {capsys.readouterr().err}"

"""The local-suite table and plot of the collapse study: every lane's checkpoints (mean ± std over the sampling seeds
evaluated so far, their count in the table) next to the base model without and with rationales (step 0), whose
3-seed results are results/quality_smollm2_cpu/'s on the same suite, limit and sampling settings.
    python results/collapse_study_smollm2_cpu/eval_table.py STUDY_EVAL_DIR REFERENCE_EVAL_DIR PLOT.png > eval_table.md
"""
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from megatron_grace.eval.mteb_eval import (LOCAL_TASK_NAMES, collect_results, local_tasks, mean_std_cell,  # noqa: E402
                                          runs_of, summarise)

LANES = ("code", "per-rollout", "per-rollout-kl0")
STEPS = (16, 32, 64)
BASE = "smollm2-135m-instruct"


def complete_runs(summary: dict, folder: str, rationale: bool) -> list[dict]:
    """The runs of one model folder (every seed) that finished every task."""
    return [run for run in runs_of(summary, folder, rationale) if len(run["tasks"]) == len(LOCAL_TASK_NAMES)]


def main(study_dir: str, reference_dir: str, plot_path: str) -> None:
    task_types = {task.metadata.name: task.metadata.type for task in local_tasks(names=list(LOCAL_TASK_NAMES))}
    study = summarise(collect_results(Path(study_dir), task_types))
    reference = summarise(collect_results(Path(reference_dir), task_types))
    rows = [("Base (no rationale), step 0", complete_runs(reference, BASE, False)),
            ("Base + rationale, step 0", complete_runs(reference, BASE, True))]
    rows += [(f"{lane}, step {step}", complete_runs(study, f"{lane}-step{step}", True))
             for lane in LANES for step in STEPS]
    tasks = sorted(task_types, key=lambda name: (task_types[name], name))
    print("| model | seeds | " + " | ".join(tasks) + " | **mean over tasks** |")
    print("|---|---:|" + "---:|" * (len(tasks) + 1))
    for title, runs in rows:
        if runs:
            scores = [mean_std_cell([run["tasks"][name]["score"] for run in runs]) for name in tasks]
            print(f"| {title} | {len(runs)} | " + " | ".join(scores)
                  + f" | **{mean_std_cell([run['dataset_weighted_mean'] for run in runs])}** |")

    figure, axis = plt.subplots(figsize=(6.5, 4))
    base_means = [run["dataset_weighted_mean"] for run in rows[0][1]]
    axis.axhline(np.mean(base_means), color="black", linestyle="--", label="Base (no rationale)")
    step0 = (0, [run["dataset_weighted_mean"] for run in rows[1][1]])  # every lane starts from Base + rationale
    for lane in LANES:
        points = [step0] + [(step, [run["dataset_weighted_mean"] for run in runs]) for step in STEPS
                            if (runs := complete_runs(study, f"{lane}-step{step}", True))]
        if len(points) > 1:
            axis.errorbar([p[0] for p in points], [np.mean(p[1]) for p in points], yerr=[np.std(p[1]) for p in points],
                          marker="o", capsize=3, label=f"GRACE {lane}")
    axis.set_xlabel("training step")
    axis.set_ylabel("local suite, mean over tasks")
    axis.set_xticks((0, *STEPS))
    axis.legend(fontsize=8)
    axis.set_title("Rationale embeddings along training (step 0: Base + rationale; mean ± std over seeds)", fontsize=9)
    figure.tight_layout()
    figure.savefig(plot_path, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:])

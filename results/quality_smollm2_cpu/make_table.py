"""The study table (markdown) from the eval folder's MTEB results: one column per method, rationale methods as
mean ± std over their sampling seeds. Usage: python results/quality_smollm2_cpu/make_table.py EVAL_DIR > table.md"""
import sys
from pathlib import Path

import numpy as np

from megatron_grace.eval.mteb_eval import LOCAL_TASK_NAMES, collect_results, local_tasks, summarise, write_summary

METHODS = [  # (column, model folder name, rationale)
    ("Base", "smollm2-135m-instruct", False),
    ("Base + rationale", "smollm2-135m-instruct", True),
    ("GRACE code", "grace-code", True),
    ("GRACE per-rollout", "grace-per-rollout", True),
    ("InfoNCE", "infonce", False),
]

output = Path(sys.argv[1])
task_types = {task.metadata.name: task.metadata.type for task in local_tasks(names=list(LOCAL_TASK_NAMES))}
summary = summarise(collect_results(output, task_types))
write_summary(summary, output)  # every run side by side, after the concurrent evaluations each wrote their own
columns = {}
for column, folder, rationale in METHODS:
    runs = [run for label, run in summary.items()
            if label.split("@")[0] == folder and ("(base)" not in label) == rationale]
    columns[column] = runs
kinds = {name: run["tasks"][name]["type"] for runs in columns.values() for run in runs for name in run["tasks"]}
tasks = sorted(kinds, key=lambda name: (kinds[name], name))


def cell(values):
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}"


print("| task | type | " + " | ".join(f"{c} ({len(r)} run{'s' * (len(r) != 1)})" for c, r in columns.items()) + " |")
print("|---|---|" + "---:|" * len(columns))
for name in tasks:
    print(f"| {name} | {kinds[name]} | " + " | ".join(cell([run["tasks"][name]["score"] for run in runs
                                                              if name in run["tasks"]])
                                                        for runs in columns.values()) + " |")
for key, title in (("dataset_weighted_mean", "**mean over tasks**"), ("category_mean", "**mean over categories**")):
    # Averages only over runs that finished every task (a run still in progress would average over fewer).
    print(f"| {title} | | " + " | ".join(cell([run[key] for run in runs if len(run["tasks"]) == len(task_types)])
                                        for runs in columns.values()) + " |")

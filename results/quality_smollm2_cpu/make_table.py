"""The study table (markdown) from the eval folder's MTEB results: one column per method, rationale methods as
mean ± std over their sampling seeds. Usage: python results/quality_smollm2_cpu/make_table.py EVAL_DIR > table.md"""
import sys
from pathlib import Path

from megatron_grace.eval.mteb_eval import (LOCAL_TASK_NAMES, collect_results, local_tasks, mean_std_cell, runs_of,
                                          summarise, write_summary)

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
columns = {column: runs_of(summary, folder, rationale) for column, folder, rationale in METHODS}
kinds = {name: run["tasks"][name]["type"] for runs in columns.values() for run in runs for name in run["tasks"]}
tasks = sorted(kinds, key=lambda name: (kinds[name], name))

print("| task | type | " + " | ".join(f"{c} ({len(r)} run{'s' * (len(r) != 1)})" for c, r in columns.items()) + " |")
print("|---|---|" + "---:|" * len(columns))
for name in tasks:
    scores = [mean_std_cell([run["tasks"][name]["score"] for run in runs if name in run["tasks"]])
              for runs in columns.values()]
    print(f"| {name} | {kinds[name]} | " + " | ".join(scores) + " |")
for key, title in (("dataset_weighted_mean", "**mean over tasks**"), ("category_mean", "**mean over categories**")):
    # Averages only over runs that finished every task (a run still in progress would average over fewer).
    averages = [mean_std_cell([run[key] for run in runs if len(run["tasks"]) == len(task_types)])
                for runs in columns.values()]
    print(f"| {title} | | " + " | ".join(averages) + " |")

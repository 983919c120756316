"""Means of the collapse signals and the training metrics over windows of 8 steps, one table per run (markdown):
    python results/collapse_study_smollm2_cpu/windows.py OUT_DIR RUN_NAME...   (reads OUT_DIR/RUN_NAME/metrics.jsonl)
"""
import json
import sys
from pathlib import Path

KEYS = ("margin_mean", "embedding_spread", "embedding_effective_rank", "distinct_2", "near_identical_share",
        "reward_pos_mean", "reward_neg_mean", "reward_mean", "response_length_mean", "kl")
WINDOW = 8


def main(out: str, *names: str) -> None:
    for name in names:
        rows = {}
        for line in (Path(out) / name / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            rows[record["step"]] = record  # a resumed step replaces the earlier line
        steps = sorted(rows)
        keys = [key for key in KEYS if key in rows[steps[0]]]
        print(f"### {name} ({len(steps)} steps, means over {WINDOW}-step windows)\n")
        print("| steps | " + " | ".join(keys) + " |")
        print("|---" * (len(keys) + 1) + "|")
        for start in range(0, len(steps), WINDOW):
            window = [rows[step] for step in steps[start:start + WINDOW]]
            means = [sum(row[key] for row in window) / len(window) for key in keys]
            print(f"| {steps[start]}-{steps[min(start + WINDOW, len(steps)) - 1]} | "
                  + " | ".join(f"{value:.4f}" for value in means) + " |")
        print()


if __name__ == "__main__":
    main(*sys.argv[1:])

"""One self-contained HTML page per run (``RUN_DIR/report.html``): configuration, training curves with their numbers,
the sample rationales over training (searchable), response-length histograms, and MTEB results where given.

Built from what a run writes (``args.json``, ``metrics.jsonl``, ``samples.jsonl``) and what ``grace-eval`` writes
(``summary.json``, ``summary.png``); images are inline PNGs and the search is a few lines of inline JavaScript, so the
file opens anywhere without a network. Tolerant like ``grace-plot``: a cut-off last line or a resumed run's repeated
steps are handled (the later entry wins) and counted on the page.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from .curves import Run, load_run

REPORT_FILE = "report.html"
ARGS_FILE = "args.json"
SAMPLES_FILE = "samples.jsonl"

# (panel title, metric keys), as logged by megatron_grace.train. Reward terms are raw cosines before the 1/tau scaling.
CURVES: list[tuple[str, list[str]]] = [
    ("reward (total)", ["reward_mean"]),
    ("reward terms", ["reward_pos_mean", "reward_neg_mean", "reward_clust_mean", "reward_cross_mean"]),
    ("collapse signals (grpo/collapse.py)", ["margin_mean", "embedding_spread", "distinct_2", "near_identical_share"]),
    ("share of the advantage variance", ["advantage_share_pos", "advantage_share_neg", "advantage_share_clust",
                                         "advantage_share_cross", "advantage_share_length"]),
    ("response length (tokens)", ["response_length_mean", "response_length_max"]),
    ("truncation rate", ["truncation_rate"]),
    ("clip fraction", ["clip_fraction"]),
    ("KL to the reference", ["kl"]),
    ("grad norm", ["grad_norm"]),
    ("seconds per phase", ["time_rollout_s", "time_forward_s", "time_reward_s", "time_update_s"]),
]
# Configuration keys shown first; the rest of args.json follows in a folded table.
KEY_SETTINGS = ("hf_model", "train_mode", "train_iters", "global_batch_size", "rollout_n", "ppo_mini_batch_size",
                "micro_batch_size", "max_prompt_length", "max_response_length", "lr", "reward_variant",
                "reward_temperature", "length_penalty", "kl_coef", "seed", "tensor_model_parallel_size",
                "pipeline_model_parallel_size", "bf16")


@dataclass
class Samples:
    records: list[dict] = field(default_factory=list)  # sorted by (step, rollout)
    bad_lines: list[int] = field(default_factory=list)

    @property
    def steps(self) -> list[int]:
        return sorted({record["step"] for record in self.records})


def load_samples(path: Path) -> Samples:
    """``samples.jsonl``: one rationale per line; lines that are not complete records are skipped and counted, and a
    resumed run's repeated (step, rollout) keeps its later entry."""
    samples = Samples()
    if not path.is_file():
        return samples
    by_key: dict[tuple, dict] = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = (int(record["step"]), int(record.get("rollout", 0)))
            complete = isinstance(record.get("text"), str) and isinstance(record.get("rationale"), str)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            complete = False
        if not complete:
            samples.bad_lines.append(number)
            continue
        by_key[key] = record
    samples.records = [by_key[key] for key in sorted(by_key)]
    return samples


def load_args(run_dir: Path) -> dict:
    """The run's flags: ``args.json`` (written at start), else the newest checkpoint's copy, else nothing."""
    path = run_dir / ARGS_FILE
    if path.is_file():
        return json.loads(path.read_text())
    from .checkpointing import read_checkpoint_meta, resolve_checkpoint

    try:
        checkpoint = resolve_checkpoint(run_dir)
        return read_checkpoint_meta(checkpoint).get("run_state", {}).get("args", {}) if checkpoint else {}
    except Exception:  # a damaged checkpoint must not stop the report; the page says the configuration is unknown
        return {}


def metric_table(run: Run, keys: list[str]) -> list[dict]:
    """Per metric with data: steps, first, last, min, max and mean over its finite values."""
    table = []
    for key in keys:
        steps, values = run.series(key)
        if values:
            table.append({"metric": key, "steps": len(values), "first": values[0], "last": values[-1],
                          "min": min(values), "max": max(values), "mean": sum(values) / len(values),
                          "first_step": steps[0], "last_step": steps[-1]})
    return table


def build_report(run_dir: str | Path, *, eval_dir: str | Path | None = None, output: str | Path | None = None,
                 smooth: int = 1) -> Path:
    """Write the report of ``run_dir`` (default ``run_dir/report.html``) and return its path."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    samples = load_samples(run_dir / SAMPLES_FILE)
    args = load_args(run_dir)
    output = Path(output) if output else run_dir / REPORT_FILE
    sections = [
        _configuration_section(args),
        _curves_section(run, smooth),
        _lengths_section(run),
        _samples_section(samples),
    ]
    if eval_dir is not None:
        sections.append(_evaluation_section(Path(eval_dir)))
    title = f"GRACE run report: {run_dir.resolve().name}"
    notes = []
    if run.bad_lines:
        notes.append(f"{len(run.bad_lines)} line(s) of metrics.jsonl skipped"
                     + (" (the last one is still being written)" if run.partial_last_line else ""))
    if run.replaced_steps:
        notes.append(f"{run.replaced_steps} step(s) logged twice (resumed run): the later entry is shown")
    if samples.bad_lines:
        notes.append(f"{len(samples.bad_lines)} line(s) of samples.jsonl skipped")
    steps = f"steps {run.rows[0]['step']}–{run.rows[-1]['step']}" if run.rows else "no complete step"
    header = (f"<h1>{escape(title)}</h1><p class='meta'>{escape(str(run_dir.resolve()))} · {steps} · "
              f"written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"
              + "".join(f"<p class='note'>{escape(note)}</p>" for note in notes))
    return write_page(output, title, header, sections, script=SEARCH_SCRIPT)


def write_page(output: Path, title: str, header: str, sections: list[str], *, script: str = "") -> Path:
    """One self-contained HTML file in the report's style (also used by ``grace-explain --html``)."""
    page = PAGE.format(title=escape(title), header=header, body="\n".join(sections), script=script)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page, encoding="utf-8")
    return output


# ---------------------------------------------------------------------------------------------------- sections
def _configuration_section(args: dict) -> str:
    if not args:
        return section("configuration", "Configuration", "<p>No args.json and no readable checkpoint: unknown.</p>")
    first = [key for key in KEY_SETTINGS if key in args]
    rest = sorted(key for key in args if key not in KEY_SETTINGS)
    def rows(keys):
        return "".join(f"<tr><th>{escape(key)}</th><td>{escape(json.dumps(args[key]))}</td></tr>" for key in keys)

    body = (f"<table class='config'>{rows(first)}</table>"
            f"<details><summary>all {len(args)} settings</summary><table class='config'>{rows(rest)}</table></details>")
    return section("configuration", "Configuration", body)


def _curves_section(run: Run, smooth: int) -> str:
    if not run.rows:
        return section("curves", "Training curves", "<p>No complete step in metrics.jsonl yet.</p>")
    from .curves import plot_runs

    buffer = io.BytesIO()
    drawn = plot_runs([run], buffer, smooth=smooth, title=run.label, panels=CURVES, columns=4)
    keys = [key for _, panel_keys in CURVES for key in panel_keys]
    table = metric_table(run, keys)
    cells = "".join(
        f"<tr data-metric='{escape(row['metric'])}'><th>{escape(row['metric'])}</th><td>{row['steps']}</td>"
        + "".join(f"<td>{number(row[name])}</td>" for name in ("first", "last", "min", "max", "mean")) + "</tr>"
        for row in table)
    body = (_image(buffer.getvalue(), "training curves: " + ", ".join(drawn))
            + "<table class='numbers'><tr><th>metric</th><th>steps</th><th>first</th><th>last</th><th>min</th>"
            f"<th>max</th><th>mean</th></tr>{cells}</table>")
    return section("curves", "Training curves", body)


def _lengths_section(run: Run) -> str:
    """Histograms of every main rationale's length at the first and last steps that logged them."""
    logged = [row for row in run.rows if isinstance(row.get("response_lengths"), list) and row["response_lengths"]]
    if not logged:
        return section("lengths", "Response lengths",
                        "<p>No step logged per-row response lengths (they are logged at sampled steps, "
                        "<code>--sample-interval</code>).</p>")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [logged[0]] if len(logged) == 1 else [logged[0], logged[-1]]
    figure, axes = plt.subplots(1, len(chosen), figsize=(5.2 * len(chosen), 3.2), squeeze=False)
    largest = max(max(row["response_lengths"]) for row in chosen)
    bins = range(0, largest + 2) if largest < 60 else 40  # one bar per length while that stays readable
    captions = []
    for axis, row in zip(axes.flat, chosen):
        lengths = row["response_lengths"]
        axis.hist(lengths, bins=bins, range=(0, largest + 1), color="#4c72b0", align="left")
        mean = sum(lengths) / len(lengths)
        axis.set_title(f"step {row['step']}: {len(lengths)} rationales, mean {mean:.1f}", fontsize=10)
        axis.set_xlabel("tokens", fontsize=8)
        axis.tick_params(labelsize=8)
        captions.append(f"step {row['step']}: n={len(lengths)}, mean {mean:.1f}, max {max(lengths)}")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=110, format="png")
    plt.close(figure)
    body = _image(buffer.getvalue(), "response-length histograms") + "".join(
        f"<p class='caption'>{escape(c)}</p>" for c in captions)
    return section("lengths", "Response lengths", body)


def _samples_section(samples: Samples) -> str:
    if not samples.records:
        return section("samples", "Sample rationales", "<p>No samples.jsonl (<code>--sample-interval 0</code>?).</p>")
    cards = []
    for record in samples.records:
        reward = record.get("reward")
        reward_text = "n/a" if reward is None else f"{reward:+.3f}"
        flag = "<span class='truncated'>truncated</span>" if record.get("truncated") else ""
        cards.append(
            f"<div class='sample' data-step='{record['step']}'><div class='sample-head'>step {record['step']} · "
            f"rollout {record.get('rollout', 0)} · reward {reward_text} · "
            f"{record.get('response_length', '?')} tokens {flag}</div>"
            f"<div class='text'>{escape(record['text'])}</div>"
            f"<div class='rationale'>{escape(record['rationale'])}</div></div>")
    body = ("<input id='search' type='search' placeholder='filter samples by text, rationale or step' "
            "oninput='filterSamples(this.value)'> <span id='shown'></span>"
            f"<p class='caption'>{len(samples.records)} rationales at {len(samples.steps)} sampled step(s): the first "
            "group of the logging rank, every rollout of it.</p>" + "".join(cards))
    return section("samples", "Sample rationales", body)


def _evaluation_section(eval_dir: Path) -> str:
    summary_path = eval_dir / "summary.json"
    if not summary_path.is_file():
        return section("evaluation", "Evaluation", f"<p>{escape(str(summary_path))} not found: run grace-eval "
                                                   "with --output there first.</p>")
    summary = json.loads(summary_path.read_text())
    tasks = sorted({task for model in summary.values() for task in model.get("tasks", {})})
    header = "<tr><th>model</th>" + "".join(f"<th>{escape(t)}</th>" for t in tasks) + "<th>mean</th></tr>"
    rows = []
    for label, model in summary.items():
        scores = [model.get("tasks", {}).get(task, {}).get("score") for task in tasks]
        rows.append(f"<tr><th>{escape(label)}</th>" + "".join(f"<td>{number(s)}</td>" for s in scores)
                    + f"<td>{number(model.get('category_mean'))}</td></tr>")
    body = f"<p class='caption'>{escape(str(eval_dir))}</p><table class='numbers'>{header}{''.join(rows)}</table>"
    chart = eval_dir / "summary.png"
    if chart.is_file():
        body += _image(chart.read_bytes(), "MTEB summary chart")
    return section("evaluation", "Evaluation (MTEB)", body)


# ---------------------------------------------------------------------------------------------------- html
def section(anchor: str, title: str, body: str) -> str:
    return f"<section id='{anchor}'><h2>{escape(title)}</h2>{body}</section>"


def _image(png: bytes, alt: str) -> str:
    return f"<img alt='{escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def number(value) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "–"
    return f"{value:.6g}"


def escape(text: str) -> str:
    return html.escape(str(text), quote=True)


SEARCH_SCRIPT = """
function filterSamples(query) {
  const needle = query.trim().toLowerCase();
  let shown = 0;
  for (const card of document.querySelectorAll('.sample')) {
    const hit = !needle || card.textContent.toLowerCase().includes(needle);
    card.style.display = hit ? '' : 'none';
    shown += hit ? 1 : 0;
  }
  document.getElementById('shown').textContent = needle ? shown + ' shown' : '';
}
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ border-bottom: 1px solid #ccc; padding-bottom: .2em; }}
.meta, .caption {{ color: #666; font-size: .9em; }} .note {{ color: #a60; }}
table {{ border-collapse: collapse; margin: .5em 0; font-size: .9em; }}
th, td {{ border: 1px solid #ddd; padding: .2em .5em; text-align: left; }}
table.numbers td {{ text-align: right; font-variant-numeric: tabular-nums; }}
img {{ max-width: 100%; }}
#search {{ width: 30em; padding: .3em; }}
.sample {{ border: 1px solid #ddd; border-radius: 4px; margin: .6em 0; padding: .5em .8em; }}
.sample-head {{ font-size: .85em; color: #555; }} .truncated {{ color: #b00; font-weight: bold; }}
.text {{ font-weight: 600; margin: .3em 0; }} .rationale {{ white-space: pre-wrap; font-family: ui-monospace, monospace;
  font-size: .85em; }}
</style></head>
<body>
{header}
{body}
<script>{script}</script>
</body></html>
"""

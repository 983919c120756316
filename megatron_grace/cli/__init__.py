"""Command-line tools, installed as console scripts (``setup.py``) and kept runnable as ``python tools/<name>.py``:

    grace-train     python -m megatron_grace.train      GRACE training (under torchrun for several ranks)
    grace-convert   tools/convert_hf.py                 HF folder <-> Megatron-Core checkpoint
    grace-eval      tools/eval_mteb.py                  MTEB evaluation and comparison of exported models
    grace-report    tools/report.py                     one self-contained HTML report of a run
    grace-explain   tools/explain.py                    rationales and similarities of a few texts
    grace-plot      tools/plot_metrics.py               training curves of one or more runs
"""

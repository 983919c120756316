"""Command-line tools: the one home of entry-point code. Installed as console scripts (``setup.py``) and kept runnable
as ``python tools/<name>.py`` (thin wrappers that say so):

    grace-train     python -m megatron_grace.train      GRACE training (under torchrun for several ranks)
    grace-convert   tools/convert_hf.py                 HF folder <-> Megatron-Core checkpoint
    grace-eval      tools/eval_mteb.py                  MTEB evaluation and comparison of exported models
    grace-report    tools/report.py                     one self-contained HTML report of a run
    grace-explain   tools/explain.py                    rationales and similarities of a few texts
    grace-plot      tools/plot_metrics.py               training curves of one or more runs
    grace-prepare-data  tools/prepare_data.py           validate, length-filter and split a training file
                    tools/build_sample_data.py          rebuild the bundled WordNet sample (maintainers)
                    tools/build_local_suite.py          build the offline evaluation suite
"""

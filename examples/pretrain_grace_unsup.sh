#!/usr/bin/env bash
# Unsupervised GRACE (one text per line; the text is its own anchor). Same launcher and flags as
# pretrain_grace.sh; see there for multi-node variables and CONFIG files
# (e.g. CONFIG=examples/configs/qwen2.5-1.5b-instruct-unsup.sh).
set -euo pipefail
TRAIN_MODE=unsupervised exec bash "$(dirname "${BASH_SOURCE[0]}")/pretrain_grace.sh" "$@"

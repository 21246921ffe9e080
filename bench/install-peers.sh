#!/usr/bin/env bash
# Installs the peer tools that `repro bench` compares against into bench/.venv (git-ignored).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install -q dvc snakemake torch numpy
.venv/bin/dvc --version
.venv/bin/snakemake --version
.venv/bin/python -c "import torch; print(\"torch\", torch.__version__)"

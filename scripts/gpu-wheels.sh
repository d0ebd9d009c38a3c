#!/usr/bin/env bash
# The wheels benchmarks/gpu_suite.sh installs on a GPU machine that cannot reach a package
# index: what unicom needs beyond the machine's own PyTorch stack, for Python 3.12 on
# x86-64 Linux (PYTHON_VERSION to change it), into .wheels/ (about 21 MB), which the suite
# finds there. Carry that folder to the machine with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.wheels}
mkdir -p "$OUT"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d "$OUT" faiss-cpu open_clip_torch ftfy wcwidth pytorch-metric-learning braceexpand universal_pathlib pathlib-abc
ls -l "$OUT"

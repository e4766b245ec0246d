#!/usr/bin/env bash
# Downloads the pure-Python wheels the GPU machine's image lacks into benchmarks/wheels/
# (ignored by git; name it in the device run's `carry`). gpu_run.sh installs them there with
# pip --no-index into /tmp/tx-gpu-run-site. The image has jax, flax, optax, orbax-checkpoint,
# chex, absl-py, PyYAML, pytest, pytest-timeout and hypothesis (KINDS.md's package list); it
# lacks ml_collections, which the configs (configs/gpt2_small.py, configs/ablation.py) and
# tx.train.configs import: the e2e and crossover sections need it, the kernel sections don't.
#   bash benchmarks/fetch_wheels.sh      # then: ls benchmarks/wheels
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${PYTHON:-python3}
WHEELS=("ml_collections==1.1.0")  # pure Python; needs absl-py and PyYAML, both on the image
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$HERE/wheels" "${WHEELS[@]}"
ls -l "$HERE/wheels"

#!/usr/bin/env bash
# Here, where pip reaches PyPI: download the packages that the lent GPU machine lacks
# (requirements-gpu.txt) as wheels for its Python into .whl/, which git ignores and the device
# tool carries: run(command="bash scripts/gpu_check.sh", carry=[".whl"]). That machine reaches no
# package index; scripts/gpu_check.sh installs the wheels there with --no-index.
#
#   scripts/gpu_wheels.sh [PYTHON_VERSION]   # default 3.12, the GPU image's Python (3.11 for a dry run here)
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-3.12}"
rm -rf .whl
platforms=()
for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$platform")
done
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$version" --implementation cp "${platforms[@]}" -d .whl -r requirements-gpu.txt
ls .whl

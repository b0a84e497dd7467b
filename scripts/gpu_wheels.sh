#!/usr/bin/env bash
# Here, where pip reaches PyPI: download the packages that the lent GPU machine lacks
# (requirements-gpu.txt) as wheels for its Python into .whl/, which git ignores and the device
# tool carries: run(command="bash scripts/gpu_check.sh", carry=[".whl"]). That machine reaches no
# package index; scripts/gpu_check.sh installs the wheels there with --no-index.
#
#   scripts/gpu_wheels.sh [PYTHON_VERSION]
#
# The default, 3.12, is the GPU image's Python and writes .whl/. Another version writes .whl-VERSION/
# (for a dry run against that Python: WHEELS=.whl-3.11 scripts/gpu_check.sh --dry-run), so that
# wheels the GPU's Python cannot install are never carried by mistake. PYTHON: the pip to use.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-3.12}"
folder=.whl
if [ "$version" != 3.12 ]; then folder=".whl-$version"; fi
rm -rf "$folder"
platforms=()
for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$platform")
done
"${PYTHON:-python3}" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$version" --implementation cp "${platforms[@]}" -d "$folder" -r requirements-gpu.txt
ls "$folder"

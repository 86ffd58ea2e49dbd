#!/usr/bin/env bash
# Download, on a machine with network, the wheels benchmarks/gpu_all.sh installs offline on a GPU
# machine that has torch, transformers, sentence-transformers, pyarrow and pillow but not these.
#   benchmarks/fetch_wheels.sh [PYTHON_VERSION ...]     # default: 3.10 3.11 3.12 (pydantic-core is binary)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEST="${ICSD_WHEELS:-$HERE/wheels}"
mkdir -p "$DEST"
pip download --no-deps -d "$DEST" diffusers==0.42.1 webdataset==1.0.2 braceexpand==0.1.7 pydantic==2.14.4 \
  annotated-types==0.8.0 typing-inspection==0.4.5 importlib-metadata zipp
for v in "${@:-3.10 3.11 3.12}"; do
  for version in $v; do
    pip download --no-deps --only-binary :all: --python-version "$version" --platform manylinux2014_x86_64 \
      -d "$DEST" pydantic-core==2.50.5
  done
done
ls -1 "$DEST"

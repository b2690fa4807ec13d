#!/usr/bin/env bash
# Build the offline bundle for a GPU machine without network (benchmarks/gpu_bundle.py says what is in it and why):
# one folder to copy with the checkout, at most 60 MiB together with its tracked files; it prints the total size.
#
#   bash benchmarks/gpu_bundle.sh                 # -> gpu-bundle/ in the checkout (git-ignored); needs PyPI
#   bash benchmarks/gpu_bundle.sh /path/to/dir    # anywhere, e.g. beside the checkout
#   bash benchmarks/gpu_bundle.sh DIR --find-links WHEELS    # from wheels already on disk, offline
#
# There, from the checkout: `bash gpu-bundle/run.sh` (or the folder's path): the wheels go into a private target
# directory (pip --no-index --no-deps --target), then benchmarks/gpu_checks.sh runs with logs under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-gpu-bundle}
shift || true
exec "${PYTHON:-python3}" benchmarks/gpu_bundle.py build "$dest" "$@"

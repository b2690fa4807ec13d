#!/usr/bin/env bash
# The GPU acceptance run from the offline bundle; benchmarks/gpu_bundle.py copies this file into the bundle as
# run.sh. Run it from the g2-study checkout (or set G2_CHECKOUT); its arguments go to benchmarks/gpu_checks.sh:
#
#   bash gpu-bundle/run.sh                        # all checks; logs and summary.json under $OUT (default gpu-out/)
#   OUT=/tmp/out bash ../gpu-bundle/run.sh --only layers,study
#
# It installs the bundle's wheels into a fresh private directory (the machine's Python is not changed), unpacks
# PTB there, checks every installed requirement against the versions this machine has (a mismatch is reported in
# $OUT/bundle-verify.log, and the checks still run), then runs the checks with that directory on PYTHONPATH.
set -euo pipefail
bundle=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
checkout=${G2_CHECKOUT:-$PWD}
[ -f "$checkout/benchmarks/gpu_checks.sh" ] || checkout=$(dirname "$bundle")
if [ ! -f "$checkout/benchmarks/gpu_checks.sh" ]; then
    echo "run.sh: run it from the g2-study checkout, or set G2_CHECKOUT to it" >&2
    exit 2
fi
python=${PYTHON:-python3}
export OUT=${OUT:-$checkout/gpu-out}
mkdir -p "$OUT"
if ! "$python" -c 'import lzma, sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    echo "run.sh: the bundle holds CPython 3.12 wheels (LZMA-compressed): $python is $("$python" -V 2>&1)" \
         "or has no lzma; set PYTHON to a python3.12" >&2
    exit 2
fi
site=$(mktemp -d "${TMPDIR:-/tmp}/g2-bundle-site.XXXXXX")
start=$SECONDS
"$python" -m pip install --no-index --no-deps --find-links "$bundle/wheels" --target "$site" --no-compile \
    --disable-pip-version-check "$bundle"/wheels/*.whl >"$OUT/bundle-install.log" 2>&1 \
    || { echo "run.sh: pip install failed, see $OUT/bundle-install.log" >&2; tail -5 "$OUT/bundle-install.log" >&2; exit 1; }
mkdir -p "$site/data"
"$python" -W ignore::DeprecationWarning -m tarfile -e "$bundle"/data/ptb.tar.xz "$site/data"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export G2_DATA_DIR=${G2_DATA_DIR:-$site/data}
"$python" "$checkout/benchmarks/gpu_bundle.py" verify "$bundle" --site "$site" >"$OUT/bundle-verify.log" 2>&1 \
    || echo "run.sh: some bundled requirement is not met here, see $OUT/bundle-verify.log" >&2
echo "run.sh: bundle installed in $site in $((SECONDS - start)) s; running the checks" >&2
PYTHON=$python exec bash "$checkout/benchmarks/gpu_checks.sh" "$@"

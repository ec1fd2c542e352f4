#!/usr/bin/env bash
# The prepared GPU check (issue 17) on a GPU box without network, in one command:
#   bash experiments/gpu/run_all.sh [--budget-s 480] [--out DIR]      (results: $OUT or --out)
# 1. installs, offline, the wheels that experiments/gpu/prepare.sh put in experiments/gpu/wheels/ —
#    only the distributions this Python does not have, --no-deps, into experiments/gpu/site/ (put on
#    PYTHONPATH; the system's packages are neither changed nor shadowed);
# 2. runs experiments/gpu/run_all.py (every part under its own time budget; see its docstring).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-experiments/gpu/wheels}
SITE=$(realpath -m "${GPU_CHECK_SITE:-experiments/gpu/site}")
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d "$WHEELS" ]; then
  mapfile -t missing < <("$PY" - "$WHEELS" <<'PYEOF'
import sys
from importlib import metadata
from pathlib import Path

for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    dist = whl.name.split("-")[0]
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        print(whl)
PYEOF
)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${#missing[@]} wheels into $SITE"
    "$PY" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$SITE" "${missing[@]}"
  fi
else
  echo "no $WHEELS folder (run experiments/gpu/prepare.sh where PyPI is reachable); using what is installed" >&2
fi
exec "$PY" experiments/gpu/run_all.py "$@"

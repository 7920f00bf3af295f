#!/usr/bin/env bash
# Run every check capsa has: install what is missing (scripts/setup.sh
# --no-demo: packages, Python environment, cached guest kernel and image),
# then lint, type-check, and run the unit and integration tests (the latter
# boot real VMs under whatever accelerator the host allows).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${CAPSA_VENV:-/opt/capsa/venv}
"$repo/scripts/setup.sh" --no-demo
cd "$repo"
echo "==> ruff"
"$venv/bin/ruff" check src tests
echo "==> mypy --strict"
"$venv/bin/mypy" src
echo "==> pytest"
exec "$venv/bin/pytest" -q tests "$@"

#!/usr/bin/env bash
# Install system data and the Python environment (.venv) for exitserve. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
need_apt=()
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
[ -n "${EXITSERVE_SKIP_PROMETHEUS:-}" ] || command -v prometheus >/dev/null || need_apt+=(prometheus)
[ -n "${EXITSERVE_SKIP_WRK:-}" ] || command -v wrk >/dev/null || need_apt+=(wrk)  # the benchmarks' client
if [ ${#need_apt[@]} -gt 0 ]; then
    $SUDO apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[${EXITSERVE_EXTRAS:-train,test,loadtest,ray,grpc}]"

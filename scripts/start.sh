#!/usr/bin/env bash
# Install exitserve and start the server on the default model (POST /classify on :8000).
# On first start the committed checkpoint is exported and calibrated into model_repository/.
set -euo pipefail
cd "$(dirname "$0")/.."
EXITSERVE_SKIP_PROMETHEUS=1 EXITSERVE_SKIP_WRK=1 EXITSERVE_EXTRAS=train bash scripts/install.sh
exec .venv/bin/exitserve serve --host "${EXITSERVE_HOST:-127.0.0.1}" --port "${EXITSERVE_PORT:-8000}" "$@"

#!/usr/bin/env bash
# Export and calibrate every committed checkpoint (models/weights/*.pt) into one model
# repository, so one server serves all of them:
#   bash scripts/build_repository.sh [REPOSITORY]      (default: model_repository)
#   .venv/bin/exitserve serve --model-repository model_repository
set -euo pipefail
cd "$(dirname "$0")/.."
repository=${1:-model_repository}
for checkpoint in models/weights/*.pt; do
    name=$(basename "$checkpoint" .pt)
    echo "== $name"
    .venv/bin/exitserve export --checkpoint "$checkpoint" --out "$repository/$name" --overwrite
    .venv/bin/exitserve calibrate --repository "$repository/$name"
done

#!/usr/bin/env bash
# Regenerate the Open Inference Protocol's gRPC modules, checked in beside their .proto:
#   server/grpc/grpc_predict_v2_pb2.py (+ .pyi)   the messages
#   server/grpc/grpc_predict_v2_pb2_grpc.py       the service's servicer base and stub
# from server/grpc/grpc_predict_v2.proto, with grpcio-tools (not a dependency of exitserve:
# `.venv/bin/pip install 'grpcio-tools>=1.78,<1.80'`). The generated code asks for at least
# the protobuf and grpcio it was generated with: keep the `grpc` extra in pyproject.toml
# at or above them (protobuf 6.31.1 and grpcio 1.78.2 for grpcio-tools 1.78.2).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=server/grpc
"$PYTHON" -m grpc_tools.protoc -I "$OUT" --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
    "$OUT/grpc_predict_v2.proto"
# protoc writes the service module's import of the messages as a top-level module; here
# they are its sibling in the exitserve.server.grpc package
sed -i 's/^import grpc_predict_v2_pb2 as /from . import grpc_predict_v2_pb2 as /' "$OUT/grpc_predict_v2_pb2_grpc.py"
"$PYTHON" -m grpc_tools.protoc --version

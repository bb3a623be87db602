"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), beside v2 over
HTTP and on the same data plane: a third thin protocol layer.

* ``grpc_predict_v2.proto``: the protocol's published definition; ``grpc_predict_v2_pb2*.py``
  are generated from it (``scripts/generate_grpc.sh``) and checked in;
* ``tensors.py``: protobuf tensors and parameters to and from NumPy;
* ``errors.py``: the domain errors as gRPC status codes, in one table;
* ``servicer.py``: the RPCs, each a translation around ``server.oip`` and ``DataPlane.infer``;
* ``server.py``: the ``grpc.aio`` server on the HTTP server's own event loop, started and
  stopped by the app's lifespan.

Only ``require_grpc`` lives here, so that asking whether gRPC can be served imports nothing:
grpcio and protobuf are the optional ``grpc`` extra, imported only when a gRPC port is set.
"""

from __future__ import annotations

import importlib

from exitserve.errors import ConfigurationError

INSTALL_HINT = "pip install 'exitserve[grpc]'"


def require_grpc() -> None:
    """Refuse, in one line, to serve gRPC without its extra (or with a grpcio or protobuf
    older than the generated code needs), before the server starts."""
    try:
        importlib.import_module("exitserve.server.grpc.server")
    except ImportError as exc:
        raise ConfigurationError(f"a gRPC port needs the 'grpc' extra ({exc.name or exc} is not installed): "
                                 f"{INSTALL_HINT}") from None
    except RuntimeError as exc:  # grpcio older than the generated code (the code's own check)
        raise ConfigurationError(f"a gRPC port needs a newer grpcio ({exc}): {INSTALL_HINT}") from None
    except Exception as exc:  # protobuf older than the generated code: google.protobuf.runtime_version.VersionError
        if type(exc).__module__ != "google.protobuf.runtime_version":
            raise
        raise ConfigurationError(f"a gRPC port needs a newer protobuf ({exc}): {INSTALL_HINT}") from None

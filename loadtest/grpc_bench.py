"""The Open Inference Protocol over gRPC next to v2 over HTTP, on one exitserve process.

One run starts ``exitserve serve`` with ``EXITSERVE_GRPC_PORT`` on loopback and measures,
for each protocol with Triton's own Python client (``tritonclient``; raw contents over
gRPC, the binary tensor extension over HTTP), one PNG image per request at the same
explicit budget:

1. **sequential latency**: ``--requests`` requests one after another on one connection
   (the synchronous clients), p50 and p99;
2. **throughput at ``--concurrency``** (32): that many requests in flight for
   ``--duration`` seconds (the asyncio clients, one event loop), requests/s and p50/p99.

The client runs on the same machine as the server, so the report says which client, its
Python, the CPU and the CPU seconds each side used: on a small machine the Python client is
a large part of what is measured. Traffic goes only to 127.0.0.1 and is bounded in count
and time.

    python -m exitserve.loadtest.grpc_bench --repository model_repository --model msdnet_fmnist
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from exitserve.loadtest.images import encoded_test_images
from exitserve.loadtest.overload import (
    check_listener,
    free_port,
    process_cpu_seconds,
    process_tree,
    start_server,
    stop_server,
)

PROTOCOLS = ("grpc", "http")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    ms = np.array(latencies_s) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


# --------------------------------------------------------------------------- the clients


def sync_call(protocol: str, target: str, model: str, budget: float) -> tuple[Callable[[bytes], object], Callable]:
    """(infer one PNG, close) with the protocol's synchronous Triton client."""
    if protocol == "grpc":
        import tritonclient.grpc as client_lib
    else:
        import tritonclient.http as client_lib
    client = client_lib.InferenceServerClient(target)

    def infer(png: bytes) -> object:
        tensor = client_lib.InferInput("images", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([png], dtype=object))
        return client.infer(model, [tensor], parameters={"budget": budget})

    return infer, client.close


def async_call(protocol: str, target: str, model: str,
               budget: float) -> tuple[Callable[[bytes], Awaitable[object]], Callable[[], Awaitable[None]]]:
    """(infer one PNG, close) with the protocol's asyncio Triton client."""
    if protocol == "grpc":
        import tritonclient.grpc as tensors
        import tritonclient.grpc.aio as client_lib
    else:
        import tritonclient.http as tensors
        import tritonclient.http.aio as client_lib
    client = client_lib.InferenceServerClient(target)

    async def infer(png: bytes) -> object:
        tensor = tensors.InferInput("images", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([png], dtype=object))
        return await client.infer(model, [tensor], parameters={"budget": budget})

    return infer, client.close


# --------------------------------------------------------------------------- the measurements


def sequential(protocol: str, target: str, model: str, budget: float, pngs: list[bytes], requests: int,
               server_pid: int) -> dict:
    infer, close = sync_call(protocol, target, model, budget)
    try:
        for png in pngs[:10]:  # connection, first-call and lazy-import costs out of the numbers
            infer(png)
        latencies = []
        client_cpu, server_cpu = own_cpu_seconds(), process_cpu_seconds(server_pid)
        for i in range(requests):
            started = time.perf_counter()
            infer(pngs[i % len(pngs)])
            latencies.append(time.perf_counter() - started)
        return {"protocol": protocol, "requests": requests, **percentiles(latencies),
                "client_cpu_s": round(own_cpu_seconds() - client_cpu, 3),
                "server_cpu_s": round(process_cpu_seconds(server_pid) - server_cpu, 3)}
    finally:
        close()


async def _concurrent(protocol: str, target: str, model: str, budget: float, pngs: list[bytes], concurrency: int,
                      duration: float, server_pid: int) -> dict:
    infer, close = async_call(protocol, target, model, budget)
    latencies: list[float] = []
    errors = 0
    try:
        await asyncio.gather(*(infer(png) for png in pngs[:concurrency]))  # warm: one connection, lazy imports
        client_cpu, server_cpu = own_cpu_seconds(), process_cpu_seconds(server_pid)
        started = time.perf_counter()
        stop_at = started + duration

        async def user(offset: int) -> None:
            nonlocal errors
            i = offset
            while time.perf_counter() < stop_at:
                sent = time.perf_counter()
                try:
                    await infer(pngs[i % len(pngs)])
                except Exception:  # noqa: BLE001 (counted, not fatal: an overloaded server answers 503s)
                    errors += 1
                else:
                    latencies.append(time.perf_counter() - sent)
                i += concurrency

        await asyncio.gather(*(user(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - started
        return {"protocol": protocol, "concurrency": concurrency, "seconds": round(elapsed, 2),
                "requests_per_s": round(len(latencies) / elapsed, 1), "errors": errors, **percentiles(latencies),
                "client_cpu_s": round(own_cpu_seconds() - client_cpu, 3),
                "server_cpu_s": round(process_cpu_seconds(server_pid) - server_cpu, 3)}
    finally:
        await close()


def concurrent(*args) -> dict:
    return asyncio.run(_concurrent(*args))


# --------------------------------------------------------------------------- the run


def client_description() -> str:
    version = importlib.metadata.version("tritonclient")
    return (f"tritonclient {version} (Python {platform.python_version()}; sequential: the synchronous clients, "
            f"concurrent: tritonclient.grpc.aio / tritonclient.http.aio on one asyncio loop), on the server's "
            f"machine: {cpu_name()}, {os.cpu_count()} cores")


def markdown(report: dict) -> str:
    lines = [f"Client: {report['client']}.", "",
             "| protocol | sequential p50 ms | p99 ms | C | requests/s | p50 ms | p99 ms | errors | "
             "client CPU s | server CPU s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for seq, conc in zip(report["sequential"], report["concurrent"]):
        lines.append(f"| {seq['protocol']} | {seq['p50_ms']} | {seq['p99_ms']} | {conc['concurrency']} | "
                     f"{conc['requests_per_s']} | {conc['p50_ms']} | {conc['p99_ms']} | {conc['errors']} | "
                     f"{conc['client_cpu_s']} | {conc['server_cpu_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="msdnet_fmnist")
    parser.add_argument("--budget", type=float, default=0.25, help="every request's budget (explicit: the online "
                        "controller is left alone, so both protocols ask for the same work)")
    parser.add_argument("--requests", type=int, default=1000, help="sequential requests per protocol")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of concurrent load per protocol")
    parser.add_argument("--images", type=int, default=256, help="distinct test images sent in turn")
    parser.add_argument("--out", type=Path, default=None, help="write the report here as JSON")
    args = parser.parse_args(argv)

    pngs, _ = encoded_test_images(args.images)
    http_port, grpc_port = free_port(), free_port()
    log = Path(tempfile.mkdtemp(prefix="exitserve-grpc-bench-")) / "server.log"
    server = start_server(args.repository.resolve(), http_port, {"EXITSERVE_GRPC_PORT": str(grpc_port)}, log,
                          label="exitserve (HTTP and gRPC)")
    try:
        check_listener(grpc_port, process_tree(server.pid), "exitserve gRPC")
        targets = {"grpc": f"127.0.0.1:{grpc_port}", "http": f"127.0.0.1:{http_port}"}
        report = {"client": client_description(), "model": args.model, "budget": args.budget,
                  "sequential": [sequential(p, targets[p], args.model, args.budget, pngs, args.requests, server.pid)
                                 for p in PROTOCOLS],
                  "concurrent": [concurrent(p, targets[p], args.model, args.budget, pngs, args.concurrency,
                                            args.duration, server.pid) for p in PROTOCOLS]}
    finally:
        stop_server(server)
    print(markdown(report))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Raw HTTP on a socket, for what a client library will not send (cut-off bodies, lying
headers), and reading one sample out of a Prometheus exposition."""

from __future__ import annotations

import socket
import time

from prometheus_client.parser import text_string_to_metric_families


def raw_request(port: int, head: bytes, body: bytes = b"", wait_s: float = 5.0) -> tuple[bytes, float, bool]:
    """Send ``head`` and ``body`` on a fresh socket and read until the server closes or
    ``wait_s`` passes: (what came back, seconds until it closed or the wait ended, closed?)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(head + body)
        started = time.monotonic()
        received = b""
        sock.settimeout(0.2)
        while time.monotonic() - started < wait_s:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                return received, time.monotonic() - started, True
            if not chunk:
                return received, time.monotonic() - started, True
            received += chunk
        return received, time.monotonic() - started, False


def post_head(path: str, length: int, content_type: str = "image/png") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: {content_type}\r\n"
            f"content-length: {length}\r\n\r\n").encode()


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0

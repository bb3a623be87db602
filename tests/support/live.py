"""A real uvicorn server on a loopback port, in a background thread; and the readiness wait
for a server in a subprocess, which makes sure the process that answers is the one started."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

import httpx
import uvicorn

from exitserve.loadtest.overload import check_listener, process_tree
from exitserve.server.http.app import create_app
from exitserve.server.http.serving import header_timeout_protocol
from exitserve.server.settings import Settings


def free_port() -> int:
    """A loopback port free now, for a subprocess that binds it itself. Something else may
    take it first: ``wait_until_ready`` then refuses the stranger's answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(settings: Settings, wait_ready: bool = True, timeout: float = 120.0,
                apps: list | None = None) -> Iterator[str]:
    """Serve ``settings`` on a loopback port; ``apps`` (a list) receives the app, for tests
    that look at its state. The socket is bound here and handed to uvicorn, so no other
    process can take the port between choosing it and serving on it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        settings = settings.model_copy(update={"host": "127.0.0.1", "port": port})
        app = create_app(settings)
        if apps is not None:
            apps.append(app)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                               access_log=False, http=header_timeout_protocol(settings.header_timeout_s)))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        try:
            while not server.started:
                if time.monotonic() > deadline or not thread.is_alive():
                    raise RuntimeError("uvicorn did not start")
                time.sleep(0.02)
            if wait_ready:
                with httpx.Client(base_url=url, timeout=10) as client:
                    while client.get("/readyz").status_code != 200:
                        if time.monotonic() > deadline:
                            raise RuntimeError("server never became ready")
                        time.sleep(0.05)
            yield url
        finally:
            server.should_exit = True
            thread.join(timeout=30)
    finally:
        sock.close()


def wait_until_ready(url: str, process: subprocess.Popen, timeout: float = 120.0,
                     owners: Callable[[], Iterable[int]] | None = None) -> None:
    """Poll ``url``/readyz until 200, then check that the socket answering on the port is
    held by ``process`` or its descendants (or by ``owners()``, the pids of a server that
    is not a descendant, as Ray's proxy); fail with the server's output if it exits or
    times out."""
    deadline = time.monotonic() + timeout
    port = urlparse(url).port
    with httpx.Client(timeout=2) as client:
        while True:
            if process.poll() is not None:
                output = process.stdout.read() if process.stdout else ""
                raise RuntimeError(f"the server exited with {process.returncode}:\n{str(output)[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready within {timeout:g} s")
            try:
                if client.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    pids = list(owners()) if owners is not None else process_tree(process.pid)
    check_listener(port, pids, url)

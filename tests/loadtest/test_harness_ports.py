"""The harness's guard against measuring a stranger: it will not start a server on a port
something already holds, and it tells a socket its child holds from anyone else's."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from exitserve.loadtest.overload import check_listener, ensure_port_free, launch, port_for, process_tree

LINUX = Path("/proc/net/tcp").exists()


def listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_a_port_someone_listens_on_is_refused_before_anything_starts(tmp_path: Path) -> None:
    stranger = listening()
    try:
        port = stranger.getsockname()[1]
        with pytest.raises(RuntimeError, match="already taken"):
            ensure_port_free(port)
        marker = tmp_path / "started"
        with pytest.raises(RuntimeError, match="already taken"):
            launch([sys.executable, "-c", f"open({str(marker)!r}, 'w')"], f"http://127.0.0.1:{port}", "/readyz",
                   {}, tmp_path / "log", "stranger's port", 5)
        assert not marker.exists()  # refused before the child was started
    finally:
        stranger.close()
    ensure_port_free(port)  # closed: free again


@pytest.mark.skipif(not LINUX, reason="the owner check reads /proc (Linux)")
def test_the_listening_socket_must_be_held_by_the_started_process() -> None:
    sock = listening()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        port = sock.getsockname()[1]
        check_listener(port, [os.getpid()], "this process")  # ours: no complaint
        with pytest.raises(RuntimeError, match="not held by the process started here"):
            check_listener(port, process_tree(child.pid), "a child that listens nowhere")
    finally:
        child.kill()
        child.wait(10)
        sock.close()
    with pytest.raises(RuntimeError, match="not held"):  # nobody listens: no answer was ours either
        check_listener(port, [os.getpid()], "a closed port")


def test_port_zero_means_a_free_port_for_each_server() -> None:
    assert port_for(8810, 2) == 8812
    port = port_for(0, 2)
    assert port != 0
    ensure_port_free(port)

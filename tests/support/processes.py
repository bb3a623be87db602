"""``exitserve serve`` as a real process, for signals, workers and start-up faults, and
polling with a deadline instead of sleeping."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.live import free_port, wait_until_ready

MARGIN_S = 20.0  # start-up and exit of the process on a busy machine: far below any hang being tested


def eventually(check: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``check`` until it returns something true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)
    return value


def readiness(url: str) -> str:
    """/readyz's status, or "" when nothing answers."""
    try:
        return httpx.get(f"{url}/readyz", timeout=5).json()["status"]
    except httpx.HTTPError:
        return ""


class ServerProcess:
    """``exitserve serve`` in a session of its own (its workers included), for signals and
    start-up faults; ``stop`` kills the whole session. Output goes to a file, so a chatty
    server cannot block on a full pipe and a worker left behind cannot hold it open."""

    def __init__(self, repository: Path, **env: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {**os.environ, **{f"EXITSERVE_{k.upper()}": str(v) for k, v in env.items()}}
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exitserve.cli", "serve", "--model-repository", str(repository),
             "--port", str(self.port), "--log-level", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT, env=environment, text=True, start_new_session=True)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self, timeout: float = 120) -> None:
        try:
            wait_until_ready(self.url, self.proc, timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self.output()[-4000:]}") from None

    def wait_exit(self, timeout: float) -> tuple[int, str]:
        """(exit status, output); fails the test if the process is still running after ``timeout`` s."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            output = self.output()
            self.stop()
            pytest.fail(f"the server did not exit within {timeout:g} s:\n{output[-4000:]}")
        return self.proc.returncode, self.output()

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group outlives its leader while a worker is left
        self.proc.wait()


def gone(processes: list[psutil.Process]) -> bool:
    """Every one of ``processes`` has exited (a zombie waiting for init counts as exited)."""
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


@contextlib.contextmanager
def running(served_repository: Path, **env: object) -> Iterator[ServerProcess]:
    server = ServerProcess(served_repository, **env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()

"""Overload test: exitserve with a small admission queue vs the default queue, under wrk.

One run starts exitserve twice in turn on loopback (once with
``EXITSERVE_MAX_QUEUE_IMAGES=<queue>``, once with the default queue), drives each with
``wrk -t1 -c<connections> -d<duration>s --latency -s loadtest/wrk/classify.lua`` (raw PNG
bodies of Fashion-MNIST test images to POST /classify) and prints a Markdown table:
successful (2xx) and 503 responses per second, other statuses, latency percentiles, and
the CPU used by wrk and by the server (% of one core). The numbers go to ``--out`` as JSON.
Traffic goes only to 127.0.0.1, for ``--duration`` seconds per configuration.

    python -m exitserve.loadtest.overload --repository model_repository --connections 64 --duration 20 --queue 8

Needs ``wrk`` (Debian: ``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlparse

ROOT = Path(__file__).resolve().parent.parent
LUA_SCRIPT = ROOT / "loadtest" / "wrk" / "classify.lua"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MARKER = "STATUS_COUNTS "


# --------------------------------------------------------------------------- the server


@dataclass
class Server:
    """An exitserve subprocess; its stderr goes to ``log``. ``group``: it leads a process
    group of its own (``launch`` starts it so), which ``stop_server`` kills last."""

    proc: subprocess.Popen
    url: str
    log: Path
    group: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


# --------------------------------------------------------------------------- ports
# /proc/net/tcp{,6} local addresses that take a connection to 127.0.0.1: 127.0.0.1, 0.0.0.0,
# :: (dual stack) and ::ffff:127.0.0.1, as the kernel prints them
LOOPBACK_LISTENERS = {"0100007F", "00000000", "0" * 32, "0000000000000000FFFF00000100007F"}
TCP_LISTEN = "0A"


def free_port() -> int:
    """A loopback port free now. Another process may take it before the server binds it:
    ``launch`` then refuses the stranger rather than measuring it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_for(base: int, offset: int) -> int:
    """The port of a harness's ``offset``-th server: ``base + offset``, or a free port when
    ``base`` is 0 (what tests ask for: no fixed port to collide on)."""
    return free_port() if base == 0 else base + offset


def ensure_port_free(port: int, host: str = "127.0.0.1") -> None:
    """Refuse to start a server on a port something already holds: its answers would pass
    for ours. (The bind uses SO_REUSEADDR, as uvicorn does: a connection in TIME_WAIT is
    no obstacle, a listener is.)"""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise RuntimeError(f"port {port} on {host} is already taken ({exc.strerror}): "
                               "not starting a server there") from exc


def loopback_listeners(port: int) -> set[int] | None:
    """Inodes of the sockets listening on TCP ``port`` that a connection to 127.0.0.1
    reaches, from /proc/net/tcp and tcp6; None where there is no /proc (not Linux)."""
    found: set[int] = set()
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()  # sl local_address rem_address st ... uid timeout inode
            address, _, hex_port = fields[1].partition(":")
            if fields[3] == TCP_LISTEN and int(hex_port, 16) == port and address in LOOPBACK_LISTENERS:
                found.add(int(fields[9]))
    return found if readable else None


def socket_inodes(pids: list[int]) -> set[int]:
    """Inodes of every socket the processes ``pids`` hold open (``socket:[N]`` in /proc/<pid>/fd)."""
    inodes: set[int] = set()
    for pid in pids:
        try:
            fds = list(os.scandir(f"/proc/{pid}/fd"))
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                target = os.readlink(fd.path)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (worker processes hold the shared socket too)."""
    return [pid, *_descendants(pid)]


def check_listener(port: int, pids: list[int], label: str) -> None:
    """Raise unless every socket that answers 127.0.0.1:``port`` belongs to ``pids``: a
    readiness answer proves nothing when a stranger holds the port. No-op without /proc."""
    listening = loopback_listeners(port)
    if listening is None:
        return
    strangers = listening - socket_inodes(pids)
    if not listening or strangers:
        raise RuntimeError(f"{label}: 127.0.0.1:{port} answered, but the socket listening there is not held by "
                           f"the process started here (pids {pids}; listening socket inodes {sorted(listening)}, "
                           f"not ours {sorted(strangers)})")


# --------------------------------------------------------------------------- starting and stopping


def start_server(repository: Path, port: int, env: dict[str, str | None], log: Path,
                 timeout: float = 300.0, label: str = "exitserve") -> Server:
    """Start ``exitserve serve`` on 127.0.0.1:``port`` and wait until /readyz answers 200.

    ``env`` is merged into the environment; a value of None removes that variable."""
    cmd = [sys.executable, "-m", "exitserve.cli", "serve", "--model-repository", str(repository),
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return launch(cmd, f"http://127.0.0.1:{port}", "/readyz", env, log, label, timeout)


def launch(cmd: list[str], base_url: str, ready_path: str, env: dict[str, str | None], log: Path, label: str,
           timeout: float, stop: Callable[[Server], int | None] | None = None) -> Server:
    """Run ``cmd`` from the repository root (its output to ``log``, in a process group of
    its own) and wait until ``base_url + ready_path`` answers 200 from it: the port must be
    free before the start, and the socket answering on it the child's (or its descendants')
    once ready. On failure ``stop`` it (default ``stop_server``)."""
    port = urlparse(base_url).port
    if port is None:
        raise ValueError(f"{base_url}: no port")
    ensure_port_free(port)
    full_env = dict(os.environ)
    for key, value in env.items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT,
                                start_new_session=True)
    server = Server(proc, base_url, log, group=True)
    try:
        wait_until_ready(server, f"{base_url}{ready_path}", label, timeout)
        check_listener(port, process_tree(server.pid), label)
    except BaseException:
        (stop or stop_server)(server)
        raise
    return server


def wait_until_ready(server: Server, ready_url: str, label: str, timeout: float) -> None:
    """Poll ``ready_url`` until 200, printing progress; raise with the log's tail if the
    server exits or the timeout passes."""
    started = time.monotonic()
    try:
        while True:
            waited = time.monotonic() - started
            print(f"\r{label}: waiting for {ready_url} ... {waited:4.0f} s", end="", file=sys.stderr, flush=True)
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as response:
                    if response.status == 200:
                        print(f"\r{label}: ready after {waited:.1f} s (pid {server.pid}){' ' * 10}", file=sys.stderr)
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if server.proc.poll() is not None:
                raise RuntimeError(f"{label} exited with {server.proc.returncode}:\n{server.log_tail()}")
            if waited > timeout:
                raise RuntimeError(f"{label} was not ready in {timeout:.0f} s:\n{server.log_tail()}")
            time.sleep(0.5)
    except BaseException:
        print(file=sys.stderr)
        raise


def stop_server(server: Server, grace: float = 30.0) -> int | None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; then SIGKILL whatever is left of its
    process group (worker processes that outlived it). Returns the exit status."""
    proc = server.proc
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                print(f"{server.url} (pid {proc.pid}) still running {grace:.0f} s after SIGTERM: killing",
                      file=sys.stderr)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if server.group:
            _kill_group(proc.pid)
    return proc.returncode


def _kill_group(pgid: int, timeout: float = 10.0) -> None:
    """SIGKILL every process left in group ``pgid`` and wait, with a deadline, until none
    runs (a zombie waits for its new parent to reap it; it holds nothing)."""
    if not Path("/proc/self/stat").exists():  # no /proc to watch: one SIGKILL to the group
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return
    deadline = time.monotonic() + timeout
    while _group_running(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # emptied meanwhile, or not ours
            return
        if time.monotonic() > deadline:
            print(f"process group {pgid}: still running {timeout:.0f} s after SIGKILL", file=sys.stderr)
            return
        time.sleep(0.05)


def _group_running(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (not a zombie), from /proc/*/stat."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # state ppid pgrp ...
        except OSError:
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def process_cpu_seconds(pid: int) -> float:
    """user + system CPU time of a live process and its live descendants (the workers of
    ``--workers N``), from /proc/<pid>/stat (threads included)."""
    total = 0.0
    for one in [pid, *_descendants(pid)]:
        try:
            stat = Path(f"/proc/{one}/stat").read_text()
        except FileNotFoundError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; fields[0] is field 3 (state)
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)
    return total


def _descendants(pid: int) -> list[int]:
    """Live descendants of ``pid``, from the parent of every process in /proc/*/stat
    (/proc/<pid>/task/*/children needs a kernel option not every kernel has)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # state ppid ...
        except OSError:  # exited meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = [], [pid]
    while frontier:
        kids = children.get(frontier.pop(), [])
        found += kids
        frontier += kids
    return found


def children_cpu_seconds() -> float:
    """user + system CPU time of this process's terminated, waited-for children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- wrk


def require_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        sys.exit("loadtest.overload: `wrk` is not installed (or not on PATH). "
                 "On Debian/Ubuntu: apt-get install wrk")
    return wrk


def wrk_version(wrk: str) -> str:
    out = subprocess.run([wrk, "-v"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout
    return (out.splitlines() or [""])[0].strip()


def write_images(folder: Path, count: int) -> int:
    """The first ``count`` Fashion-MNIST test images as PNG files in ``folder``."""
    from exitserve.loadtest.images import encoded_test_images

    blobs, _ = encoded_test_images(count)
    for i, blob in enumerate(blobs):
        (folder / f"{i:05d}.png").write_bytes(blob)
    return len(blobs)


def run_wrk(wrk: str, url: str, images: Path, connections: int, duration: int, label: str,
            timeout: str | None = None, multipart: bool = False, script: Path | None = None,
            env: dict[str, str] | None = None) -> tuple[dict, str, float]:
    """One wrk run (raw PNG bodies, or multipart forms); returns the STATUS_COUNTS record,
    wrk's stdout, and wrk's CPU seconds."""
    cmd = [wrk, "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script or LUA_SCRIPT)]
    if timeout:
        cmd += ["--timeout", timeout]
    cmd.append(url)
    env = {**os.environ, **(env or {}), "EXITSERVE_WRK_IMAGES": str(images),
           "EXITSERVE_WRK_MULTIPART": "1" if multipart else "0"}
    cpu_before = children_cpu_seconds()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    started = time.monotonic()
    try:
        while True:
            print(f"\r{label}: wrk {time.monotonic() - started:4.0f}/{duration} s", end="", file=sys.stderr,
                  flush=True)
            try:
                proc.wait(timeout=1)
                break
            except subprocess.TimeoutExpired:
                pass
        output = proc.stdout.read()
    finally:  # interrupted (Ctrl-C, a test's timeout): wrk goes too
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    cpu = children_cpu_seconds() - cpu_before
    print(f"\r{label}: wrk done ({time.monotonic() - started:.1f} s){' ' * 10}", file=sys.stderr)
    record = next((json.loads(line[len(MARKER):]) for line in output.splitlines() if line.startswith(MARKER)), None)
    if proc.returncode != 0 or record is None:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}): {' '.join(cmd)}\n{output[-3000:]}")
    return record, output, cpu


@dataclass
class WrkRun:
    """One measured wrk run: wrk's record and output, and the CPU both sides spent over it."""

    record: dict
    output: str
    client_cpu: float
    server_cpu: float
    wall: float

    @property
    def duration(self) -> float:
        return self.record["duration_s"] or self.wall

    @property
    def status(self) -> dict[int, int]:
        return {int(code): n for code, n in self.record["status"].items()}

    @property
    def ok(self) -> int:
        """2xx responses."""
        return sum(n for code, n in self.status.items() if 200 <= code < 300)

    @property
    def socket_errors(self) -> dict[str, int]:
        return {k: v for k, v in self.record["errors"].items() if k != "status" and v}

    def summary(self) -> dict:
        """What every report of a wrk run says."""
        return {
            "duration_s": self.duration,
            "requests": self.record["requests"],
            "status_counts": {str(code): n for code, n in sorted(self.status.items())},
            "ok_per_s": self.ok / self.duration,
            "socket_errors": self.socket_errors,
            "latency_ms": self.record["latency_ms"],
            "client_cpu_s": self.client_cpu,
            "client_cpu_pct": 100 * self.client_cpu / self.wall,
            "server_cpu_s": self.server_cpu,
            "server_cpu_pct": 100 * self.server_cpu / self.wall,
            "wall_s": self.wall,
            "wrk_output": self.output,
        }


def measured_wrk(wrk: str, server: Server, url: str, images: Path, connections: int, duration: int, label: str,
                 timeout: str | None = None, **options) -> WrkRun:
    """``run_wrk`` (``options``: multipart, script, env) with the server's CPU over the run."""
    cpu_before, wall_before = process_cpu_seconds(server.pid), time.monotonic()
    record, output, client_cpu = run_wrk(wrk, url, images, connections, duration, label, timeout, **options)
    wall = time.monotonic() - wall_before
    return WrkRun(record, output, client_cpu, process_cpu_seconds(server.pid) - cpu_before, wall)


# --------------------------------------------------------------------------- one configuration


def measure(name: str, env: dict[str, str | None], args: argparse.Namespace, wrk: str, images: Path,
            url_query: str, log: Path) -> dict:
    """Start the server with ``env``, optionally warm it up, run wrk, stop the server."""
    server = start_server(args.repository, args.port, env, log, label=name)
    try:
        url = f"{server.url}/classify{url_query}"
        if args.warmup > 0:
            run_wrk(wrk, url, images, args.connections, args.warmup, f"{name} (warm-up)", args.wrk_timeout)
        run = measured_wrk(wrk, server, url, images, args.connections, args.duration, name, args.wrk_timeout)
    finally:
        exit_status = stop_server(server)
    status = run.status
    return {
        "configuration": name,
        "env": {k: v for k, v in env.items() if v is not None},
        "url": url,
        "connections": args.connections,
        **run.summary(),
        "rejected_503_per_s": status.get(503, 0) / run.duration,
        "other_statuses": {str(code): n for code, n in sorted(status.items())
                           if not (200 <= code < 300 or code == 503)},
        "server_exit_status": exit_status,
    }


def markdown(results: list[dict], cpu_count: int | None) -> str:
    lines = [
        "| configuration | successful req/s (2xx) | 503/s | other statuses | p50 ms | p99 ms | client CPU % | server CPU % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        other = {**r["other_statuses"], **{f"socket {k}": v for k, v in r["socket_errors"].items()}}
        other_text = ", ".join(f"{k}: {v}" for k, v in other.items()) or "none"
        lat = r["latency_ms"]
        lines.append(f"| {r['configuration']} | {r['ok_per_s']:.0f} | {r['rejected_503_per_s']:.0f} | {other_text} | "
                     f"{lat['p50']:.2f} | {lat['p99']:.2f} | {r['client_cpu_pct']:.0f} | {r['server_cpu_pct']:.0f} |")
    lines += ["", f"wrk -t1 -c{results[0]['connections']}, {results[0]['duration_s']:.0f} s per configuration; "
              f"CPU % is of one core ({cpu_count} cores here); latency percentiles are wrk's, over all "
              "responses (fast 503s included)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, required=True, help="model repository (folder of model folders)")
    parser.add_argument("--model", default=None, help="model to request (default: the server's default model)")
    parser.add_argument("--budget", type=float, default=None, help="?budget= sent with each request")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=int, default=20, help="seconds of measured load per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured wrk load first (0: none)")
    parser.add_argument("--queue", type=int, default=8, help="EXITSERVE_MAX_QUEUE_IMAGES of the small-queue run")
    parser.add_argument("--compare", choices=["queue", "workers", "threads"], default="queue",
                        help="queue: a small queue against the default one; workers: 1 worker against --workers; "
                             "threads: ONNX Runtime's own thread count against 1 intra-op thread")
    parser.add_argument("--workers", type=int, default=2, help="EXITSERVE_WORKERS of the second run (--compare workers)")
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--images", type=int, default=256, help="Fashion-MNIST test images to cycle")
    parser.add_argument("--wrk-timeout", default=None, help="wrk --timeout (wrk's default: 2s)")
    parser.add_argument("--out", type=Path, default=Path("runs/overload.json"))
    args = parser.parse_args(argv)

    wrk = require_wrk()
    if not args.repository.is_dir():
        parser.error(f"{args.repository} is not a directory")
    from exitserve.server.settings import Settings

    default_queue = Settings.model_fields["max_queue_images"].default
    query = {k: v for k, v in {"model": args.model, "budget": args.budget}.items() if v is not None}
    url_query = f"?{urlencode(query)}" if query else ""
    base_env: dict[str, str | None] = {"EXITSERVE_DEFAULT_MODEL": args.model} if args.model else {}
    if args.compare == "queue":
        configurations = [
            (f"max_queue_images={args.queue}", {**base_env, "EXITSERVE_MAX_QUEUE_IMAGES": str(args.queue),
                                                 "EXITSERVE_MAX_FILES": str(min(args.queue, 256))}),
            (f"default queue ({default_queue})", {**base_env, "EXITSERVE_MAX_QUEUE_IMAGES": None}),
        ]
    elif args.compare == "threads":
        configurations = [
            ("intra-op threads: all cores", {**base_env, "EXITSERVE_INTRA_OP_THREADS": str(os.cpu_count() or 1)}),
            ("intra-op threads: 1", {**base_env, "EXITSERVE_INTRA_OP_THREADS": "1"}),
        ]
    else:
        configurations = [
            ("1 worker", {**base_env, "EXITSERVE_WORKERS": "1"}),
            (f"{args.workers} workers", {**base_env, "EXITSERVE_WORKERS": str(args.workers)}),
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="exitserve-overload-") as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        print(f"writing {args.images} test images as PNG to {images}", file=sys.stderr)
        count = write_images(images, args.images)
        results = []
        for i, (name, env) in enumerate(configurations):
            log = args.out.with_name(f"{args.out.stem}.server{i}.log")
            results.append(measure(name, env, args, wrk, images, url_query, log))
    report = {"repository": str(args.repository), "model": args.model, "budget": args.budget, "images": count,
              "cpu_count": os.cpu_count(), "wrk": wrk_version(wrk), "results": results}
    args.out.write_text(json.dumps(report, indent=2))
    print(markdown(results, os.cpu_count()))
    print(f"\nwritten: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

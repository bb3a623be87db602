"""A real multi-node Ray cluster on this machine: each node its own ``ray start`` (1 CPU,
127.0.0.1, its own temp dir and ports), stopped by process group, never by name.

``ray stop`` would stop every Ray process on the machine, whoever started it; here each
node's ``ray start`` runs in a session of its own, so its daemons (GCS, raylet, agents) and
the raylet's workers share that process group, and a node is stopped by signalling its
group alone. A node's processes are also found by its temp dir in their command line, in
case one left the group.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.support.live import free_port

RAY = str(Path(sys.executable).parent / "ray")
OBJECT_STORE_BYTES = 80 * 1024 * 1024  # Ray's floor is 75 MiB; the replicas pass no objects
WORKER_PORTS = 200  # per node: each worker process of the node takes one
LOWEST_PORT = 20000


def free_port_block(size: int, avoid: list[range]) -> range:
    """``size`` consecutive loopback ports, all free now, below the kernel's ephemeral
    range (where its own client ports land) and outside ``avoid``: a node's worker ports.
    Ray binds them itself, so they cannot be handed over; a random start keeps two test
    runs on one machine apart."""
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    top = max(ephemeral, LOWEST_PORT + 10 * size) - size
    rng = random.Random()  # its own seed: a test run's seeded `random` would pick the same block each run
    for _ in range(200):
        low = rng.randrange(LOWEST_PORT, top)
        block = range(low, low + size)
        if any(block.start < r.stop and r.start < block.stop for r in avoid):
            continue
        if all(_bindable(port) for port in block):
            return block
    raise RuntimeError(f"no {size} consecutive free ports from {LOWEST_PORT}")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class RayNode:
    name: str
    temp_dir: Path
    process_group: int

    def processes(self) -> list[psutil.Process]:
        """Every live process of this node: its group, the raylet's descendants, and any
        process naming its temp dir."""
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if os.getpgid(proc.pid) == self.process_group or str(self.temp_dir) in " ".join(
                        proc.info["cmdline"] or ()):
                    found[proc.pid] = proc
                    for child in proc.children(recursive=True):
                        found[child.pid] = child
            except (psutil.Error, ProcessLookupError, OSError):
                continue
        return list(found.values())

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 20.0) -> None:
        """Signal every process of the node and wait until they are gone (SIGKILL after
        ``timeout``): a machine that drops off the cluster."""
        procs = self.processes()
        for proc in procs:
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)


class LocalRayCluster:
    """Nodes on 127.0.0.1: ``start_head()``, then ``add_node()`` as often as wanted; ``stop()``
    in a ``finally``."""

    def __init__(self, cpus_per_node: int = 1) -> None:
        # short: Ray's Unix socket paths must stay under 108 bytes
        self.root = Path(tempfile.mkdtemp(prefix="exr-", dir="/tmp"))
        self.cpus = cpus_per_node
        self.nodes: list[RayNode] = []
        self.gcs_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self._worker_ports: list[range] = []  # one block per node, apart
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}

    def _start(self, name: str, args: list[str], timeout: float = 120.0) -> RayNode:
        temp_dir = self.root / name
        ports = free_port_block(WORKER_PORTS, self._worker_ports)
        self._worker_ports.append(ports)
        command = [RAY, "start", "--num-cpus", str(self.cpus), "--node-ip-address", "127.0.0.1",
                   "--temp-dir", str(temp_dir), "--object-store-memory", str(OBJECT_STORE_BYTES),
                   "--disable-usage-stats", "--min-worker-port", str(ports.start), "--max-worker-port", str(ports.stop - 1),
                   "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
                   *args]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=self.env, start_new_session=True)
        node = RayNode(name, temp_dir, process_group=proc.pid)
        self.nodes.append(node)  # before it is up: stop() finds it even if the start fails
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            node.kill()
            raise RuntimeError(f"`ray start` for {name} did not return within {timeout:g} s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"`ray start` for {name} failed ({proc.returncode}):\n{output[-4000:]}")
        return node

    def start_head(self) -> RayNode:
        return self._start("head", ["--head", "--port", str(self.gcs_port), "--include-dashboard", "false",
                                    "--ray-client-server-port", str(free_port())])

    def add_node(self) -> RayNode:
        return self._start(f"node{len(self.nodes)}", ["--address", self.address])

    def alive_nodes(self) -> int:
        """Nodes the cluster counts as alive (from ``ray status``' resource summary)."""
        done = subprocess.run([RAY, "status", "--address", self.address], capture_output=True, text=True,
                              env=self.env, timeout=60)
        text = done.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return sum(1 for line in text.splitlines() if line.strip().startswith("1 node_"))

    def stop(self) -> None:
        """Every node, head last; whatever state they are in."""
        for node in reversed(self.nodes):
            node.kill(signal.SIGTERM, timeout=10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(n.processes() for n in self.nodes):
            time.sleep(0.2)
        for node in self.nodes:
            node.kill(signal.SIGKILL, timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)

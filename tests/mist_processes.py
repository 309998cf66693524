"""Real processes on loopback for the service-scale tests and benchmarks/mist_scale.py:
a ``redis-server``, a ``deltavision serve`` (either engine), and the Ray Serve replicas under it.

Every process is started here in its own session and stopped here by its process group id;
nothing is looked up or killed by name outside the groups these helpers started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

INSTALL_REDIS = "redis-server is not installed: apt-get install -y redis-server (the README's set-up and .ci/run do)"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop_group(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process, wait ``grace`` seconds, then SIGKILL its whole process group."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever it left behind (Ray's agents) dies with it
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


class RedisProcess:
    """A throw-away ``redis-server`` on a loopback port: no persistence, killable and restartable."""

    def __init__(self, folder: Path, port: int | None = None):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError(INSTALL_REDIS)
        self.folder, self.port = Path(folder), port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisProcess":
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", str(self.folder), "--protected-mode", "yes"]  # fmt: skip
        log = open(self.folder / f"redis-{self.port}.log", "a")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_until_up()
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None:
            _stop_group(self.process, grace=0)
            self.process = None

    def _wait_until_up(self, seconds: float = 15.0) -> None:
        import redis

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.folder / f'redis-{self.port}.log').read_text()[-2000:]}")
            try:
                if redis.Redis(port=self.port, socket_timeout=1).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {seconds:g} s")


class ServiceProcess:
    """``python -m deltavision.mist serve ...`` in its own session; ``url`` once /healthz answers."""

    def __init__(self, arguments: list[str], folder: Path, env: dict[str, str], startup_seconds: float = 180.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(folder) / f"serve-{self.port}.log"
        command = [sys.executable, "-m", "deltavision.mist", "serve", "--port", str(self.port), *arguments]
        with open(self.log, "w") as output:
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)  # fmt: skip
        try:
            self._wait_until_healthy(startup_seconds)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        _stop_group(self.process, grace=20)

    def tail(self, characters: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-characters:]

    def replica_pids(self) -> list[int]:
        """Process ids of the Ray Serve replicas under this service (none under uvicorn)."""
        return [pid for pid, command in _descendants(self.process.pid) if "ServeReplica" in command]

    def _wait_until_healthy(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=10).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the service did not become healthy within {seconds:g} s:\n{self.tail()}")


def _descendants(root: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below ``root``, read from /proc."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append((int(entry), command))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found

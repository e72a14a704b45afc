"""Real processes for tests: the sidecar (`python -m sidecar serve`) and redis-server."""

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
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port no one listens on, from below the kernel's ephemeral range: a port
    from bind(0) can be taken as the source port of any outgoing connection before the server
    we pass it to binds it (a rare "address in use" at start)."""
    while True:
        port = random.randrange(20000, 32000)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port


def wait_until(check: Any, timeout: float = 10.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)


def stop_process(
    proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 15.0
) -> int | None:
    """Send `sig` and wait up to `timeout` for the exit, then kill: the exit code (None if the
    process was never started)."""
    if proc is None or proc.poll() is not None:
        return proc.returncode if proc else None
    proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


class SidecarProcess:
    """`python -m sidecar serve` on free loopback ports with a config written to a temp dir."""

    def __init__(
        self,
        config: dict[str, Any] | str,
        env: dict[str, str] | None = None,
        workdir: str | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.extra_args = list(extra_args or [])
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="ringside-test-"))
        self.config_path = self.workdir / "ringside.yaml"
        self.write_config(config)
        self.port = free_port()
        self.admin_port = free_port()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # as on a laptop even when the tests run in a pod (CI): shutdown.delay_seconds is
        # 0 by default there, 5 s in a pod, and every test stops its sidecars with SIGTERM
        self.env.pop("KUBERNETES_SERVICE_HOST", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdout_path = self.workdir / "stdout.log"
        self.stderr_path = self.workdir / "stderr.log"

    def write_config(self, config: dict[str, Any] | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, timeout: float = 15.0) -> SidecarProcess:
        cmd = [
            sys.executable, "-m", "sidecar", "serve", "--config", str(self.config_path),
            "--port", str(self.port), "--admin-host", "127.0.0.1",
            "--admin-port", str(self.admin_port), *self.extra_args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.workdir,
            env=self.env,
            stdout=self.stdout_path.open("wb"),
            stderr=self.stderr_path.open("wb"),
        )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited {self.proc.returncode}:\n{self.stderr()}")
            try:
                with urllib.request.urlopen(self.admin_url + "/readyz", timeout=0.5) as response:
                    return bool(response.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        wait_until(ready, timeout)
        return self

    def stdout(self) -> str:
        return self.stdout_path.read_text() if self.stdout_path.exists() else ""

    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def access_log(self) -> list[dict[str, Any]]:
        import json

        return [json.loads(line) for line in self.stdout().splitlines() if line.startswith("{")]

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.admin_url + "/metrics", timeout=5) as response:
            return str(response.read().decode())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        return stop_process(self.proc, sig, timeout)


class RedisProcess:
    """A private redis-server on a free port, nothing persisted."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="ringside-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @staticmethod
    def binary() -> str | None:
        return shutil.which("redis-server")

    def start(self) -> RedisProcess:
        binary = self.binary()
        assert binary is not None
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

        def up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    return sock.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        wait_until(up, 10)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)

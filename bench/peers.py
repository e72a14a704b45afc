"""Optional peers for `bench.run --peer`: the LiteLLM proxy (PyPI) and the Portkey gateway (npm).

Nothing of them is vendored: each is installed at bench time in a cache dir under the system temp
dir (reused by later runs, so only the first run pays the install), configured to proxy to the
bench upstream on 127.0.0.1, and bound to loopback, so it is measured on the same mock, on the same
machine and with the same /proc readings as the sidecar.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

PEERS = ("litellm", "portkey")
LITELLM_SERIES = "1.108"  # the reference figures are 1.108; pip takes the newest 1.108.x
# that resolves (1.108.7: the newest, 1.108.14, pins a litellm-proxy-extras PyPI does not have)
PORTKEY_VERSION = "1.15.2"
# The gateway asks for @hono/node-server ^1.3.3, which now resolves to versions (1.14.2 on) whose
# Response keeps fetch()'s immutable headers: the gateway then fails every stream, and on some
# versions every request, with "TypeError: immutable" (Portkey-AI/gateway#1389). Pin the last
# version that copies them, and the last @hono/node-ws that accepts it (1.3.x wants ^1.19.11).
PORTKEY_PINS = ("@hono/node-server@1.14.1", "@hono/node-ws@1.2.0")
CACHE = Path(tempfile.gettempdir()) / "ringside-bench-peers"
DONE = ".installed"  # written last, holding the installed version: a half-done install is redone
# Portkey's start-server has no host option: it listens on all interfaces. This preload (ours)
# pins every TCP listen of that node process to 127.0.0.1.
LOOPBACK_CJS = """\
const net = require("net");
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (port, ...rest) {
  if (typeof port === "number") {
    if (rest.length && typeof rest[0] !== "function") rest.shift();  // the host asked for
    return listen.call(this, port, "127.0.0.1", ...rest);
  }
  if (port && typeof port === "object" && port.path === undefined) {
    return listen.call(this, { ...port, host: "127.0.0.1" }, ...rest);
  }
  return listen.call(this, port, ...rest);
};
"""


class PeerError(RuntimeError):
    """A peer could not be installed or started: the bench goes on without it."""


@dataclass
class Peer:
    name: str
    version: str
    proc: subprocess.Popen[bytes]  # the server process itself: its tree is what /proc measures
    url: str  # …/v1/chat/completions
    headers: dict[str, str]  # sent by wrk and the TTFB client instead of the sidecar's
    startup_s: float
    description: str  # one line for the report: version and how it is set up


def _run(argv: list[str], log: Path, cwd: Path | None = None) -> None:
    with log.open("ab") as out:
        done = subprocess.run(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise PeerError(f"{' '.join(argv[:3])} … failed ({done.returncode}):\n" + "\n".join(tail))


def _cached(home: Path) -> str | None:
    marker = home / DONE
    return marker.read_text().strip() if marker.exists() else None


def install_litellm() -> tuple[Path, str]:
    """A fresh venv with `litellm[proxy]`, so its many dependencies never touch the project's."""
    home = CACHE / f"litellm-{LITELLM_SERIES}"
    if version := _cached(home):
        return home, version
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    spec = f"litellm[proxy]=={LITELLM_SERIES}.*"
    print(f"installing {spec} in {home} (once, ~1 min)", flush=True)
    log = home / "install.log"
    _run([sys.executable, "-m", "venv", str(home / "venv")], log)
    python = str(home / "venv" / "bin" / "python")
    _run([python, "-m", "pip", "install", "-q", spec], log)
    version = subprocess.check_output(
        [python, "-c", "import importlib.metadata as m; print(m.version('litellm'))"], text=True
    ).strip()
    (home / DONE).write_text(version)
    return home, version


def install_portkey() -> tuple[Path, str]:
    """`npm install` of the published gateway, the way `npx @portkey-ai/gateway` would run it."""
    home = CACHE / f"portkey-{PORTKEY_VERSION}"
    if version := _cached(home):
        return home, version
    if shutil.which("npm") is None or shutil.which("node") is None:
        raise PeerError("node and npm are needed for the portkey peer")
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    print(f"installing @portkey-ai/gateway@{PORTKEY_VERSION} in {home} (once)", flush=True)
    specs = [f"@portkey-ai/gateway@{PORTKEY_VERSION}", *PORTKEY_PINS]
    _run(["npm", "install", "--no-audit", "--no-fund", *specs], home / "install.log", cwd=home)
    package = home / "node_modules" / "@portkey-ai" / "gateway" / "package.json"
    version = str(json.loads(package.read_text())["version"])
    (home / DONE).write_text(version)
    return home, version


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
    """Poll `url` until 200; fail at once if the peer exits (its log says why)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise PeerError(f"exited with {proc.returncode}:\n" + "\n".join(tail))
        try:
            with urllib.request.urlopen(url, timeout=0.5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.005)
    raise PeerError(f"not ready after {timeout:.0f} s: {url}")


def _start(
    argv: list[str], ready_url: str, log: Path, timeout: float, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], float]:
    """Start the server itself (no shell or npx in between, so its pid is the tree to measure)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=log.parent
    )
    try:
        _wait_ready(proc, ready_url, log, timeout)
    except PeerError:
        proc.kill()
        proc.wait()
        raise
    return proc, time.perf_counter() - started


def litellm_config(workdir: Path, upstream_port: int, model: str, key: str) -> Path:
    """One model entry named exactly as bench's BODY asks, to the upstream; no database.

    The sidecar is measured with key auth, so LiteLLM gets a master key too (it needs no database
    for that); virtual keys, budgets and spend logs would need Postgres and are left off.
    """
    config = {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": "openai/bench-model",
                    "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                    "api_key": "sk-bench-upstream",
                },
            }
        ],
        "general_settings": {"master_key": key},
    }
    path = workdir / "litellm.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def quiet_access_log(workdir: Path) -> Path:
    """uvicorn's per-request access log off, as the sidecar's is in the bench; the rest as is."""
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "loggers": {"uvicorn.access": {"level": "WARNING"}},
    }
    path = workdir / "litellm-logging.json"
    path.write_text(json.dumps(config))
    return path


def start_litellm(port: int, upstream_port: int, model: str, key: str, workdir: Path) -> Peer:
    home, version = install_litellm()
    config = litellm_config(workdir, upstream_port, model, key)
    # the local cost map: at startup LiteLLM otherwise fetches it from the internet (or times out)
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    proc, startup = _start(
        [str(home / "venv" / "bin" / "litellm"), "--config", str(config),
         "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1",
         "--log_config", str(quiet_access_log(workdir))],
        f"http://127.0.0.1:{port}/health/liveliness", workdir / "litellm.log", 120, env,
    )  # fmt: skip
    return Peer(
        "litellm",
        version,
        proc,
        f"http://127.0.0.1:{port}/v1/chat/completions",
        {"Authorization": f"Bearer {key}"},
        startup,
        f"LiteLLM proxy {version} (PyPI), 1 uvicorn worker, master key, no database",
    )


def start_portkey(port: int, upstream_port: int, key: str, workdir: Path) -> Peer:
    """The gateway is configured per request: provider openai, custom host the bench upstream."""
    home, version = install_portkey()
    server = home / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    preload = workdir / "loopback.cjs"
    preload.write_text(LOOPBACK_CJS)
    node = subprocess.check_output(["node", "--version"], text=True).strip()
    proc, startup = _start(
        ["node", "--require", str(preload), str(server), f"--port={port}", "--headless"],
        f"http://127.0.0.1:{port}/", workdir / "portkey.log", 60,
    )  # fmt: skip
    headers = {
        "Authorization": f"Bearer {key}",  # passed on to the upstream as its OpenAI key
        "x-portkey-provider": "openai",
        "x-portkey-custom-host": f"http://127.0.0.1:{upstream_port}/v1",
    }
    return Peer(
        "portkey",
        version,
        proc,
        f"http://127.0.0.1:{port}/v1/chat/completions",
        headers,
        startup,
        f"Portkey gateway {version} (npm), one Node {node} process, no auth of its own",
    )


def start_peer(
    name: str, port: int, upstream_port: int, model: str, key: str, workdir: Path
) -> Peer:
    """Install (once) and start one peer; PeerError if that is not possible here."""
    if name == "litellm":
        return start_litellm(port, upstream_port, model, key, workdir)
    if name == "portkey":
        return start_portkey(port, upstream_port, key, workdir)
    raise PeerError(f"unknown peer {name!r}: one of {', '.join(PEERS)}")

"""An injected pod, run as the kubelet would run it: the app reaches the sidecar on localhost
(issue 17, "from image build to an injected pod whose app reaches the sidecar").

No cluster runs here, so the test plays the kubelet's part for one pod: the Deployment's pod as
the injector patches it, the ConfigMap of k8s/base mounted where the injected container mounts
it, the provider-keys Secret as its environment, the container's own args and working
directory, its probes, and the app's OPENAI_BASE_URL. Two things are translated, each checked
before: the container's paths to temporary directories (no /etc/ringside on a test machine) and
its ports to free loopback ports (8787 may be taken here; a pod has its own network namespace).
The only change to the routing table is the provider's base URL: a fake OpenAI upstream instead
of the internet.
"""

from __future__ import annotations

import copy
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonpatch
import openai
import yaml

from sidecar.inject.options import InjectDefaults
from sidecar.inject.patch import decide
from tests.conftest import PROVIDER_KEY
from tests.injector import INJECT, app_pod, assert_valid_pod
from tests.procs import free_port, stop_process, wait_until
from tests.upstreams.openai_fake import FakeOpenAI

BASE = Path(__file__).resolve().parent.parent / "k8s" / "base"


def injected_pod() -> dict[str, Any]:
    pod = app_pod(INJECT)
    decision = decide(pod, InjectDefaults())
    assert decision.patch, decision
    result: dict[str, Any] = jsonpatch.apply_patch(copy.deepcopy(pod), decision.patch)
    assert_valid_pod(result)
    return result


def named(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(item for item in items if item["name"] == name)


def test_the_app_of_an_injected_pod_reaches_its_sidecar(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    pod = injected_pod()
    spec = pod["spec"]
    sidecar = named(spec["initContainers"], "ringside")
    app = named(spec["containers"], "app")
    volumes = {volume["name"]: volume for volume in spec["volumes"]}

    # the kubelet's part: each mount a directory; the ConfigMap's keys as files in it
    mounts: dict[str, Path] = {}
    for mount in sidecar["volumeMounts"]:
        directory = tmp_path / mount["name"]
        directory.mkdir()
        mounts[mount["mountPath"]] = directory
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            assert volume["configMap"]["name"] == "ringside-config"  # what k8s/base generates
            assert "subPath" not in mount  # a directory: the ..data swap reaches the reload
            table = yaml.safe_load((BASE / "ringside.yaml").read_text())
            table["providers"]["openai"]["base_url"] = fake_openai.url  # no internet here
            (directory / "ringside.yaml").write_text(yaml.safe_dump(table, sort_keys=False))
        else:
            assert volume == {"name": mount["name"], "emptyDir": volume["emptyDir"]}

    def local(path: str) -> str:
        """A container path → where this test mounted it."""
        for mount_path, directory in mounts.items():
            if path == mount_path or path.startswith(mount_path + "/"):
                return str(directory) + path[len(mount_path) :]
        raise AssertionError(f"{path} is not on a volume the container mounts")

    table_path = Path(local(sidecar["args"][-1]))
    table = yaml.safe_load(table_path.read_text())
    # the sqlite file is on the emptyDir: the only writable place of a read-only container
    assert local(table["storage"]["sqlite_path"]).startswith(str(mounts["/var/lib/ringside"]))
    table["storage"]["sqlite_path"] = local(table["storage"]["sqlite_path"])
    table_path.write_text(yaml.safe_dump(table, sort_keys=False))

    # ports: the app's OPENAI_BASE_URL, the sidecar's declared ports and its table must agree
    base_url = named(app["env"], "OPENAI_BASE_URL")["value"]
    assert base_url == "http://localhost:8787/v1"
    declared = {port["name"]: port["containerPort"] for port in sidecar["ports"]}
    assert declared == {"ringside-api": 8787, "ringside-admin": 8788}
    assert table["listen"] == {"api": "127.0.0.1:8787", "admin": "0.0.0.0:8788"}
    api_port, admin_port = free_port(), free_port()
    ports = {8787: api_port, 8788: admin_port}

    # the Secret through envFrom: its keys become the container's environment
    assert [source["secretRef"]["name"] for source in sidecar["envFrom"]] == [
        "ringside-provider-keys"
    ]
    assert "OPENAI_API_KEY=" in (BASE / "provider-keys.env").read_text()
    env = {"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": PROVIDER_KEY, "PYTHONUNBUFFERED": "1"}

    args = [local(arg) if arg.startswith("/") else arg for arg in sidecar["args"]]
    assert args[:2] == ["serve", "--config"]
    log = (tmp_path / "sidecar.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", *args, "--port", str(api_port),
         "--admin-host", "127.0.0.1", "--admin-port", str(admin_port)],
        cwd=local(sidecar["workingDir"]), env={**env, "PYTHONPATH": str(BASE.parent.parent)},
        stdout=log, stderr=log,
    )  # fmt: skip
    try:
        # the startup probe, as the kubelet runs it: the app starts once it passes
        probe = sidecar["startupProbe"]["httpGet"]
        port = ports[declared[probe["port"]]] if isinstance(probe["port"], str) else probe["port"]

        def started() -> bool:
            assert proc.poll() is None, (tmp_path / "sidecar.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{probe['path']}", timeout=1):
                    return True
            except OSError:
                return False

        wait_until(started, timeout=20)
        for kind in ("readinessProbe", "livenessProbe"):
            check = sidecar[kind]["httpGet"]
            url = f"http://127.0.0.1:{ports[declared[check['port']]]}{check['path']}"
            with urllib.request.urlopen(url, timeout=5) as answer:
                assert answer.status == 200, kind

        # the app: an OpenAI SDK reading OPENAI_BASE_URL, the port mapped as the pod's would be
        parts = urlsplit(base_url)
        assert parts.hostname == "localhost" and parts.port is not None
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{ports[parts.port]}{parts.path}", api_key="unused"
        )
        completion = client.chat.completions.create(
            model="slot:chat", messages=[{"role": "user", "content": "hello from the app"}]
        )
        assert completion.choices[0].message.content == "Hello from the fake upstream."
        received = fake_openai.received[-1]
        assert received.headers["Authorization"] == f"Bearer {PROVIDER_KEY}"
        assert received.body["model"] == "gpt-4o-mini"  # the slot's first model
        assert Path(table["storage"]["sqlite_path"]).exists()
    finally:
        # the pod stops: the sidecar, a native sidecar, drains with no delay (its table says so)
        code = stop_process(proc, signal.SIGTERM, timeout=15)
        log.close()
    assert code == 0, (tmp_path / "sidecar.log").read_text()

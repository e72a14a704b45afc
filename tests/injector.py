"""The injector webhook as a real process over HTTPS, and the documents its tests send it.

`InjectorProcess` runs `python -m sidecar inject-webhook` on a free loopback port with a
certificate from a test CA (trustme); `admission_review` wraps a Pod the way the API server does;
`patched` applies an answer's JSON Patch with the `jsonpatch` library and checks the result
against the Kubernetes schema (kubernetes-validate, strict) and the rules the schema cannot say.
"""

from __future__ import annotations

import base64
import copy
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import urllib.error
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import trustme

from tests.procs import free_port, stop_process, wait_until

# the first Kubernetes with native sidecars on by default (beta in 1.29, GA in 1.33),
# and the newest schema kubernetes-validate bundles
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
SERVICE_DNS = "ringside-injector.ringside-system.svc"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def write_leaf(ca: trustme.CA, directory: Path) -> trustme.LeafCert:
    """A serving certificate for 127.0.0.1 and the Service's name, written as tls.crt/tls.key."""
    leaf = ca.issue_cert("127.0.0.1", SERVICE_DNS)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tls.crt").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    (directory / "tls.key").write_bytes(leaf.private_key_pem.bytes())
    return leaf


def leaf_der(leaf: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


class InjectorProcess:
    """`python -m sidecar inject-webhook` over HTTPS on 127.0.0.1."""

    def __init__(
        self,
        ca: trustme.CA,
        cert_path: Path,
        key_path: Path,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.ca = ca
        self.cert_path = cert_path
        self.key_path = key_path
        self.port = free_port()
        self.extra_args = list(extra_args or [])
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.workdir = Path(tempfile.mkdtemp(prefix="ringside-inject-"))
        self.stderr_path = self.workdir / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client_context = ssl.create_default_context()
        ca.configure_trust(self.client_context)

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "sidecar", "inject-webhook",
            "--listen", f"127.0.0.1:{self.port}",
            "--tls-cert", str(self.cert_path), "--tls-key", str(self.key_path),
            "--drain-seconds", "0", *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 15.0) -> InjectorProcess:
        self.proc = subprocess.Popen(
            self.command(),
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=self.stderr_path.open("wb"),
        )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"injector exited {self.proc.returncode}:\n{self.stderr()}")
            try:
                return self.request("GET", "/healthz")[0] == 200
            except (OSError, urllib.error.URLError, http.client.HTTPException):
                return False

        wait_until(ready, timeout)
        return self

    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def connection(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.client_context, timeout=10
        )

    def request(
        self, method: str, path: str, body: bytes | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = self.connection()
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, dict(response.headers), response.read()
        finally:
            conn.close()

    def review(self, document: dict[str, Any]) -> dict[str, Any]:
        """POST a review; the AdmissionReview answer, after checking it is one."""
        status, headers, body = self.request("POST", "/mutate", json.dumps(document).encode())
        assert status == 200, (status, body)
        assert headers["Content-Type"].startswith("application/json")
        answer = json.loads(body)
        assert answer["apiVersion"] == "admission.k8s.io/v1"
        assert answer["kind"] == "AdmissionReview"
        assert answer["response"]["uid"] == document["request"]["uid"]
        return dict(answer["response"])

    def served_certificate(self) -> bytes:
        """The DER certificate a new TLS connection is shown (verified against the test CA)."""
        with (
            socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw,
            self.client_context.wrap_socket(raw, server_hostname=SERVICE_DNS) as tls,
        ):
            certificate = tls.getpeercert(binary_form=True)
        assert certificate is not None
        return certificate

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        return stop_process(self.proc, sig, timeout)


def app_pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    """A Pod as the API server sends it to a mutating webhook for a Deployment's replica:
    defaulted, named by generateName only, with the service-account token volume."""
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "chat-7d9f8b6c5-",
            "namespace": "shop",
            "labels": {"app": "chat", "pod-template-hash": "7d9f8b6c5"},
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "chat-7d9f8b6c5",
                 "uid": "0b6d4b8e-3f7c-4d1e-9a52-1c2d3e4f5a6b", "controller": True,
                 "blockOwnerDeletion": True},
            ],
        },
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "registry.example.com/chat:1.4.2",
                    "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}],
                    "env": [{"name": "LOG_LEVEL", "value": "info"}],
                    "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
                    "volumeMounts": [{"name": "kube-api-access-x7k2p", "readOnly": True,
                                      "mountPath": SERVICE_ACCOUNT_DIR}],
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                }
            ],
            "volumes": [
                {"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt",
                                   "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                ]}},
            ],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0,
        },
    }  # fmt: skip
    if annotations is not None:
        pod["metadata"]["annotations"] = annotations
    pod["spec"].update(spec)
    return pod


INJECT = {"ringside.fightclub.pro/inject": "true"}


def admission_review(
    pod: Any, uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002", operation: str = "CREATE"
) -> dict[str, Any]:
    """The AdmissionReview v1 the API server sends for `pod`."""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": operation,
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "a8b4c2d1-0000-4000-8000-000000000001",
                "groups": ["system:serviceaccounts", "system:authenticated"],
            },
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def patch_of(response: dict[str, Any]) -> list[dict[str, Any]]:
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    operations = json.loads(base64.b64decode(response["patch"], validate=True))
    assert isinstance(operations, list) and operations
    return operations


def patched(pod: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    """`pod` after the answer's JSON Patch, checked valid for every version in K8S_VERSIONS."""
    result: dict[str, Any] = jsonpatch.apply_patch(copy.deepcopy(pod), patch_of(response))
    assert_valid_pod(result)
    return result


def assert_valid_pod(pod: dict[str, Any]) -> None:
    """The schema (strict: no unknown field anywhere), and what the API server's validation
    adds to it: unique container and volume names, mounts of declared volumes, probe ports."""
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)
    spec = pod["spec"]
    containers = [*spec.get("initContainers", []), *spec["containers"]]
    names = [container["name"] for container in containers]
    assert len(names) == len(set(names)), names
    volumes = [volume["name"] for volume in spec.get("volumes", [])]
    assert len(volumes) == len(set(volumes)), volumes
    for container in spec.get("initContainers", []):
        if container.get("restartPolicy") != "Always":  # only native sidecars may have probes
            assert not {"startupProbe", "readinessProbe", "livenessProbe"} & set(container)
    for container in containers:
        for mount in container.get("volumeMounts") or []:
            assert mount["name"] in volumes, (container["name"], mount)
            assert "subPath" not in mount or container["name"] != "ringside"
        env = [entry["name"] for entry in container.get("env") or []]
        assert len(env) == len(set(env)), (container["name"], env)
        declared = container.get("ports") or []
        ports = {port["containerPort"] for port in declared} | {
            port["name"] for port in declared if "name" in port
        }
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in container:
                assert container[probe]["httpGet"]["port"] in ports, (container["name"], probe)

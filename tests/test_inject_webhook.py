"""`ringside inject-webhook` as a real process over HTTPS: AdmissionReview v1 in, JSON Patch out.

Each answer's patch is applied with the `jsonpatch` library and the resulting Pod validated
against the Kubernetes schema (strict) for the oldest and newest versions in K8S_VERSIONS.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from sidecar.cli import build_parser
from tests.injector import (
    INJECT,
    SERVICE_DNS,
    InjectorProcess,
    admission_review,
    app_pod,
    patch_of,
    patched,
    write_leaf,
)
from tests.procs import free_port, wait_until
from tests.support import ringside

RINGSIDE_IMAGE = "ghcr.io/fightclub/ringside:0.1.0"
BASE_URL = {"name": "OPENAI_BASE_URL", "value": "http://localhost:8787/v1"}


@pytest.fixture(scope="module")
def injector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InjectorProcess]:
    ca = trustme.CA()
    tls = tmp_path_factory.mktemp("injector-tls")
    write_leaf(ca, tls)
    proc = InjectorProcess(ca, tls / "tls.crt", tls / "tls.key").start()
    yield proc
    proc.stop()
    assert "Traceback" not in proc.stderr(), proc.stderr()


def containers_by_name(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = pod["spec"]
    return {c["name"]: c for c in [*spec.get("initContainers", []), *spec["containers"]]}


def injected(injector: InjectorProcess, pod: dict[str, Any]) -> dict[str, Any]:
    return patched(pod, injector.review(admission_review(pod)))


def test_annotated_pod_gets_the_native_sidecar_first(injector: InjectorProcess) -> None:
    pod = app_pod(INJECT)
    response = injector.review(admission_review(pod, uid="d1f5c7e0-0000-4000-8000-00000000abcd"))
    assert response["uid"] == "d1f5c7e0-0000-4000-8000-00000000abcd"
    result = patched(pod, response)
    sidecar = result["spec"]["initContainers"][0]
    assert sidecar["name"] == "ringside"
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == RINGSIDE_IMAGE
    assert sidecar["args"] == ["serve", "--config", "/etc/ringside/ringside.yaml"]
    assert {(p["name"], p["containerPort"]) for p in sidecar["ports"]} == {
        ("ringside-api", 8787),
        ("ringside-admin", 8788),
    }
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "ringside-admin"}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ringside-admin"}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ringside-admin"}
    assert sidecar["readinessProbe"]["failureThreshold"] == 1  # a drain's first 503 counts
    assert sidecar["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert sidecar["resources"] == {
        "requests": {"cpu": "100m", "memory": "96Mi"},
        "limits": {"cpu": "1", "memory": "256Mi"},
    }
    # provider keys from a Secret the app's namespace may hold
    assert sidecar["envFrom"] == [
        {"secretRef": {"name": "ringside-provider-keys", "optional": True}}
    ]
    # what k8s/monitoring's PodMonitor and NetworkPolicy select
    assert result["metadata"]["labels"]["ringside.fightclub.pro/injected"] == "true"
    assert result["metadata"]["labels"]["app"] == "chat"
    command = build_parser().parse_args(sidecar["args"])
    assert command.command == "serve" and command.config.startswith("/etc/ringside/")


def test_config_is_a_whole_configmap_directory_and_state_an_emptydir(
    injector: InjectorProcess,
) -> None:
    result = injected(injector, app_pod(INJECT))
    volumes = {v["name"]: v for v in result["spec"]["volumes"]}
    assert volumes["ringside-config"] == {
        "name": "ringside-config",
        "configMap": {"name": "ringside-config"},
    }
    assert volumes["ringside-state"] == {
        "name": "ringside-state",
        "emptyDir": {"sizeLimit": "256Mi"},
    }
    assert "kube-api-access-x7k2p" in volumes  # the pod's own volume is kept
    mounts = {m["mountPath"]: m for m in result["spec"]["initContainers"][0]["volumeMounts"]}
    assert mounts["/etc/ringside"] == {
        "name": "ringside-config",
        "mountPath": "/etc/ringside",
        "readOnly": True,
    }  # no subPath: the ..data symlink swap reaches the sidecar's reload
    assert mounts["/var/lib/ringside"]["name"] == "ringside-state"
    assert result["spec"]["initContainers"][0]["workingDir"] == "/var/lib/ringside"


def test_app_containers_get_openai_base_url_appended_to_their_env(
    injector: InjectorProcess,
) -> None:
    worker = {"name": "worker", "image": "registry.example.com/worker:2"}
    pod = app_pod(INJECT)
    pod["spec"]["containers"].append(worker)
    result = injected(injector, pod)
    app = containers_by_name(result)["app"]
    assert app["env"] == [{"name": "LOG_LEVEL", "value": "info"}, BASE_URL]
    assert containers_by_name(result)["worker"]["env"] == [BASE_URL]


def test_a_container_that_sets_openai_base_url_keeps_its_own(injector: InjectorProcess) -> None:
    own = {"name": "OPENAI_BASE_URL", "value": "https://proxy.internal/v1"}
    pod = app_pod(INJECT)
    pod["spec"]["containers"][0]["env"].insert(0, own)
    pod["spec"]["containers"].append({"name": "worker", "image": "worker:2", "env": []})
    result = injected(injector, pod)
    assert containers_by_name(result)["app"]["env"] == [own, {"name": "LOG_LEVEL", "value": "info"}]
    assert containers_by_name(result)["worker"]["env"] == [BASE_URL]
    operations = patch_of(injector.review(admission_review(pod)))
    assert not [op for op in operations if op["path"].startswith("/spec/containers/0/")]


def test_pod_without_init_containers_volumes_or_env_gets_whole_arrays(
    injector: InjectorProcess,
) -> None:
    pod = app_pod(INJECT)
    del pod["spec"]["volumes"]
    app = pod["spec"]["containers"][0]
    del app["env"], app["volumeMounts"]
    operations = patch_of(injector.review(admission_review(pod)))
    paths = {op["path"]: op for op in operations}
    assert paths["/spec/initContainers"]["op"] == "add"
    assert [c["name"] for c in paths["/spec/initContainers"]["value"]] == ["ringside"]
    assert [v["name"] for v in paths["/spec/volumes"]["value"]] == [
        "ringside-config",
        "ringside-state",
    ]
    assert paths["/spec/containers/0/env"]["value"] == [BASE_URL]
    result = patched(pod, injector.review(admission_review(pod)))
    assert result["spec"]["containers"][0]["env"] == [BASE_URL]


def test_null_arrays_are_replaced_whole(injector: InjectorProcess) -> None:
    pod = app_pod(INJECT, initContainers=None, volumes=None)
    pod["spec"]["containers"][0].update(env=None, volumeMounts=None)
    operations = patch_of(injector.review(admission_review(pod)))
    assert {"/spec/initContainers", "/spec/volumes", "/spec/containers/0/env"} <= {
        op["path"] for op in operations
    }
    result = injected(injector, pod)
    assert [c["name"] for c in result["spec"]["initContainers"]] == ["ringside"]


def test_sidecar_goes_after_leading_native_sidecars_and_before_plain_init_containers(
    injector: InjectorProcess,
) -> None:
    mesh = {"name": "mesh-proxy", "image": "mesh/proxy:1.22", "restartPolicy": "Always"}
    migrate = {"name": "migrate", "image": "registry.example.com/chat:1.4.2", "args": ["migrate"]}
    pod = app_pod(INJECT, initContainers=[mesh, migrate])
    result = injected(injector, pod)
    assert [c["name"] for c in result["spec"]["initContainers"]] == [
        "mesh-proxy",
        "ringside",
        "migrate",
    ]
    assert "env" not in containers_by_name(result)["migrate"]  # init steps are left alone


def test_plain_init_container_first_means_sidecar_first(injector: InjectorProcess) -> None:
    migrate = {"name": "migrate", "image": "chat:1.4.2"}
    result = injected(injector, app_pod(INJECT, initContainers=[migrate]))
    assert [c["name"] for c in result["spec"]["initContainers"]] == ["ringside", "migrate"]


def test_annotations_override_image_config_map_resources_and_secret(
    injector: InjectorProcess,
) -> None:
    annotations = {
        **INJECT,
        "ringside.fightclub.pro/image": "registry.example.com/ringside:0.1.1@sha256:" + "ab" * 32,
        "ringside.fightclub.pro/config-map": "chat-routing",
        "ringside.fightclub.pro/env-secret": "llm-provider-keys",
        "ringside.fightclub.pro/cpu-request": "0.25",
        "ringside.fightclub.pro/cpu-limit": "1",
        "ringside.fightclub.pro/memory-request": "200Mi",
        "ringside.fightclub.pro/memory-limit": "1Gi",
    }
    result = injected(injector, app_pod(annotations))
    sidecar = containers_by_name(result)["ringside"]
    assert sidecar["image"] == annotations["ringside.fightclub.pro/image"]
    assert sidecar["resources"] == {
        "requests": {"cpu": "0.25", "memory": "200Mi"},
        "limits": {"cpu": "1", "memory": "1Gi"},
    }
    # a Secret the pod names must exist: the sidecar does not start without it
    assert sidecar["envFrom"] == [{"secretRef": {"name": "llm-provider-keys", "optional": False}}]
    volumes = {v["name"]: v for v in result["spec"]["volumes"]}
    assert volumes["ringside-config"]["configMap"] == {"name": "chat-routing"}


def test_an_empty_limit_annotation_removes_the_default_limit(injector: InjectorProcess) -> None:
    annotations = {**INJECT, "ringside.fightclub.pro/memory-limit": ""}
    result = injected(injector, app_pod(annotations))
    assert containers_by_name(result)["ringside"]["resources"] == {
        "requests": {"cpu": "100m", "memory": "96Mi"},
        "limits": {"cpu": "1"},
    }


@pytest.mark.parametrize(
    ("annotation", "value", "named"),
    [
        ("cpu-request", "half", "ringside.fightclub.pro/cpu-request"),
        ("memory-limit", "256MB", "ringside.fightclub.pro/memory-limit"),
        ("memory-request", "-1Gi", "ringside.fightclub.pro/memory-request"),
        # above the injector's default memory limit: the message says the limit is the default
        ("memory-request", "512Mi", "/memory-limit 256Mi (the default)"),
        ("config-map", "Chat_Routing", "ringside.fightclub.pro/config-map"),
        ("image", "ringside image", "ringside.fightclub.pro/image"),
    ],
)  # fmt: skip
def test_a_bad_override_refuses_the_pod_naming_the_annotation(
    injector: InjectorProcess, annotation: str, value: str, named: str
) -> None:
    annotations = {**INJECT, f"ringside.fightclub.pro/{annotation}": value}
    response = injector.review(admission_review(app_pod(annotations)))
    assert response["allowed"] is False
    assert "patch" not in response and "patchType" not in response
    assert response["status"]["code"] == 400
    assert named in response["status"]["message"]
    assert response["status"]["message"].startswith("ringside injection refused: ")


def test_a_pod_that_already_uses_the_sidecar_volume_names_is_refused(
    injector: InjectorProcess,
) -> None:
    pod = app_pod(INJECT)
    pod["spec"]["volumes"].append({"name": "ringside-state", "emptyDir": {}})
    response = injector.review(admission_review(pod))
    assert response["allowed"] is False
    assert "volume named ringside-state" in response["status"]["message"]


def test_an_app_listening_on_the_sidecar_port_is_refused(injector: InjectorProcess) -> None:
    pod = app_pod(INJECT)
    pod["spec"]["containers"][0]["ports"] = [{"containerPort": 8787}]
    response = injector.review(admission_review(pod))
    assert response["allowed"] is False
    assert "port 8787" in response["status"]["message"]


@pytest.mark.parametrize(
    "annotations",
    [None, {}, {"team": "search"}, {"ringside.fightclub.pro/inject": "false"}],
    ids=["no-annotations", "empty", "other", "false"],
)
def test_a_pod_not_asking_for_the_sidecar_gets_no_patch(
    injector: InjectorProcess, annotations: dict[str, str] | None
) -> None:
    response = injector.review(admission_review(app_pod(annotations)))
    assert response == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True}


def test_an_inject_value_other_than_true_is_not_injected_but_warned(
    injector: InjectorProcess,
) -> None:
    response = injector.review(admission_review(app_pod({"ringside.fightclub.pro/inject": "yes"})))
    assert response["allowed"] is True and "patch" not in response
    assert response["warnings"] == [
        'ringside.fightclub.pro/inject: "yes" is neither "true" nor "false": not injected'
    ]


def test_an_unknown_ringside_annotation_is_warned_about(injector: InjectorProcess) -> None:
    annotations = {**INJECT, "ringside.fightclub.pro/memory-limits": "1Gi"}
    response = injector.review(admission_review(app_pod(annotations)))
    patched(app_pod(annotations), response)
    assert response["warnings"] == [
        "unknown annotation ringside.fightclub.pro/memory-limits ignored"
    ]


def test_an_injected_pod_is_never_injected_twice(injector: InjectorProcess) -> None:
    pod = app_pod(INJECT)
    once = injected(injector, pod)
    again = injector.review(admission_review(once))  # reinvocation after another webhook
    assert again == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True}


def test_a_pod_declaring_its_own_ringside_container_is_left_alone(
    injector: InjectorProcess,
) -> None:
    pod = app_pod(INJECT)
    pod["spec"]["containers"].append({"name": "ringside", "image": RINGSIDE_IMAGE})
    response = injector.review(admission_review(pod))
    assert "patch" not in response and response["allowed"] is True


def test_other_operations_are_allowed_unchanged(injector: InjectorProcess) -> None:
    response = injector.review(admission_review(app_pod(INJECT), operation="UPDATE"))
    assert response == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True}


def test_the_label_path_is_escaped_next_to_awkward_label_keys(injector: InjectorProcess) -> None:
    pod = app_pod(INJECT)
    pod["metadata"]["labels"] = {"example.com/a~b": "1", "ringside.fightclub.pro~injected": "x"}
    result = injected(injector, pod)
    assert result["metadata"]["labels"] == {
        **pod["metadata"]["labels"],
        "ringside.fightclub.pro/injected": "true",
    }
    assert result["metadata"]["annotations"] == INJECT


def test_a_pod_without_labels_gets_the_whole_map(injector: InjectorProcess) -> None:
    pod = app_pod(INJECT)
    del pod["metadata"]["labels"]
    result = injected(injector, pod)
    assert result["metadata"]["labels"] == {"ringside.fightclub.pro/injected": "true"}


def review_with(**changes: Any) -> dict[str, Any]:
    document = admission_review(app_pod(INJECT))
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = document
        for key in parents:
            target = target[key]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return document


def deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


MALFORMED: dict[str, bytes] = {
    "not-json": b"{'apiVersion': 'admission.k8s.io/v1'",
    "empty": b"",
    "a-list": b"[]",
    "deeply-nested": deep(100_000),
    "wrong-api-version": json.dumps(review_with(apiVersion="admission.k8s.io/v1beta1")).encode(),
    "wrong-kind": json.dumps(review_with(kind="AdmissionResponse")).encode(),
    "no-request": json.dumps(review_with(request=KeyError)).encode(),
    "request-not-object": json.dumps(review_with(request="pod")).encode(),
    "no-uid": json.dumps(review_with(request__uid=KeyError)).encode(),
    "uid-not-string": json.dumps(review_with(request__uid=42)).encode(),
    "a-deployment": json.dumps(
        review_with(request__kind={"group": "apps", "version": "v1", "kind": "Deployment"})
    ).encode(),
    "a-subresource": json.dumps(review_with(request__subResource="ephemeralcontainers")).encode(),
    "object-not-a-pod": json.dumps(review_with(request__object=["pod"])).encode(),
    "object-a-service": json.dumps(
        review_with(request__object={"kind": "Service", "spec": {"ports": []}})
    ).encode(),
    "object-without-spec": json.dumps(review_with(request__object={"kind": "Pod"})).encode(),
    "containers-not-a-list": json.dumps(
        review_with(request__object={"kind": "Pod", "spec": {"containers": "app"}})
    ).encode(),
    "annotation-not-a-string": json.dumps(
        review_with(request__object__metadata={"annotations": {**INJECT, "team": 2}})
    ).encode(),
    "env-not-a-list": json.dumps(
        review_with(request__object=app_pod(INJECT, containers=[{"name": "a", "env": "X=1"}]))
    ).encode(),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_review_is_a_400_with_a_json_error(
    injector: InjectorProcess, name: str
) -> None:
    status, headers, body = injector.request("POST", "/mutate", MALFORMED[name])
    assert status == 400, (status, body)
    assert headers["Content-Type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert error["code"] == "bad_admission_review" and error["message"]
    assert injector.request("GET", "/healthz")[0] == 200
    assert injector.proc is not None and injector.proc.poll() is None


def test_a_review_over_the_size_bound_is_refused_unread(injector: InjectorProcess) -> None:
    pod = app_pod({**INJECT, "padding": "x" * (5 * 1024 * 1024)})
    status, _, body = injector.request(
        "POST", "/mutate", json.dumps(admission_review(pod)).encode()
    )
    assert status == 413
    assert json.loads(body)["error"]["code"] == "review_too_large"
    assert injector.request("GET", "/healthz")[0] == 200


def test_a_chunked_review_over_the_size_bound_is_refused(injector: InjectorProcess) -> None:
    conn = injector.connection()
    try:
        conn.putrequest("POST", "/mutate")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        chunk = b"x" * (1024 * 1024)
        for _ in range(5):
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
        response = conn.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["error"]["code"] == "review_too_large"
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/mutate", 405), ("PUT", "/mutate", 405), ("POST", "/validate", 404),
     ("GET", "/", 404), ("POST", "/healthz", 405)],
)  # fmt: skip
def test_other_methods_and_paths(
    injector: InjectorProcess, method: str, path: str, status: int
) -> None:
    body = json.dumps(admission_review(app_pod(INJECT))).encode() if method != "GET" else None
    assert injector.request(method, path, body)[0] == status


def test_probes_answer(injector: InjectorProcess) -> None:
    assert injector.request("GET", "/healthz")[:1] == (200,)
    status, _, body = injector.request("GET", "/readyz")
    assert (status, json.loads(body)) == (200, {"status": "ready"})


def test_sigterm_fails_readiness_keeps_answering_then_exits_zero(tmp_path: Path) -> None:
    ca = trustme.CA()
    write_leaf(ca, tmp_path)
    proc = InjectorProcess(ca, tmp_path / "tls.crt", tmp_path / "tls.key")
    proc.extra_args = ["--drain-seconds", "2"]
    proc.start()
    try:
        assert proc.request("GET", "/readyz")[0] == 200
        assert proc.proc is not None
        proc.proc.terminate()
        wait_until(lambda: proc.request("GET", "/readyz")[0] == 503, timeout=5)
        assert "patch" in proc.review(admission_review(app_pod(INJECT)))
        assert proc.proc.wait(10) == 0
    finally:
        proc.stop()


def test_defaults_come_from_the_environment(tmp_path: Path) -> None:
    ca = trustme.CA()
    write_leaf(ca, tmp_path)
    env = {
        "RINGSIDE_INJECT_IMAGE": "registry.example.com/ringside:9",
        "RINGSIDE_INJECT_DEFAULT_CONFIG_MAP": "team-routing",
        "RINGSIDE_INJECT_CPU_LIMIT": "2",
    }
    proc = InjectorProcess(ca, tmp_path / "tls.crt", tmp_path / "tls.key", env=env).start()
    try:
        result = injected(proc, app_pod(INJECT))
    finally:
        proc.stop()
    sidecar = containers_by_name(result)["ringside"]
    assert sidecar["image"] == "registry.example.com/ringside:9"
    assert sidecar["resources"]["limits"] == {"cpu": "2", "memory": "256Mi"}
    volumes = {v["name"]: v for v in result["spec"]["volumes"]}
    assert volumes["ringside-config"]["configMap"] == {"name": "team-routing"}


def test_unreadable_tls_files_stop_the_start_with_exit_2(tmp_path: Path) -> None:
    missing = str(tmp_path / "nothing.pem")
    listen = f"127.0.0.1:{free_port()}"
    done = ringside(
        "inject-webhook", "--listen", listen, "--tls-cert", missing, "--tls-key", missing
    )
    assert done.returncode == 2
    assert "cannot load the TLS files" in done.stderr and "Traceback" not in done.stderr


def test_a_certificate_with_the_wrong_key_stops_the_start(tmp_path: Path) -> None:
    ca = trustme.CA()
    write_leaf(ca, tmp_path / "a")
    write_leaf(ca, tmp_path / "b")
    done = ringside(
        "inject-webhook", "--listen", f"127.0.0.1:{free_port()}",
        "--tls-cert", str(tmp_path / "a" / "tls.crt"), "--tls-key", str(tmp_path / "b" / "tls.key"),
    )  # fmt: skip
    assert done.returncode == 2
    assert "cannot load the TLS files" in done.stderr


def test_a_bad_default_quantity_stops_the_start(tmp_path: Path) -> None:
    ca = trustme.CA()
    write_leaf(ca, tmp_path)
    done = ringside(
        "inject-webhook", "--listen", f"127.0.0.1:{free_port()}",
        "--tls-cert", str(tmp_path / "tls.crt"), "--tls-key", str(tmp_path / "tls.key"),
        "--memory-limit", "1GB",
    )  # fmt: skip
    assert done.returncode == 2
    assert "ringside.fightclub.pro/memory-limit: '1GB' is not a Kubernetes quantity" in done.stderr


def test_the_tls_files_are_required() -> None:
    done = ringside("inject-webhook", "--listen", "127.0.0.1:8443")
    assert done.returncode == 2
    assert "--tls-cert" in done.stderr


def test_a_client_that_never_finishes_its_headers_is_cut_off(injector: InjectorProcess) -> None:
    """The webhook's connections have the sidecar's deadlines (server_limits): a TLS client
    dribbling a request line and nothing more is closed at the header deadline (10 s), and
    reviews are answered meanwhile."""
    with (
        socket.create_connection(("127.0.0.1", injector.port), timeout=20) as raw,
        injector.client_context.wrap_socket(raw, server_hostname=SERVICE_DNS) as tls,
    ):
        tls.sendall(b"POST /mutate HTTP/1.1\r\nHost: ringside-injector\r\n")
        started = time.monotonic()
        status = injector.request("GET", "/healthz")[0]
        assert status == 200
        assert tls.recv(1024) == b""  # closed by the server, no answer
        waited = time.monotonic() - started
    assert 8 < waited < 15, waited

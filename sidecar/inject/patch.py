"""A Pod → the JSON Patch (RFC 6902) that adds the Ringside sidecar to it. Pure functions.

What an annotated pod gets:
- the `ringside` container as a native sidecar: an `initContainers` entry with
  `restartPolicy: Always` (Kubernetes ≥ 1.29), so it starts before the app containers and stops
  after them. It goes after the pod's leading native sidecars (a mesh proxy injected before us
  keeps carrying our upstream traffic) and before the first plain init container, so that an
  init step may call the LLM too; its startup probe on `/readyz` holds the next container back
  until the sidecar answers. Its environment comes from a Secret (`envFrom`: provider keys for
  `api_key_env`), optional when it is the injector's default, required when an annotation
  names it, so that a misspelt name shows as a pod that does not start;
- its ConfigMap mounted as a directory at /etc/ringside (never subPath: the kubelet's `..data`
  symlink swap must reach the sidecar's config reload) and an emptyDir for its sqlite store at
  /var/lib/ringside, also its working directory (the default `./ringside.db` lands there);
- `OPENAI_BASE_URL=http://localhost:8787/v1` in every app container (`spec.containers`) whose
  `env` does not name OPENAI_BASE_URL itself. Init containers are left alone: they are setup
  steps that rarely speak OpenAI; one that does sets the variable itself. A value coming from
  `envFrom` cannot be seen here and is overridden (an `env` entry wins over `envFrom`);
- the label `ringside.fightclub.pro/injected: "true"`, which k8s/monitoring's PodMonitor and
  NetworkPolicy select.

A pod that has a container named `ringside` already is left alone: that is the webhook's own
earlier work (reinvocation) or a sidecar the pod declares itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.inject.options import (
    PREFIX,
    InjectDefaults,
    InjectOptions,
    OptionError,
    options_for,
    wants_injection,
)

CONTAINER_NAME = "ringside"
CONFIG_VOLUME = "ringside-config"
STATE_VOLUME = "ringside-state"
CONFIG_DIR = "/etc/ringside"
STATE_DIR = "/var/lib/ringside"
API_PORT = 8787
ADMIN_PORT = 8788
BASE_URL_VAR = "OPENAI_BASE_URL"
BASE_URL = f"http://localhost:{API_PORT}/v1"
RUN_AS = 10001  # the image's numeric user (Dockerfile)
INJECTED_LABEL = PREFIX + "injected"


class MalformedPod(ValueError):
    """The object is not shaped like a Pod where the patch needs to read it."""


@dataclass(frozen=True, slots=True)
class Decision:
    """The webhook's answer for one pod: a patch (empty: no change), or a denial message."""

    outcome: str  # for the log: skipped, already-injected, injected, denied
    patch: list[dict[str, Any]] = field(default_factory=list)
    denial: str | None = None
    warnings: list[str] = field(default_factory=list)


def pointer_token(key: str) -> str:
    """`key` as one JSON Pointer reference token (RFC 6901: `~` → `~0`, then `/` → `~1`)."""
    return key.replace("~", "~0").replace("/", "~1")


def decide(pod: Mapping[str, Any], defaults: InjectDefaults) -> Decision:
    """What to do with `pod` (a Pod object as the API server sends it). Raises MalformedPod."""
    metadata = _object(pod.get("metadata"), "metadata")
    annotations = _object(metadata.get("annotations"), "metadata.annotations")
    if not all(isinstance(value, str) for value in annotations.values()):
        raise MalformedPod("metadata.annotations: every value must be a string")
    spec = _object(pod.get("spec"), "spec", required=True)
    containers = _objects(spec.get("containers"), "spec.containers", required=True)
    init_containers = _objects(spec.get("initContainers"), "spec.initContainers")
    volumes = _objects(spec.get("volumes"), "spec.volumes")
    wanted, warnings = wants_injection(annotations)
    if not wanted:
        return Decision("skipped", warnings=warnings)
    if any(c.get("name") == CONTAINER_NAME for c in [*containers, *init_containers]):
        return Decision("already-injected", warnings=warnings)
    try:
        options, unknown = options_for(annotations, defaults)
        _check_room(containers, init_containers, volumes)
    except OptionError as exc:
        return Decision("denied", denial=f"ringside injection refused: {exc}", warnings=warnings)
    patch = [
        *_sidecar_ops(spec, init_containers, options),
        *_volume_ops(spec, options),
        *_base_url_ops(containers),
        _label_op(metadata),
    ]
    return Decision("injected", patch=patch, warnings=[*warnings, *unknown])


def sidecar_container(options: InjectOptions) -> dict[str, Any]:
    """The Ringside container, as it goes into `initContainers`."""
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": options.image,
        "args": ["serve", "--config", f"{CONFIG_DIR}/ringside.yaml"],
        "restartPolicy": "Always",
        "workingDir": STATE_DIR,
        "ports": [
            {"name": "ringside-api", "containerPort": API_PORT, "protocol": "TCP"},
            {"name": "ringside-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
        ],
        # startup: the next container starts once the sidecar answers; readiness: a drain's
        # 503 takes the pod out of its Services at the next probe
        "startupProbe": _probe("/readyz", period=1, failures=30),
        "readinessProbe": _probe("/readyz", period=5, failures=1),
        "livenessProbe": _probe("/healthz", period=10, failures=3),
        "resources": options.resources,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": STATE_VOLUME, "mountPath": STATE_DIR},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if options.env_secret:
        secret = {"name": options.env_secret, "optional": options.env_secret_optional}
        container["envFrom"] = [{"secretRef": secret}]
    return container


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "ringside-admin"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def _sidecar_ops(
    spec: Mapping[str, Any], init_containers: list[dict[str, Any]], options: InjectOptions
) -> list[dict[str, Any]]:
    container = sidecar_container(options)
    if not isinstance(spec.get("initContainers"), list):  # absent or null: the whole array
        return [{"op": "add", "path": "/spec/initContainers", "value": [container]}]
    index = 0
    while index < len(init_containers) and init_containers[index].get("restartPolicy") == "Always":
        index += 1
    return [{"op": "add", "path": f"/spec/initContainers/{index}", "value": container}]


def _volume_ops(spec: Mapping[str, Any], options: InjectOptions) -> list[dict[str, Any]]:
    volumes = [
        {"name": CONFIG_VOLUME, "configMap": {"name": options.config_map}},
        {"name": STATE_VOLUME, "emptyDir": {"sizeLimit": "256Mi"}},
    ]
    if not isinstance(spec.get("volumes"), list):
        return [{"op": "add", "path": "/spec/volumes", "value": volumes}]
    return [{"op": "add", "path": "/spec/volumes/-", "value": volume} for volume in volumes]


def _base_url_ops(containers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    variable = {"name": BASE_URL_VAR, "value": BASE_URL}
    ops: list[dict[str, Any]] = []
    for index, container in enumerate(containers):
        env = _objects(container.get("env"), f"spec.containers[{index}].env")
        if any(entry.get("name") == BASE_URL_VAR for entry in env):
            continue
        if isinstance(container.get("env"), list):
            ops.append({"op": "add", "path": f"/spec/containers/{index}/env/-", "value": variable})
        else:
            ops.append({"op": "add", "path": f"/spec/containers/{index}/env", "value": [variable]})
    return ops


def _label_op(metadata: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(metadata.get("labels"), dict):
        return {"op": "add", "path": "/metadata/labels", "value": {INJECTED_LABEL: "true"}}
    path = f"/metadata/labels/{pointer_token(INJECTED_LABEL)}"
    return {"op": "add", "path": path, "value": "true"}


def _check_room(
    containers: list[dict[str, Any]],
    init_containers: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
) -> None:
    """Refuse what the API server or the kubelet would fail on less clearly after the patch:
    a volume name we add, or a port the sidecar listens on, already taken in the pod."""
    for volume in volumes:
        if volume.get("name") in (CONFIG_VOLUME, STATE_VOLUME):
            raise OptionError(f"the pod already has a volume named {volume['name']}")
    for container in [*containers, *init_containers]:
        ports = container.get("ports")
        for port in ports if isinstance(ports, list) else []:
            if isinstance(port, dict) and port.get("containerPort") in (API_PORT, ADMIN_PORT):
                raise OptionError(
                    f"container {container.get('name')} declares port "
                    f"{port['containerPort']}, which the ringside sidecar listens on"
                )


def _object(value: Any, where: str, required: bool = False) -> dict[str, Any]:
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise MalformedPod(f"{where} must be an object")
    return value


def _objects(value: Any, where: str, required: bool = False) -> list[dict[str, Any]]:
    """A list of objects (containers, volumes, env entries); absent or null is empty."""
    if value is None and not required:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise MalformedPod(f"{where} must be a list of objects")
    return value

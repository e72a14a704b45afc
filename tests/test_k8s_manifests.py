"""Every manifest under k8s/ validated offline against the Kubernetes schemas (kubernetes-validate,
strict), every kustomization rendered with `kubectl kustomize` and its output validated too, and
the rendered base and gateway overlay checked for what an operator relies on."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
# 1.29: the first release with native sidecars (an init container's restartPolicy) on by
# default; and the newest schemas the package ships
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
SIDECAR_IMAGE = "ghcr.io/fightclub/ringside:0.1.0"
# shutdown.delay_seconds and shutdown.grace_seconds when a config does not set them
DEFAULT_DRAIN = {"delay_seconds": 5, "grace_seconds": 20}

# YAML files under k8s/ that are not Kubernetes objects, by file name
NOT_MANIFESTS = {
    "kustomization.yaml": "kustomize's own file: checked by rendering it",
    "ringside.yaml": "a Ringside config: checked with `ringside check-config`",
}


# --- custom resources: no schema in kubernetes-validate, so their fields are checked here ---------

_META = {"type": "object", "required": ["name"]}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchLabels": {"type": "object"}, "matchExpressions": {"type": "array"}},
}


def _object(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": _META,
            "spec": spec,
        },
    }


def _closed(required: list[str], **properties: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": required,
        "properties": properties,
    }


_ANY: dict[str, Any] = {}
_STR = {"type": "string"}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)(y|w|d|h|m|s|ms))+)$"}
# Field lists from the CRDs: prometheus-operator monitoring.coreos.com/v1 (PodMonitor,
# PrometheusRule) and cert-manager.io/v1 (Issuer, Certificate); nested objects that these
# manifests do not use are accepted as any object.
_ENDPOINT_FIELDS = [
    "port",
    "portNumber",
    "targetPort",
    "path",
    "scheme",
    "params",
    "interval",
    "scrapeTimeout",
    "tlsConfig",
    "bearerTokenSecret",
    "honorLabels",
    "honorTimestamps",
    "trackTimestampsStaleness",
    "basicAuth",
    "oauth2",
    "authorization",
    "metricRelabelings",
    "relabelings",
    "proxyUrl",
    "noProxy",
    "proxyFromEnvironment",
    "proxyConnectHeader",
    "followRedirects",
    "enableHttp2",
    "filterRunning",
]
_PODMONITOR_FIELDS = [
    "jobLabel",
    "podTargetLabels",
    "sampleLimit",
    "targetLimit",
    "scrapeProtocols",
    "fallbackScrapeProtocol",
    "labelLimit",
    "labelNameLengthLimit",
    "labelValueLengthLimit",
    "scrapeClassicHistograms",
    "nativeHistogramBucketLimit",
    "nativeHistogramMinBucketFactor",
    "convertClassicHistogramsToNHCB",
    "keepDroppedTargets",
    "attachMetadata",
    "scrapeClass",
    "bodySizeLimit",
    "selectMechanism",
]
_PODMONITOR = _object(
    _closed(
        ["selector", "podMetricsEndpoints"],
        selector=_SELECTOR,
        namespaceSelector=_closed([], any={"type": "boolean"}, matchNames={"type": "array"}),
        podMetricsEndpoints={
            "type": "array",
            "minItems": 1,
            "items": _closed(
                [],
                **{
                    **{name: _ANY for name in _ENDPOINT_FIELDS},
                    "interval": _DURATION,
                    "scrapeTimeout": _DURATION,
                    "path": _STR,
                    "port": _STR,
                    "authorization": _closed(
                        [],
                        type=_STR,
                        credentials=_closed(
                            ["key"], name=_STR, key=_STR, optional={"type": "boolean"}
                        ),
                    ),
                },
            ),
        },
        **{name: _ANY for name in _PODMONITOR_FIELDS},
    )
)
_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["expr"],
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {
        "alert": _STR,
        "record": _STR,
        "expr": {"type": ["string", "integer"]},
        "for": _DURATION,
        "keep_firing_for": _DURATION,
        "labels": {"type": "object", "additionalProperties": _STR},
        "annotations": {"type": "object", "additionalProperties": _STR},
    },
}
_PROMETHEUSRULE = _object(
    _closed(
        [],
        groups={
            "type": "array",
            "items": _closed(
                ["name"],
                name=_STR,
                interval=_DURATION,
                query_offset=_DURATION,
                limit={"type": "integer"},
                partial_response_strategy=_STR,
                labels={"type": "object"},
                rules={"type": "array", "items": _RULE},
            ),
        },
    )
)
_ISSUER = _object(
    {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "maxProperties": 1,
        "properties": {
            name: {"type": "object"} for name in ("acme", "ca", "vault", "selfSigned", "venafi")
        },
    }
)
_CERTIFICATE_FIELDS = [
    "subject",
    "literalSubject",
    "commonName",
    "duration",
    "renewBefore",
    "renewBeforePercentage",
    "dnsNames",
    "ipAddresses",
    "uris",
    "otherNames",
    "emailAddresses",
    "secretTemplate",
    "keystores",
    "isCA",
    "usages",
    "privateKey",
    "signatureAlgorithm",
    "encodeUsagesInRequest",
    "revisionHistoryLimit",
    "additionalOutputFormats",
    "nameConstraints",
]
_CERTIFICATE = _object(
    _closed(
        ["secretName", "issuerRef"],
        **{
            **{name: _ANY for name in _CERTIFICATE_FIELDS},
            "secretName": _STR,
            "issuerRef": _closed(["name"], name=_STR, kind=_STR, group=_STR),
            "dnsNames": {"type": "array", "items": _STR},
            "duration": _DURATION,
            "renewBefore": _DURATION,
        },
    )
)
CUSTOM_RESOURCES: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "PodMonitor"): _PODMONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): _PROMETHEUSRULE,
    ("cert-manager.io/v1", "Issuer"): _ISSUER,
    ("cert-manager.io/v1", "ClusterIssuer"): _ISSUER,
    ("cert-manager.io/v1", "Certificate"): _CERTIFICATE,
}


def validate(document: dict[str, Any], where: str) -> None:
    """A Kubernetes object against the schemas of every version in VERSIONS (strict: unknown
    fields are errors), or a custom resource against its field list above. A kind known to
    neither is a failure, never a silent pass."""
    assert isinstance(document, dict) and {"apiVersion", "kind"} <= set(document), where
    key = (document["apiVersion"], document["kind"])
    if key in CUSTOM_RESOURCES:
        try:
            jsonschema.validate(document, CUSTOM_RESOURCES[key])
        except jsonschema.ValidationError as error:
            pytest.fail(f"{where}: {key[1]}: {'.'.join(map(str, error.path))}: {error.message}")
        return
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(map(str, error.path))
            pytest.fail(f"{where}: {key[1]} against {version}: {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(
                f"{where}: no schema for {key[1]} ({key[0]}) in Kubernetes {version}: "
                "a custom resource needs an entry in CUSTOM_RESOURCES"
            )


# --- every file -----------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    files = sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    return [p for p in files if p.name not in NOT_MANIFESTS]


def test_the_manifests_are_found() -> None:
    found = {p.relative_to(K8S).as_posix() for p in manifest_files()}
    assert {
        "base/deployment.yaml",
        "overlays/gateway/gateway.yaml",
        "overlays/gateway/redis.yaml",
        "monitoring/podmonitor.yaml",
        "monitoring/prometheusrule.yaml",
        "monitoring/networkpolicy.yaml",
    } <= found


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.relative_to(K8S).as_posix())
def test_manifest_file_is_valid(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents, f"{path}: no document"
    for index, document in enumerate(documents):
        if _is_patch(path, document):
            continue
        validate(document, f"{path.relative_to(ROOT)}[{index}]")


def _is_patch(path: Path, document: dict[str, Any]) -> bool:
    """A strategic-merge patch that a kustomization names under `patches` (a partial object:
    validated as part of the rendered output instead)."""
    kustomization = path.parent / "kustomization.yaml"
    if not kustomization.exists():
        return False
    patches = yaml.safe_load(kustomization.read_text()).get("patches", [])
    return any(isinstance(p, dict) and p.get("path") == path.name for p in patches)


def test_patches_are_only_what_the_kustomizations_name() -> None:
    """The one exemption from per-file validation is exactly the patch files."""
    patches = [p for p in manifest_files() if any(_is_patch(p, d) for d in _docs(p))]
    assert [p.relative_to(K8S).as_posix() for p in patches] == [
        "overlays/gateway/app-uses-gateway.yaml"
    ]


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_validation_fails_on_a_broken_manifest() -> None:
    """What the checks above reject: an unknown field (strict), a wrong type, a custom
    resource's unknown field, and a kind no schema knows."""
    deployment = _docs(K8S / "base" / "deployment.yaml")[0]
    pod = deployment["spec"]["template"]["spec"]
    pod["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(pytest.fail.Exception, match="restartPolicyy"):
        validate(deployment, "typo")
    del pod["initContainers"][0]["restartPolicyy"]
    pod["terminationGracePeriodSeconds"] = "35"
    with pytest.raises(pytest.fail.Exception, match="terminationGracePeriodSeconds"):
        validate(deployment, "type")
    monitor = _docs(K8S / "monitoring" / "podmonitor.yaml")[0]
    monitor["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    with pytest.raises(pytest.fail.Exception, match="intervall"):
        validate(monitor, "crd")
    with pytest.raises(pytest.fail.Exception, match="CUSTOM_RESOURCES"):
        validate({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {}}, "unknown")


# --- kubectl kustomize ----------------------------------------------------------------------------


def kubectl() -> str:
    """kubectl with a kustomize that knows components; missing in CI is a failure."""
    found = shutil.which("kubectl")
    if found is None:
        message = "kubectl not found (.ci/run installs it: apt-get install kubectl)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    version = subprocess.run(
        [found, "version", "--client"], capture_output=True, text=True, timeout=30
    ).stdout
    match = re.search(r"Kustomize Version: v(\d+)", version)
    assert match and int(match.group(1)) >= 4, (
        f"kubectl's kustomize is too old for components (Debian's kubernetes-client 1.20 is): "
        f"{version}"
    )
    return found


def kustomizations() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


_RENDERED: dict[Path, list[dict[str, Any]]] = {}


def render(directory: Path) -> list[dict[str, Any]]:
    if directory not in _RENDERED:
        result = subprocess.run(
            [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        _RENDERED[directory] = [d for d in yaml.safe_load_all(result.stdout) if d]
    return _RENDERED[directory]


def test_every_kustomization_is_rendered() -> None:
    found = {p.relative_to(K8S).as_posix() for p in kustomizations()}
    assert {"base", "overlays/gateway", "monitoring"} <= found


@pytest.mark.parametrize("directory", kustomizations(), ids=lambda p: p.relative_to(K8S).as_posix())
def test_rendered_output_is_valid(directory: Path) -> None:
    documents = render(directory)
    assert documents
    for document in documents:
        name = document.get("metadata", {}).get("name")
        validate(document, f"kubectl kustomize {directory.relative_to(ROOT)}: {name}")


def test_rendering_fails_on_a_broken_kustomization(tmp_path: Path) -> None:
    """A reference to a file that is not there fails the render (not an empty output)."""
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    (copy / "base" / "ringside.yaml").unlink()
    result = subprocess.run(
        [kubectl(), "kustomize", str(copy / "base")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "ringside.yaml" in result.stderr


# --- what the rendered base promises --------------------------------------------------------------


def find(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, (kind, name, [d["metadata"]["name"] for d in documents])
    return matches[0]


def secret_named(documents: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """A Secret by its generator's name (kustomize appends a content hash)."""
    matches = [
        d for d in documents
        if d["kind"] == "Secret" and re.fullmatch(re.escape(name) + r"(-[a-z0-9]{10})?",
                                                  d["metadata"]["name"])
    ]  # fmt: skip
    assert len(matches) == 1, name
    return matches[0]


def secret_value(documents: list[dict[str, Any]], name: str, key: str) -> str:
    secret = secret_named(documents, name)
    if key in secret.get("stringData", {}):
        return str(secret["stringData"][key])
    return base64.b64decode(secret["data"][key]).decode()


def pod_spec(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = find(documents, kind, name)["spec"]["template"]["spec"]
    return spec


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    every = spec.get("initContainers", []) + spec["containers"]
    [found] = [c for c in every if c["name"] == name]
    return found


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def mounted_config(documents: list[dict[str, Any]], spec: dict[str, Any], c: dict[str, Any]):
    """(the config file the container's --config names, its parsed content from the rendered
    ConfigMap, the volume mount that carries it)."""
    args = c["args"]
    path = Path(args[args.index("--config") + 1])
    [mount] = [m for m in c["volumeMounts"] if m["mountPath"] == str(path.parent)]
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    configmap = find(documents, "ConfigMap", volume["configMap"]["name"])
    return path, yaml.safe_load(configmap["data"][path.name]), mount


def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return int(number)


def listen_port(config: dict[str, Any], listener: str) -> int:
    return int(str(config["listen"][listener]).rsplit(":", 1)[1])


def check_security(spec: dict[str, Any], c: dict[str, Any]) -> None:
    pod = spec.get("securityContext", {})
    own = c.get("securityContext", {})
    assert own.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, c["name"]
    assert own.get("runAsUser", pod.get("runAsUser", 0)) != 0, c["name"]
    assert own["readOnlyRootFilesystem"] is True, c["name"]
    assert own["allowPrivilegeEscalation"] is False, c["name"]
    assert own["capabilities"] == {"drop": ["ALL"]}, c["name"]
    seccomp = own.get("seccompProfile", pod.get("seccompProfile"))
    assert seccomp == {"type": "RuntimeDefault"}, c["name"]


def check_probes(c: dict[str, Any], config: dict[str, Any]) -> None:
    admin = listen_port(config, "admin")
    expected = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert port_number(c, get["port"]) == admin, probe


def check_drain(spec: dict[str, Any], config: dict[str, Any]) -> None:
    drain = {**DEFAULT_DRAIN, **(config.get("shutdown") or {})}
    needed = drain["delay_seconds"] + drain["grace_seconds"]
    assert spec["terminationGracePeriodSeconds"] >= needed + 5, (spec, drain)


def check_config(tmp_path: Path, config: dict[str, Any], env: dict[str, str]) -> None:
    """The config as mounted passes `ringside check-config` with the container's variables set."""
    path = tmp_path / "ringside.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", str(path)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **env},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is not set" not in result.stderr, result.stderr


def placeholder_env(documents: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, str]:
    """The container's variables with the values the rendered Secrets give them (optional
    references to a Secret that is not rendered are left unset, as the kubelet does)."""
    values = {}
    for name, entry in env_of(c).items():
        if "value" in entry:
            values[name] = entry["value"]
            continue
        ref = entry["valueFrom"]["secretKeyRef"]
        rendered = [d for d in documents if d["kind"] == "Secret"]
        if ref.get("optional") and not any(d["metadata"]["name"] == ref["name"] for d in rendered):
            continue
        secret = find(documents, "Secret", ref["name"])  # the hashed name kustomize wrote
        assert ref["key"] in secret["data"], (name, ref)
        values[name] = base64.b64decode(secret["data"][ref["key"]]).decode()
    return values


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render(K8S / "base")


@pytest.fixture(scope="module")
def gateway() -> list[dict[str, Any]]:
    return render(K8S / "overlays" / "gateway")


def test_base_runs_ringside_as_a_native_sidecar(base: list[dict[str, Any]]) -> None:
    spec = pod_spec(base, "Deployment", "example-app")
    [sidecar] = spec["initContainers"]
    assert sidecar["image"] == SIDECAR_IMAGE
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["args"] == ["serve", "--config", "/etc/ringside/ringside.yaml"]
    assert "restartPolicy" not in spec or spec["restartPolicy"] == "Always"


def test_base_app_reaches_the_sidecar_on_localhost(base: list[dict[str, Any]]) -> None:
    spec = pod_spec(base, "Deployment", "example-app")
    _, config, _ = mounted_config(base, spec, container(spec, "ringside"))
    app = container(spec, "app")
    assert env_of(app)["OPENAI_BASE_URL"]["value"] == "http://localhost:8787/v1"
    host, port = str(config["listen"]["api"]).rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) == 8787  # loopback: this pod's containers only
    assert "keys" not in config  # open mode, which the sidecar allows on loopback only


def test_base_config_is_a_directory_mount_that_reloads(
    base: list[dict[str, Any]], tmp_path: Path
) -> None:
    spec = pod_spec(base, "Deployment", "example-app")
    sidecar = container(spec, "ringside")
    _, config, mount = mounted_config(base, spec, sidecar)
    assert "subPath" not in mount and "subPathExpr" not in mount
    assert mount.get("readOnly") is True
    # no name hash on the ConfigMap: an edit updates it in place (the `..data` swap), not a rollout
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "ringside-config"
    assert "items" not in volume["configMap"]  # every key, under its own name
    check_config(tmp_path, config, placeholder_env(base, sidecar))


def test_base_secret_feeds_every_provider_key(base: list[dict[str, Any]]) -> None:
    spec = pod_spec(base, "Deployment", "example-app")
    sidecar = container(spec, "ringside")
    _, config, _ = mounted_config(base, spec, sidecar)
    env = env_of(sidecar)
    for name, provider in config["providers"].items():
        variable = provider["api_key_env"]
        ref = env[variable]["valueFrom"]["secretKeyRef"]
        assert not ref.get("optional"), name
        assert secret_named(base, "ringside-provider-keys")["metadata"]["name"] == ref["name"]
        assert secret_value(base, "ringside-provider-keys", ref["key"])


def test_base_probes_use_the_admin_port(base: list[dict[str, Any]]) -> None:
    spec = pod_spec(base, "Deployment", "example-app")
    sidecar = container(spec, "ringside")
    _, config, _ = mounted_config(base, spec, sidecar)
    check_probes(sidecar, config)
    assert "startupProbe" in sidecar  # the app container starts after this passes


def test_base_security_context(base: list[dict[str, Any]]) -> None:
    spec = pod_spec(base, "Deployment", "example-app")
    assert spec["securityContext"]["runAsUser"] == 10001  # the image's user
    for c in spec["initContainers"] + spec["containers"]:
        check_security(spec, c)


def test_base_sqlite_store_is_on_an_emptydir(base: list[dict[str, Any]]) -> None:
    spec = pod_spec(base, "Deployment", "example-app")
    sidecar = container(spec, "ringside")
    _, config, _ = mounted_config(base, spec, sidecar)
    assert config["storage"]["backend"] == "sqlite"
    directory = str(Path(config["storage"]["sqlite_path"]).parent)
    assert directory == "/var/lib/ringside"  # the image's VOLUME
    [mount] = [m for m in sidecar["volumeMounts"] if m["mountPath"] == directory]
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume


def test_base_grace_period_covers_the_drain(base: list[dict[str, Any]]) -> None:
    spec = pod_spec(base, "Deployment", "example-app")
    _, config, _ = mounted_config(base, spec, container(spec, "ringside"))
    check_drain(spec, config)


def _mib(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    return float(quantity) / 2**20


def test_base_resources_cover_the_bench(base: list[dict[str, Any]]) -> None:
    """Requests at least the RSS under load of the bench's sidecars, the limit above the soak's
    peak under its hostile mix (bench/results)."""
    import json

    latest = json.loads((ROOT / "bench/results/latest.json").read_text())["results"]
    soak = json.loads((ROOT / "bench/results/soak.json").read_text())
    under_load = max(r["rss_load_mib"] for name, r in latest.items() if name.startswith("sidecar"))
    spec = pod_spec(base, "Deployment", "example-app")
    resources = container(spec, "ringside")["resources"]
    assert _mib(resources["requests"]["memory"]) >= under_load
    assert _mib(resources["limits"]["memory"]) >= soak["rss_mib"]["peak_under_mix"] * 1.25
    assert resources["requests"]["cpu"] and resources["limits"]["cpu"]


def test_base_monitoring_component_selects_the_pod(base: list[dict[str, Any]]) -> None:
    spec = pod_spec(base, "Deployment", "example-app")
    labels = find(base, "Deployment", "example-app")["spec"]["template"]["metadata"]["labels"]
    monitor = find(base, "PodMonitor", "ringside")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    sidecar = container(spec, "ringside")
    assert port_number(sidecar, endpoint["port"]) == 8788
    policy = find(base, "NetworkPolicy", "ringside-admin")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    for kind in ("PrometheusRule", "ConfigMap"):
        assert any(d["kind"] == kind for d in base)


# --- what the rendered gateway overlay promises ---------------------------------------------------


def test_gateway_serves_the_cluster_with_keys_and_redis(
    gateway: list[dict[str, Any]], tmp_path: Path
) -> None:
    spec = pod_spec(gateway, "Deployment", "ringside-gateway")
    ringside = container(spec, "ringside")
    assert ringside["image"] == SIDECAR_IMAGE
    _, config, mount = mounted_config(gateway, spec, ringside)
    assert "subPath" not in mount
    assert config["listen"]["api"] == "0.0.0.0:8787"
    assert config["keys"] and all(
        re.fullmatch(r"[0-9a-f]{64}", k["sha256"]) for k in config["keys"]
    )
    assert config["storage"]["backend"] == "redis"
    assert config["storage"]["redis_url"] == "${RINGSIDE_REDIS_URL}"
    assert env_of(ringside)["RINGSIDE_REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"] == (
        "RINGSIDE_REDIS_URL"
    )
    journal = Path(config["storage"]["journal_path"]).parent
    assert any(m["mountPath"] == str(journal) for m in ringside["volumeMounts"])
    check_config(tmp_path, config, placeholder_env(gateway, ringside))
    check_probes(ringside, config)
    check_drain(spec, config)
    check_security(spec, ringside)


def test_gateway_service_hpa_pdb_and_spread(gateway: list[dict[str, Any]]) -> None:
    deployment = find(gateway, "Deployment", "ringside-gateway")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    ringside = container(deployment["spec"]["template"]["spec"], "ringside")
    service = find(gateway, "Service", "ringside-gateway")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["port"]: port_number(ringside, p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {8787: 8787, 8788: 8788}
    hpa = find(gateway, "HorizontalPodAutoscaler", "ringside-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "ringside-gateway",
    }  # fmt: skip
    assert hpa["spec"]["minReplicas"] >= 2
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert ringside["resources"]["requests"]["cpu"]  # a CPU utilization needs a request
    pdb = find(gateway, "PodDisruptionBudget", "ringside-gateway")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {
        "kubernetes.io/hostname", "topology.kubernetes.io/zone",
    }  # fmt: skip
    for constraint in spread:
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()


def test_gateway_app_calls_the_service_with_a_client_key(gateway: list[dict[str, Any]]) -> None:
    spec = pod_spec(gateway, "Deployment", "example-app")
    assert not spec.get("initContainers")  # no sidecar left
    assert not spec.get("volumes")
    labels = find(gateway, "Deployment", "example-app")["spec"]["template"]["metadata"]["labels"]
    assert "ringside.fightclub.pro/injected" not in labels
    app = container(spec, "app")
    env = env_of(app)
    service = find(gateway, "Service", "ringside-gateway")
    api = [p["port"] for p in service["spec"]["ports"] if p["name"] == "api"]
    assert env["OPENAI_BASE_URL"] == {
        "name": "OPENAI_BASE_URL", "value": f"http://ringside-gateway:{api[0]}/v1",
    }  # fmt: skip
    ref = env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert "value" not in env["OPENAI_API_KEY"]
    assert secret_named(gateway, "ringside-client-key")["metadata"]["name"] == ref["name"]


def test_gateway_redis_matches_the_url(gateway: list[dict[str, Any]]) -> None:
    url = secret_value(gateway, "ringside-redis", "RINGSIDE_REDIS_URL")
    password = secret_value(gateway, "ringside-redis", "REDIS_PASSWORD")
    match = re.fullmatch(r"redis://:([^@]+)@([a-z0-9-]+):(\d+)/\d+", url)
    assert match, url
    assert match.group(1) == password
    service = find(gateway, "Service", match.group(2))
    assert service["spec"]["clusterIP"] == "None"  # headless, the StatefulSet's
    statefulset = find(gateway, "StatefulSet", "ringside-redis")
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert [p["port"] for p in service["spec"]["ports"]] == [int(match.group(3))]
    redis = container(statefulset["spec"]["template"]["spec"], "redis")
    assert redis["image"].startswith("redis:7")
    assert "$(REDIS_PASSWORD)" in redis["args"]
    check_security(statefulset["spec"]["template"]["spec"], redis)


def test_gateway_monitoring_selects_the_gateway(gateway: list[dict[str, Any]]) -> None:
    labels = find(gateway, "Deployment", "ringside-gateway")["spec"]["template"]["metadata"][
        "labels"
    ]
    monitor = find(gateway, "PodMonitor", "ringside")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    policy = find(gateway, "NetworkPolicy", "ringside-admin")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()


# --- the configs as committed ---------------------------------------------------------------------


def config_files() -> list[Path]:
    return sorted(K8S.rglob("ringside.yaml"))


def placeholders(path: Path) -> dict[str, str]:
    """A value for every variable the config reads: `${NAME}` without a default, and every
    provider's api_key_env."""
    text = path.read_text()
    names = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text))
    for provider in (yaml.safe_load(text).get("providers") or {}).values():
        if provider.get("api_key_env"):
            names.add(provider["api_key_env"])
    return {n: "redis://:pw@redis:6379/0" if "REDIS_URL" in n else "placeholder" for n in names}


def test_the_configs_are_found() -> None:
    found = {p.relative_to(K8S).as_posix() for p in config_files()}
    assert {"base/ringside.yaml", "overlays/gateway/ringside.yaml"} <= found


@pytest.mark.parametrize("config", config_files(), ids=lambda p: p.relative_to(K8S).as_posix())
def test_config_passes_check_config(config: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", str(config)],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **placeholders(config)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok: ")

"""k8s/injector: every manifest valid offline, and the pieces agree with each other and with the
`ringside inject-webhook` command they run.

Kubernetes kinds are validated with kubernetes-validate (strict). cert-manager's Issuer and
Certificate have no schema there: `check_cert_manager` checks by hand exactly the fields these
manifests use (names, enums, durations); any other kind without a schema fails.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from sidecar.cli import build_parser
from sidecar.inject.options import DEFAULT_IMAGE, INJECT, InjectDefaults, options_for
from sidecar.inject.patch import BASE_URL, BASE_URL_VAR, INJECTED_LABEL, sidecar_container
from tests.injector import K8S_VERSIONS

INJECTOR = Path(__file__).resolve().parent.parent / "k8s" / "injector"
GO_DURATION = re.compile(r"(\d+(\.\d+)?(h|m|s|ms))+")
CERT_MANAGER_USAGES = {
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
    "server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
    "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc",
}  # fmt: skip


def check_cert_manager(document: dict[str, Any]) -> None:
    """The cert-manager.io/v1 fields these manifests use, as cert-manager's CRDs define them."""
    assert document["apiVersion"] == "cert-manager.io/v1"
    assert set(document) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(document["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    spec = document["spec"]
    if document["kind"] == "Issuer":
        assert len(spec) == 1 and set(spec) <= {"selfSigned", "ca"}, spec
        assert spec.get("selfSigned", {}) == {}
        assert set(spec.get("ca", {"secretName": ""})) == {"secretName"}
        return
    assert document["kind"] == "Certificate", document["kind"]
    known = {"secretName", "issuerRef", "isCA", "commonName", "duration", "renewBefore",
             "dnsNames", "usages", "privateKey"}  # fmt: skip
    assert {"secretName", "issuerRef"} <= set(spec) <= known, spec
    assert set(spec["issuerRef"]) <= {"name", "kind", "group"} and spec["issuerRef"]["name"]
    assert spec["issuerRef"].get("group", "cert-manager.io") == "cert-manager.io"
    assert spec["issuerRef"].get("kind", "Issuer") in ("Issuer", "ClusterIssuer")
    for field in ("duration", "renewBefore"):
        assert GO_DURATION.fullmatch(spec.get(field, "1h")), (field, spec.get(field))
    assert isinstance(spec.get("isCA", False), bool)
    assert set(spec.get("usages", [])) <= CERT_MANAGER_USAGES
    assert all(isinstance(name, str) for name in spec.get("dnsNames", []))
    key = spec.get("privateKey", {})
    assert set(key) <= {"algorithm", "size", "rotationPolicy", "encoding"}
    assert key.get("algorithm", "RSA") in ("RSA", "ECDSA", "Ed25519")
    assert key.get("rotationPolicy", "Always") in ("Always", "Never")
    if key.get("algorithm") == "ECDSA":
        assert key.get("size", 256) in (256, 384, 521)


def validate(document: dict[str, Any]) -> None:
    if document["apiVersion"].startswith("cert-manager.io/"):
        check_cert_manager(document)
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(document, version, strict=True)


def load(directory: Path = INJECTOR) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    documents = []
    for name in kustomization["resources"]:
        documents += [d for d in yaml.safe_load_all((directory / name).read_text()) if d]
    return documents


def one(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in documents if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    return load()


def test_the_kustomization_lists_every_file() -> None:
    listed = set(yaml.safe_load((INJECTOR / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in INJECTOR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_every_manifest_is_valid(manifests: list[dict[str, Any]]) -> None:
    kinds = {document["kind"] for document in manifests}
    assert kinds == {
        "Namespace", "ServiceAccount", "Issuer", "Certificate", "Deployment", "Service",
        "PodDisruptionBudget", "MutatingWebhookConfiguration",
    }  # fmt: skip
    for document in manifests:
        validate(document)


@pytest.mark.parametrize(
    ("kind", "change"),
    [
        ("MutatingWebhookConfiguration", lambda d: d["webhooks"][0].update(sideEffect="None")),
        ("Deployment", lambda d: d["spec"]["template"]["spec"].update(replica=2)),
        ("Certificate", lambda d: d["spec"].update(dnsName=["x"])),
        ("Certificate", lambda d: d["spec"].update(duration="90d")),
        ("Issuer", lambda d: d["spec"].update(acme={})),
    ],
)
def test_validation_catches_a_typo(manifests: list[dict[str, Any]], kind: str, change: Any) -> None:
    document = copy.deepcopy(next(d for d in manifests if d["kind"] == kind))
    change(document)
    with pytest.raises((kubernetes_validate.ValidationError, AssertionError)):
        validate(document)


def test_webhook_is_called_for_pod_creation_only_with_review_v1(
    manifests: list[dict[str, Any]],
) -> None:
    (webhook,) = one(manifests, "MutatingWebhookConfiguration")["webhooks"]
    assert webhook["admissionReviewVersions"] == ["v1"]
    assert webhook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    assert webhook["sideEffects"] == "None"
    assert webhook["reinvocationPolicy"] == "IfNeeded"
    assert webhook["failurePolicy"] == "Fail"
    assert 1 <= webhook["timeoutSeconds"] <= 10


def test_webhook_skips_kube_system_and_its_own_namespace(manifests: list[dict[str, Any]]) -> None:
    (webhook,) = one(manifests, "MutatingWebhookConfiguration")["webhooks"]
    own = one(manifests, "Deployment")["metadata"]["namespace"]
    assert own == one(manifests, "Namespace")["metadata"]["name"]
    assert webhook["namespaceSelector"]["matchExpressions"] == [
        {
            "key": "kubernetes.io/metadata.name",
            "operator": "NotIn",
            "values": ["kube-system", own],
        }
    ]


def test_webhook_is_called_only_for_pods_that_ask(manifests: list[dict[str, Any]]) -> None:
    """Fail is safe only because the API server calls the webhook for annotated pods alone."""
    (webhook,) = one(manifests, "MutatingWebhookConfiguration")["webhooks"]
    (condition,) = webhook["matchConditions"]
    expression = " ".join(condition["expression"].split())
    assert expression == (
        f"has(object.metadata.annotations) && '{INJECT}' in object.metadata.annotations && "
        f"object.metadata.annotations['{INJECT}'] != 'false'"
    )


def test_webhook_reaches_the_service_with_a_certificate_for_its_name(
    manifests: list[dict[str, Any]],
) -> None:
    configuration = one(manifests, "MutatingWebhookConfiguration")
    target = configuration["webhooks"][0]["clientConfig"]["service"]
    service = one(manifests, "Service", target["name"])
    assert target["namespace"] == service["metadata"]["namespace"]
    assert target["path"] == "/mutate"
    (port,) = service["spec"]["ports"]
    assert target["port"] == port["port"] == 443
    namespace, name = configuration["metadata"]["annotations"][
        "cert-manager.io/inject-ca-from"
    ].split("/")
    certificate = one(manifests, "Certificate", name)
    assert certificate["metadata"]["namespace"] == namespace
    # the name the API server verifies the serving certificate against
    assert f"{target['name']}.{target['namespace']}.svc" in certificate["spec"]["dnsNames"]
    assert "server auth" in certificate["spec"]["usages"]


def test_serving_certificate_comes_from_a_private_ca(manifests: list[dict[str, Any]]) -> None:
    serving = one(manifests, "Certificate", "ringside-injector-tls")
    issuer = one(manifests, "Issuer", serving["spec"]["issuerRef"]["name"])
    ca_certificate = one(manifests, "Certificate", "ringside-injector-ca")
    assert issuer["spec"]["ca"]["secretName"] == ca_certificate["spec"]["secretName"]
    assert ca_certificate["spec"]["isCA"] is True
    root = one(manifests, "Issuer", ca_certificate["spec"]["issuerRef"]["name"])
    assert root["spec"] == {"selfSigned": {}}
    assert serving["spec"]["privateKey"]["rotationPolicy"] == "Always"


def injector_pod(manifests: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = one(manifests, "Deployment")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, container


def test_deployment_runs_the_command_with_the_mounted_certificate(
    manifests: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, container = injector_pod(manifests)
    for variable in container["env"]:
        assert variable["name"].startswith("RINGSIDE_INJECT_")
        monkeypatch.setenv(variable["name"], variable["value"])
    args = build_parser().parse_args(container["args"])  # the real parser, with the env
    assert args.command == "inject-webhook"
    assert args.image == container["image"] == DEFAULT_IMAGE
    assert args.default_config_map == "ringside-config"
    assert args.drain_seconds < spec["terminationGracePeriodSeconds"]
    (mount,) = container["volumeMounts"]
    assert "subPath" not in mount and mount["readOnly"] is True
    assert Path(args.tls_cert).parent == Path(args.tls_key).parent == Path(mount["mountPath"])
    (volume,) = spec["volumes"]
    assert volume["name"] == mount["name"]
    certificate = one(manifests, "Certificate", "ringside-injector-tls")
    assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]
    (port,) = container["ports"]
    assert args.listen == ("0.0.0.0", port["containerPort"])
    service = one(manifests, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]


def test_deployment_probes_its_own_https_endpoints(manifests: list[dict[str, Any]]) -> None:
    _, container = injector_pod(manifests)
    port = container["ports"][0]["name"]
    assert container["readinessProbe"]["httpGet"] == {
        "path": "/readyz",
        "port": port,
        "scheme": "HTTPS",
    }
    assert container["livenessProbe"]["httpGet"] == {
        "path": "/healthz",
        "port": port,
        "scheme": "HTTPS",
    }


def test_deployment_is_non_root_read_only_and_spread(manifests: list[dict[str, Any]]) -> None:
    deployment = one(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    spec, container = injector_pod(manifests)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    keys = {c["topologyKey"] for c in spec["topologySpreadConstraints"]}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in spec["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one(manifests, "Service")["spec"]["selector"].items() <= labels.items()


def test_disruption_budget_keeps_one_replica(manifests: list[dict[str, Any]]) -> None:
    deployment = one(manifests, "Deployment")
    budget = one(manifests, "PodDisruptionBudget")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def test_kustomize_renders_valid_objects_in_the_namespace() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found (the k8s manifests test requires it in CI)")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(INJECTOR)], capture_output=True, text=True, timeout=120
    )
    assert rendered.returncode == 0, rendered.stderr
    documents = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    assert len(documents) == len(load())
    for document in documents:
        validate(document)
        if document["kind"] not in ("Namespace", "MutatingWebhookConfiguration"):
            assert document["metadata"]["namespace"] == "ringside-system", document["kind"]
    webhook = one(documents, "MutatingWebhookConfiguration")["webhooks"][0]
    assert webhook["clientConfig"]["service"]["namespace"] == "ringside-system"


def test_the_injected_sidecar_matches_the_one_k8s_base_writes_out(
    manifests: list[dict[str, Any]],
) -> None:
    """An injected pod and the hand-written example in k8s/base run the same sidecar."""
    base = yaml.safe_load((INJECTOR.parent / "base" / "deployment.yaml").read_text())
    spec = base["spec"]["template"]["spec"]
    written = next(c for c in spec["initContainers"] if c["name"] == "ringside")
    options, _ = options_for({}, InjectDefaults())
    injected = sidecar_container(options)
    for field in ("name", "image", "args", "restartPolicy", "resources"):
        assert injected[field] == written[field], field
    assert [(p["name"], p["containerPort"]) for p in injected["ports"]] == [
        (p["name"], p["containerPort"]) for p in written["ports"]
    ]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        for field in ("httpGet", "periodSeconds", "failureThreshold"):
            assert injected[probe][field] == written[probe][field], (probe, field)
    assert injected["volumeMounts"] == written["volumeMounts"]
    assert written["securityContext"].items() <= injected["securityContext"].items()
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["ringside-config"]["configMap"]["name"] == options.config_map
    assert volumes["ringside-state"]["emptyDir"] == {"sizeLimit": "256Mi"}
    # the app's OPENAI_BASE_URL is what the injector adds
    (app,) = spec["containers"]
    assert {"name": BASE_URL_VAR, "value": BASE_URL} in app["env"]
    labels = base["spec"]["template"]["metadata"]["labels"]
    assert labels[INJECTED_LABEL] == "true"

"""AdmissionReview v1 (admission.k8s.io/v1): reading what the API server sends to /mutate and
writing the answer it expects. Anything else is a BadReview, answered 400 by the webhook."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import orjson

from sidecar.inject.patch import Decision

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"
POD_KIND = {"group": "", "version": "v1", "kind": "Pod"}


class BadReview(ValueError):
    """The body is not an AdmissionReview v1 about a Pod."""


@dataclass(frozen=True, slots=True)
class PodReview:
    uid: str
    operation: str  # CREATE is the only one mutated; the webhook's rules send only that
    namespace: str
    pod: dict[str, Any]

    @property
    def pod_name(self) -> str:
        """The pod's name for the log (`generateName*` before the API server names it)."""
        metadata = self.pod.get("metadata")
        if not isinstance(metadata, dict):
            return "?"
        name = metadata.get("name") or f"{metadata.get('generateName') or ''}*"
        return f"{self.namespace}/{name}"


def read_review(body: bytes) -> PodReview:
    """The review in `body`. Raises BadReview saying what is wrong."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadReview("the body is not JSON") from None
    if not isinstance(document, dict):
        raise BadReview("the body is not a JSON object")
    if document.get("apiVersion") != API_VERSION or document.get("kind") != KIND:
        raise BadReview(f"expected apiVersion {API_VERSION} and kind {KIND}")
    request = document.get("request")
    if not isinstance(request, dict):
        raise BadReview("request: missing or not an object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("request.uid: missing or not a string")
    kind = request.get("kind")
    if not isinstance(kind, dict) or any(kind.get(key) != POD_KIND[key] for key in POD_KIND):
        raise BadReview("request.kind: not a core v1 Pod")
    if request.get("subResource"):
        raise BadReview("request.subResource: only pods themselves are reviewed, not a subresource")
    operation = request.get("operation")
    if not isinstance(operation, str):
        raise BadReview("request.operation: missing or not a string")
    pod = request.get("object")
    if operation == "CREATE" and (
        not isinstance(pod, dict) or pod.get("kind", "Pod") != "Pod" or not pod.get("spec")
    ):
        raise BadReview("request.object: not a Pod")
    namespace = request.get("namespace")
    return PodReview(
        uid=uid,
        operation=operation,
        namespace=namespace if isinstance(namespace, str) else "",
        pod=pod if isinstance(pod, dict) else {},
    )


def review_answer(uid: str, decision: Decision) -> bytes:
    """The AdmissionReview answering request `uid` with `decision`."""
    response: dict[str, Any] = {"uid": uid, "allowed": decision.denial is None}
    if decision.denial is not None:
        response["status"] = {
            "status": "Failure",
            "code": 400,
            "reason": "BadRequest",
            "message": decision.denial,
        }
    if decision.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(orjson.dumps(decision.patch)).decode()
    if decision.warnings:
        response["warnings"] = decision.warnings
    return orjson.dumps({"apiVersion": API_VERSION, "kind": KIND, "response": response})

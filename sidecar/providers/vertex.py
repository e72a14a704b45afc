"""The `vertex` kind: Gemini on Vertex AI — the gemini kind's bodies at Vertex's URLs.

`{base_url}/{api_version}/projects/{project}/locations/{location}/publishers/google/models/
{model}:generateContent` (and `:streamGenerateContent?alt=sse`); `base_url` defaults to
`https://{location}-aiplatform.googleapis.com`, or `https://aiplatform.googleapis.com` for the
`global` location (the default location, as in Google's own SDK); `api_version` is v1 unless
the provider sets v1beta1. A model id with a `/` is a resource under the location
(`endpoints/1234` for a tuned model's endpoint, `publishers/google/models/…`).

Credentials are Google's application default credentials, as Google's SDKs find them (a
service-account key file named by GOOGLE_APPLICATION_CREDENTIALS, GKE workload identity
through the metadata server, gcloud's user credentials), read by Google's `google-auth` library
(the optional `vertex` extra): `vertex_auth.GoogleToken` keeps an access token fresh in the
background and sets `Authorization: Bearer` on each call; this adapter sends none itself.
Embeddings: `:predict` on the model (gemini_embed), not the gemini kind's batchEmbedContents.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from urllib.parse import quote

import orjson

from sidecar.providers.base import Completion, HttpRequest, UpstreamCall
from sidecar.providers.gemini import GeminiAdapter
from sidecar.providers.gemini_embed import predict_answer, predict_body, vertex_batch
from sidecar.providers.native_embeddings import BatchLimit
from sidecar.settings.model import ProviderSettings

DEFAULT_LOCATION = "global"
API_VERSIONS = frozenset({"v1", "v1beta1"})
EXTRA_HINT = "pip install 'ringside[vertex]'"


def has_google_auth() -> bool:
    """Whether Google's google-auth library and the HTTP transport it fetches tokens with
    (requests) are installed: found, not imported."""
    try:
        return all(importlib.util.find_spec(name) for name in ("google.auth", "requests"))
    except ModuleNotFoundError:  # no `google` namespace package at all
        return False


def settings_problems(settings: ProviderSettings) -> list[tuple[str, str]]:
    """(key, message) for what the JSON Schema cannot check about a vertex provider."""
    problems: list[tuple[str, str]] = []
    if not settings.project:
        problems.append(
            ("", "vertex needs project: the Google Cloud project whose Vertex AI serves the "
                 "calls (e.g. project: ${GOOGLE_CLOUD_PROJECT})")
        )  # fmt: skip
    if settings.api_version is not None and settings.api_version not in API_VERSIONS:
        problems.append(
            ("api_version", f"{settings.api_version!r} is no Vertex AI API version: v1 (the "
                            "default) or v1beta1")
        )  # fmt: skip
    if settings.api_key_env:
        problems.append(
            ("api_key_env", "vertex authenticates with Google's application default "
                            "credentials (GOOGLE_APPLICATION_CREDENTIALS, workload identity), "
                            "not an API key: use kind gemini for a Gemini API key")
        )  # fmt: skip
    if not has_google_auth():
        problems.append(
            ("", "vertex needs Google's google-auth library (with requests) for its "
                 f"credentials: {EXTRA_HINT}")
        )  # fmt: skip
    return problems


class VertexAdapter(GeminiAdapter):
    """Built once per configured `vertex` provider; the bearer token is set per call by the
    provider's client (vertex_auth.GoogleToken), never here."""

    def api_root(self, settings: ProviderSettings) -> str:
        location = settings.location or DEFAULT_LOCATION
        host = "aiplatform.googleapis.com"
        if location != DEFAULT_LOCATION:
            host = f"{location}-{host}"
        base = (settings.base_url or f"https://{host}").rstrip("/")
        project = quote(settings.project or "", safe="")
        return (
            f"{base}/{settings.api_version or 'v1'}/projects/{project}"
            f"/locations/{quote(location, safe='')}"
        )

    def auth_headers(self, settings: ProviderSettings) -> dict[str, str]:
        return {}

    def model_path(self, model_id: str) -> str:
        return model_id if "/" in model_id else f"publishers/google/models/{model_id}"

    def embeddings_batch(self, model_id: str) -> BatchLimit:
        return vertex_batch(model_id)

    def build_embeddings_request(self, call: UpstreamCall) -> HttpRequest:
        body = predict_body(call.body, self.name)
        headers = {**self.headers, **call.headers} if call.headers else self.headers
        url = f"{self.root}/{quote(self.model_path(call.model_id), safe='/@')}:predict"
        return HttpRequest(url, headers, orjson.dumps(body))

    def parse_embeddings_response(
        self, body: bytes, call: UpstreamCall, headers: Mapping[str, str]
    ) -> Completion:
        return predict_answer(body, call.body, call.model_id)

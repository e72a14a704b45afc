"""Azure OpenAI: OpenAI's body format at Azure's URLs, with Azure's credentials and errors.

`base_url` is the resource endpoint, `https://{resource}.openai.azure.com` (what the openai
SDK's `AzureOpenAI` calls `azure_endpoint`); Azure has no public default. `api_version` picks
the URL form:
- a dated version (`2024-10-21`, `2025-04-01-preview`): the deployment URLs,
  `{base_url}/openai/deployments/{deployment}/chat/completions?api-version={api_version}`;
- none: the v1 API, `{base_url}/openai/v1/chat/completions`, the deployment in the body's
  `model`; `preview` or `latest`: the same with that `api-version` (the v1 API's preview).
A model id is sent as the deployment `deployments:` maps it to, else as itself.

Credentials: the `api-key` header (`api_key_env`), or a Microsoft Entra ID access token as
`Authorization: Bearer` (`token_env`, or `token_file`, re-read when the file changes).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import orjson

from sidecar.errors import GatewayError, Outcome, UpstreamError, classify_http_failure
from sidecar.providers.base import Completion, HttpRequest, KindCaps, UpstreamCall, Usage
from sidecar.providers.openai_compat import (
    OpenAIStreamDecoder,
    bad_body,
    parse_embeddings,
    parse_error_envelope,
    retry_after_seconds,
)
from sidecar.providers.openai_responses import (
    ResponsesStreamDecoder,
    parse_response_object,
    responses_body,
)
from sidecar.settings.model import ProviderSettings
from sidecar.settings.watch import file_signature

log = logging.getLogger("ringside")

# as OpenAI: tools, vision, json_schema, json_object, usage, n, embeddings, the Responses API
AZURE_CAPS = KindCaps(embeddings=True, responses=True)
V1_PREVIEW_VERSIONS = frozenset({"preview", "latest"})
DATED_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(-preview)?")
TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # what an Authorization header carries as is
CREDENTIAL_FIELDS = ("api_key_env", "token_file", "token_env")
TOKEN_CHECK_SECONDS = 1.0


def settings_problems(settings: ProviderSettings) -> list[tuple[str, str]]:
    """(key, message) for what the JSON Schema cannot check about an azure provider; the key
    is "" for the provider as a whole."""
    problems: list[tuple[str, str]] = []
    if not settings.base_url:
        problems.append(
            ("", "azure has no public endpoint: set base_url to your resource's endpoint, "
                 "https://{resource}.openai.azure.com")
        )  # fmt: skip
    elif "/openai/" in urlsplit(settings.base_url).path.rstrip("/") + "/":
        problems.append(
            ("base_url", "is the resource endpoint alone (https://{resource}.openai.azure.com): "
                         "the sidecar appends /openai/deployments/… or /openai/v1/… itself")
        )  # fmt: skip
    version = settings.api_version
    if not (version is None or version in V1_PREVIEW_VERSIONS or DATED_VERSION.fullmatch(version)):
        problems.append(
            ("api_version", f"{version!r} is no Azure OpenAI API version: a dated one "
                            "(2024-10-21, 2025-04-01-preview) for the deployment URLs, "
                            "preview for the v1 API's preview, or none for the v1 API")
        )  # fmt: skip
    given = [name for name in CREDENTIAL_FIELDS if getattr(settings, name)]
    if len(given) > 1:
        problems.append(
            (given[1], f"azure takes one credential, and {' and '.join(given)} are set: "
                       "api_key_env for the api-key header, or token_file / token_env for a "
                       "Microsoft Entra ID bearer token")
        )  # fmt: skip
    headers = {name.lower() for name in settings.headers}
    if not given and not headers & {"api-key", "authorization"}:
        problems.append(
            ("", "azure needs a credential: api_key_env (the api-key header), or for Microsoft "
                 "Entra ID token_file or token_env (a bearer token)")
        )  # fmt: skip
    return problems


class TokenFile:
    """A bearer token kept in a file that something else rotates (a token agent writing an
    Entra ID access token; a mounted Secret swapped by the kubelet). The file's identity
    (inode, mtime, size) is looked at at most once a TOKEN_CHECK_SECONDS, on the request
    path (a stat), and the file re-read when it changed. A file that is missing, empty or
    holds something no header can carry keeps the previous token in use; the token itself is
    never logged."""

    __slots__ = ("_checked_at", "_clock", "_signature", "_warned", "path", "token")

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.token: str | None = None
        self._clock = clock
        self._signature: tuple[int, int, int] | None = None
        self._checked_at = -math.inf  # read at the first call, not at load
        self._warned = False

    def current(self) -> str | None:
        now = self._clock()
        if now - self._checked_at >= TOKEN_CHECK_SECONDS:
            self._checked_at = now
            self._refresh()
        return self.token

    def _refresh(self) -> None:
        signature = file_signature(self.path)
        if signature is not None and signature == self._signature:
            return
        problem = "is missing" if signature is None else ""
        if not problem:
            try:
                with open(self.path, encoding="utf-8") as file:
                    text = file.read(64 * 1024).strip()
            except (OSError, UnicodeDecodeError) as exc:
                problem = f"cannot be read ({type(exc).__name__})"
            else:
                if TOKEN_CHARS.fullmatch(text):
                    self.token, self._signature, self._warned = text, signature, False
                    return
                problem = "is empty" if not text else "holds characters a header cannot carry"
        if not self._warned:  # once until a good token is read again
            self._warned = True
            kept = "the previous token stays in use" if self.token else "calls go without one"
            log.warning("token_file %s %s: %s", self.path, problem, kept)


class AzureAdapter:
    """Adapter for the `azure` kind; built once per configured provider."""

    def __init__(self, settings: ProviderSettings) -> None:
        self.caps = AZURE_CAPS
        self.native_json_schema = (
            AZURE_CAPS.json_schema
            if settings.native_json_schema is None
            else settings.native_json_schema
        )
        self.json_mode = AZURE_CAPS.json_object
        self.deployments = settings.deployments
        endpoint = (settings.base_url or "").rstrip("/")
        version = settings.api_version
        self.v1_url: str | None = None
        self.v1_embeddings_url: str | None = None
        self._prefix = self._suffix = self._embeddings_suffix = ""
        # where OpenAI's own paths are (`/v1/<rest>` → `{api_base}/<rest>?{api_query}`)
        if version is None or version in V1_PREVIEW_VERSIONS:
            self.api_base, self.api_query = (
                f"{endpoint}/openai/v1",
                (f"api-version={version}" if version else ""),
            )
        else:
            self.api_base, self.api_query = f"{endpoint}/openai", f"api-version={version}"
        if version is None or version in V1_PREVIEW_VERSIONS:
            query = f"?api-version={version}" if version else ""
            self.v1_url = f"{endpoint}/openai/v1/chat/completions{query}"
            self.v1_embeddings_url = f"{endpoint}/openai/v1/embeddings{query}"
            self.responses_url = f"{endpoint}/openai/v1/responses{query}"
        else:
            self._prefix = f"{endpoint}/openai/deployments/"
            self._suffix = f"/chat/completions?api-version={version}"
            self._embeddings_suffix = f"/embeddings?api-version={version}"
            # the Responses API has no deployment URL: the deployment goes in `model`
            self.responses_url = f"{endpoint}/openai/responses?api-version={version}"
        self._urls = {name: self._deployment_url(name) for name in self.deployments.values()}
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if settings.api_key:
            headers["api-key"] = settings.api_key
        elif settings.token:
            headers["Authorization"] = "Bearer " + settings.token
        headers.update(settings.headers)
        self.headers = headers
        self.token_file = TokenFile(settings.token_file) if settings.token_file else None
        self._token_headers: tuple[str | None, dict[str, str]] = (None, headers)

    def _deployment_url(self, deployment: str) -> str:
        return self._prefix + quote(deployment, safe="") + self._suffix

    def auth_headers(self) -> dict[str, str]:
        """The provider's headers with the token file's current token; one dict per token
        (the HTTP client builds a request head once per headers dict)."""
        if self.token_file is None:
            return self.headers
        token = self.token_file.current()
        held, headers = self._token_headers
        if token != held:
            headers = self.headers
            if token:
                headers = {**self.headers, "Authorization": f"Bearer {token}"}
            self._token_headers = (token, headers)
        return headers

    def build_request(self, call: UpstreamCall) -> HttpRequest:
        deployment = self.deployments.get(call.model_id, call.model_id)
        body: dict[str, Any] = dict(call.body)
        body["model"] = deployment
        if call.stream:
            body["stream"] = True
            options = body.get("stream_options")
            body["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
        url = self.v1_url or self._urls.get(deployment) or self._deployment_url(deployment)
        headers = self.auth_headers()
        if call.headers:
            headers = {**headers, **call.headers}
        return HttpRequest(url, headers, orjson.dumps(body))

    def build_embeddings_request(self, call: UpstreamCall) -> HttpRequest:
        """`/openai/deployments/{deployment}/embeddings?api-version=…`, or the v1 API's
        `/openai/v1/embeddings` with the deployment as `model`; base64 as the client asks."""
        deployment = self.deployments.get(call.model_id, call.model_id)
        body: dict[str, Any] = dict(call.body)
        body["model"] = deployment
        url = self.v1_embeddings_url or (
            self._prefix + quote(deployment, safe="") + self._embeddings_suffix
        )
        headers = self.auth_headers()
        if call.headers:
            headers = {**headers, **call.headers}
        return HttpRequest(url, headers, orjson.dumps(body))

    def parse_embeddings_response(
        self, body: bytes, call: UpstreamCall, headers: Mapping[str, str]
    ) -> Completion:
        return parse_embeddings(body)

    def build_responses_request(self, call: UpstreamCall) -> HttpRequest:
        """`/openai/v1/responses` (the v1 API), or `/openai/responses?api-version=…` (a dated
        version), the deployment as `model` (caps.responses)."""
        deployment = self.deployments.get(call.model_id, call.model_id)
        headers = self.auth_headers()
        if call.headers:
            headers = {**headers, **call.headers}
        return HttpRequest(self.responses_url, headers, responses_body(call, deployment))

    def parse_responses_response(self, body: bytes, call: UpstreamCall) -> Completion:
        return parse_response_object(body)

    def responses_stream_decoder(self, call: UpstreamCall) -> ResponsesStreamDecoder:
        return ResponsesStreamDecoder()

    def parse_response(self, body: bytes, call: UpstreamCall) -> Completion:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise bad_body("not JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise bad_body("no choices")
        return Completion(data, Usage.from_openai(data.get("usage")), raw=body)

    def classify_error(self, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
        message, code, error_type, param = parse_error_envelope(body)
        if code == "content_filter" and 400 <= status < 500:
            return content_filtered(status, message, body)
        return classify_http_failure(
            status,
            message,
            code=code,
            error_type=error_type,
            param=param,
            retry_after=azure_retry_after(headers),
        )

    def stream_decoder(self, call: UpstreamCall) -> AzureStreamDecoder:
        options = call.body.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        return AzureStreamDecoder(wants_usage, call.keep_content)


def azure_retry_after(headers: Mapping[str, str]) -> float | None:
    """Azure's `retry-after-ms` (milliseconds, the finer one), else `Retry-After` (seconds)."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    return retry_after_seconds(headers)


def content_filtered(status: int, message: str, body: bytes) -> UpstreamError:
    """Azure's content filter refused the prompt: the request's fault, answered at once as a
    `400 content_filter` in the OpenAI envelope (another provider is not tried: a cascade is no
    way around the operator's content policy). The message names the filtered categories."""
    categories = filtered_categories(body)
    named = f" (filtered: {', '.join(categories)})" if categories else ""
    text = f"the provider's content filter refused the prompt{named}: {message}"
    client_error = GatewayError(
        400, "content_filter", text, param="messages", error_type="invalid_request_error"
    )
    return UpstreamError(
        Outcome.CLIENT_FAULT, text, status=status, reason="content_filter",
        client_error=client_error,
    )  # fmt: skip


def filtered_categories(body: bytes) -> list[str]:
    """`hate (medium)`, … from `error.innererror.content_filter_result`: the categories whose
    `filtered` is true, with their severity where given."""
    try:
        data = orjson.loads(body)
        result = data["error"]["innererror"]["content_filter_result"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return []
    if not isinstance(result, dict):
        return []
    found = []
    for name, verdict in result.items():
        if isinstance(verdict, dict) and verdict.get("filtered") is True:
            severity = verdict.get("severity")
            found.append(f"{name} ({severity})" if isinstance(severity, str) else str(name))
    return found


class AzureStreamDecoder(OpenAIStreamDecoder):
    """OpenAI's chunks pass through; Azure's annotation-only events do not. Azure sends the
    prompt's filter results as a chunk of its own (`choices: []`, `prompt_filter_results`)
    and, with asynchronous filtering, choices holding only `content_filter_offsets` /
    `content_filter_results`; both come with `id: ""` and `object: ""`, which no
    `chat.completion.chunk` has, and carry no delta or usage: the client does not see them."""

    __slots__ = ()

    def feed(self, event: str | None, data: bytes) -> list[bytes]:
        if b'"delta"' not in data and data != b"[DONE]":  # content chunks: parsed once
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise bad_body("a stream event is not JSON") from None
            if isinstance(chunk, dict) and annotation_only(chunk):
                return []
        return super().feed(event, data)


def annotation_only(chunk: dict[str, Any]) -> bool:
    if chunk.get("usage") or "error" in chunk:
        return False
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return False
    return all(isinstance(choice, dict) and "delta" not in choice for choice in choices)

"""A fake Google OAuth 2.0 token endpoint, and service-account key files that point at it; a
fake metadata server (GKE workload identity, any Google Cloud runtime).

A key file made by `service_account_file` is the JSON Google issues for a service account (a
fresh RSA key from `cryptography`), its `token_uri` this fake's `/token`: google-auth reads
the endpoint from the file, so application default credentials (GOOGLE_APPLICATION_CREDENTIALS)
fetch their access tokens here. Each request is checked as Google's endpoint does: the JWT
bearer grant, the assertion signed by the key file's key for its service account, its audience
Google's token endpoint, the scope asked for. Each token issued is added to the `tokens` set a
fake Vertex server accepts; its lifetime is the next of `script_lifetimes(...)`, else `lifetime`.

`FakeMetadataServer` answers what google-auth asks the metadata server when no key file is
configured (GCE_METADATA_HOST / GCE_METADATA_IP point it here): the ping, the project id, the
default service account and its access token, each only with `Metadata-Flavor: Google`.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.upstreams.server import ThreadedServer

GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
EMAIL = "ringside-test@test-project.iam.gserviceaccount.com"
# the audience of every grant assertion, whichever token_uri the key file names (google-auth)
AUDIENCE = "https://oauth2.googleapis.com/token"


@dataclass
class TokenRequest:
    claims: dict[str, Any]
    problems: list[str]


class FakeTokenEndpoint:
    def __init__(self, tokens: set[str], lifetime: int = 3600) -> None:
        self.tokens = tokens  # shared with the fake Vertex server: what it accepts
        self.lifetime = lifetime
        self.public_key: Any = None  # of the key file the assertions must be signed with
        self.status = 200  # anything else: the endpoint fails
        self._lock = threading.Lock()
        self._lifetimes: deque[int] = deque()
        self.requests: list[TokenRequest] = []
        self.issued: list[str] = []
        self.server = ThreadedServer(self._app)

    @property
    def token_uri(self) -> str:
        return f"{self.server.url}/token"

    def script_lifetimes(self, *seconds: int) -> None:
        with self._lock:
            self._lifetimes.extend(seconds)

    def problems(self) -> list[str]:
        with self._lock:
            return [p for r in self.requests for p in r.problems]

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self._token)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        problems: list[str] = []
        claims: dict[str, Any] = {}
        if form.get("grant_type") != GRANT:
            problems.append(f"grant_type {form.get('grant_type')!r}")
        try:
            claims = jwt.decode(
                str(form.get("assertion", "")), self.public_key, algorithms=["RS256"],
                audience=AUDIENCE, issuer=EMAIL,
            )  # fmt: skip
        except jwt.PyJWTError as exc:
            problems.append(f"assertion: {exc}")
        if "https://www.googleapis.com/auth/cloud-platform" not in claims.get("scope", ""):
            problems.append(f"scope {claims.get('scope')!r}")
        with self._lock:
            self.requests.append(TokenRequest(claims, problems))
            lifetime = self._lifetimes.popleft() if self._lifetimes else self.lifetime
            token = f"ya29.fake-token-{len(self.requests)}"
        if problems or self.status != 200:
            error = {"error": "invalid_grant", "error_description": "; ".join(problems) or "down"}
            return web.json_response(error, status=400 if problems else self.status)
        self.tokens.add(token)
        with self._lock:
            self.issued.append(token)
        return web.json_response(
            {"access_token": token, "expires_in": lifetime, "token_type": "Bearer"}
        )


def service_account_file(directory: Path, endpoint: FakeTokenEndpoint) -> Path:
    """A service-account key file whose token_uri is `endpoint`, its key new (and the
    endpoint told the public half)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    endpoint.public_key = key.public_key()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "test-project",
        "private_key_id": "0123456789abcdef",
        "private_key": pem,
        "client_email": EMAIL,
        "client_id": "100000000000000000001",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": endpoint.token_uri,
    }
    path = directory / "service-account.json"
    path.write_text(json.dumps(info))
    return path


class FakeMetadataServer:
    """The metadata server of a Google Cloud runtime (on GKE: the workload identity one)."""

    ROOT = "/computeMetadata/v1/"

    def __init__(self, tokens: set[str], lifetime: int = 3600) -> None:
        self.tokens = tokens
        self.lifetime = lifetime
        self.paths: list[str] = []
        self.problems: list[str] = []
        self.token_scopes: list[str] = []
        self.issued: list[str] = []
        self.server = ThreadedServer(self._app)

    @property
    def host(self) -> str:
        """What GCE_METADATA_HOST and GCE_METADATA_IP name."""
        return self.server.url.removeprefix("http://")

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{path:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
        flavor = {"Metadata-Flavor": "Google"}
        if request.headers.get("Metadata-Flavor") != "Google":
            self.problems.append(f"{request.path} without Metadata-Flavor: Google")
            return web.Response(status=403, text="Missing Metadata-Flavor:Google header.")
        path = request.path.removeprefix(self.ROOT)
        if request.path in ("", "/"):
            return web.Response(text="", headers=flavor)  # the ping
        if path == "project/project-id":
            return web.Response(text="test-project", headers=flavor)
        if path == "universe/universe-domain":
            return web.Response(text="googleapis.com", headers=flavor)
        if path == "instance/service-accounts/default/":
            info = {"email": EMAIL, "aliases": ["default"],
                    "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}  # fmt: skip
            return web.json_response(info, headers=flavor)
        if path == "instance/service-accounts/default/token":
            self.token_scopes.append(request.query.get("scopes", ""))
            token = f"ya29.metadata-token-{len(self.issued) + 1}"
            self.tokens.add(token)
            self.issued.append(token)
            answer = {"access_token": token, "expires_in": self.lifetime, "token_type": "Bearer"}
            return web.json_response(answer, headers=flavor)
        return web.Response(status=404, text="not found", headers=flavor)

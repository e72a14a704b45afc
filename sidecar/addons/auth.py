"""Who is calling: API keys (SHA-256 hashes in config, constant-time check), FC-Customer,
and the model refs a key may use. Open mode (no keys) is allowed only on loopback."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Mapping
from fnmatch import fnmatchcase

from sidecar.errors import GatewayError
from sidecar.flow import Flow, Principal
from sidecar.settings.model import KeySettings, Settings

CUSTOMER_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def unauthorized(message: str) -> GatewayError:
    return GatewayError(
        401, "invalid_api_key", message, headers={"WWW-Authenticate": 'Bearer realm="ringside"'}
    )


def customer_from_header(headers: Mapping[str, str]) -> str | None:
    value = headers.get("FC-Customer")
    if value is None:
        return None
    if not CUSTOMER_PATTERN.match(value):
        raise GatewayError(
            400,
            "invalid_request",
            "header FC-Customer must be 1-128 characters of A-Z a-z 0-9 _ . : -",
            param="FC-Customer",
        )
    return value


class Auth:
    def __init__(self, settings: Settings) -> None:
        self.keys = settings.keys
        self.open_mode = settings.open_mode

    def find_key(self, secret: str) -> KeySettings | None:
        """Compare the digest with every configured hash, without an early exit."""
        digest = hashlib.sha256(secret.encode()).digest()
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.sha256, digest):
                found = key
        return found

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        """The caller of a request, or 401; in open mode everyone is anonymous."""
        customer = customer_from_header(headers)
        if self.open_mode:
            return Principal(customer=customer)
        header = headers.get("Authorization")
        if not header:
            raise unauthorized("missing Authorization header: send 'Authorization: Bearer <key>'")
        scheme, _, credential = header.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise unauthorized("Authorization must be 'Bearer <key>'")
        key = self.find_key(credential)
        if key is None:
            raise unauthorized("the API key is not known to this gateway")
        if key.revoked:
            raise unauthorized(f"API key {key.id!r} has been revoked")
        if key.expires_at is not None and key.expires_at <= time.time():
            raise unauthorized(f"API key {key.id!r} has expired")
        return Principal(
            key_id=key.id, developer=key.developer, customer=customer, allowed=key.allowed
        )

    def request(self, flow: Flow) -> None:
        flow.principal = self.authenticate(flow.headers)

    def routed(self, flow: Flow) -> None:
        allowed = flow.principal.allowed
        if not allowed or flow.route is None:
            return
        model = flow.body.get("model")
        requested = [model] if isinstance(model, str) else list(model or [])

        def permitted(ref: str) -> bool:
            return any(fnmatchcase(ref, pattern) for pattern in allowed)

        if all(permitted(ref) for ref in requested):
            return
        denied = [c.ref for c in flow.route.candidates if not permitted(c.ref)]
        if denied:
            raise GatewayError(
                403,
                "model_not_allowed",
                f"this key may not use {', '.join(denied)}; allowed: {', '.join(allowed)}",
                param="model",
            )

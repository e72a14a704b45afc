"""Client tokens (SPEC 4): short-lived HS256 JWTs for browsers and mobile apps.

An API key mints them (`POST /v1/client_tokens`, or `ringside token mint` with the same secret);
each is bound to that key (`sub`), a customer, and optionally to allowed refs, an `Origin` and
a client IP. Claims: `iss` "ringside", `sub`, `customer`, `iat`, `exp`, `jti`, and when bound
`allowed_models`, `origin`, `client_ip`. What a caller can rely on:
  - a token verifies only with the secret it was signed with, alg HS256, issuer "ringside";
  - its lifetime (`exp - iat`) is at most `tokens.max_ttl` of the verifying gateway;
  - a verified token is cached by its exact text (a browser sends the same one many times),
    so PyJWT runs once per token and process; expiry, revocation of its key, Origin and IP
    are still checked on every request by the caller of `verify` (see addons/auth.py).
"""

from __future__ import annotations

import ipaddress
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlsplit

from sidecar.errors import GatewayError, invalid_request
from sidecar.flow import CUSTOMER_PATTERN
from sidecar.settings.model import KeySettings, TokenSettings

ISSUER = "ringside"
ALGORITHM = "HS256"
CACHE_SIZE = 10_000  # verified tokens kept per gateway config; cleared whole when full
MAX_ALLOWED_MODELS = 64
GRANT_FIELDS = frozenset({"customer", "allowed_models", "origin", "client_ip", "ttl_seconds"})
_REQUIRED_CLAIMS = ["iss", "sub", "customer", "iat", "exp"]
CLOCK_SKEW = 30  # seconds a minting replica's clock may be ahead of the verifying one
_DEFAULT_PORTS = {"http": 80, "https": 443}

# what a browser script may read of an answer (CORS): the gateway's own headers
EXPOSED_HEADERS = ", ".join(
    (
        "X-Request-Id",
        "X-Ringside-Model-Used",
        "X-Ringside-Models-Tried",
        "X-Ringside-Fallback-Triggered",
        "X-Ringside-Cost-USD",
        "X-Ringside-Budget-Remaining-USD",
        "X-Ringside-Schema-Reprompts",
        "X-Ringside-RateLimit-Scope",
        "Retry-After",
        "retry-after-ms",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
        "Idempotent-Replayed",
    )
)


def cors_headers(origin: str) -> dict[str, str]:
    """Headers that let a page of `origin` read an answer (no credentials: tokens are headers)."""
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Expose-Headers": EXPOSED_HEADERS,
        "Vary": "Origin",
    }


class TokenError(Exception):
    """Why a client token was refused (answered as 401 invalid_api_key).

    `origin` is the token's bound Origin when its signature did verify (an expired token, say),
    so that the 401 itself can be readable by the page the token was made for."""

    def __init__(self, message: str, origin: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.origin = origin


@dataclass(frozen=True, slots=True)
class TokenClaims:
    key_id: str
    customer: str
    issued_at: int
    expires_at: int
    allowed_models: tuple[str, ...] = ()
    origin: str | None = None
    client_ip: str | None = None


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What a mint request asks for, validated against the minting key and the settings."""

    key_id: str
    customer: str
    ttl: int
    allowed_models: tuple[str, ...] = ()
    origin: str | None = None
    client_ip: str | None = None


def looks_like_jwt(credential: str) -> bool:
    return credential.startswith("eyJ") and credential.count(".") == 2


def normalize_origin(text: str) -> str | None:
    """`scheme://host[:port]` in the form browsers send in `Origin`, or None when not one."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname
    if (
        parts.scheme not in _DEFAULT_PORTS
        or not host
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS[parts.scheme]:
        return f"{parts.scheme}://{host}:{port}"
    return f"{parts.scheme}://{host}"


def normalize_ip(text: str) -> str | None:
    """The canonical text of an IP address (IPv4-mapped IPv6 as IPv4), or None when not one."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def same_ip(client_ip: str, bound: str) -> bool:
    return client_ip == bound or normalize_ip(client_ip) == bound


def grant_from_request(
    body: Mapping[str, Any],
    key: KeySettings,
    settings: TokenSettings,
    header_customer: str | None = None,
) -> TokenGrant:
    """Validate a mint request (the endpoint's JSON body, or the CLI's options).

    Unknown fields are refused rather than ignored: a misspelt `origin` must not silently
    mint an unbound token. A key with allowed refs can only mint tokens within them."""

    for name in body:
        if name not in GRANT_FIELDS:
            raise invalid_request(
                f"unknown field {name!r}; expected: {', '.join(sorted(GRANT_FIELDS))}", name
            )
    customer = body.get("customer", header_customer)
    if not isinstance(customer, str) or not CUSTOMER_PATTERN.match(customer):
        raise invalid_request(
            "customer is required: 1-128 characters of A-Z a-z 0-9 _ . : -", "customer"
        )
    ttl = body.get("ttl_seconds", settings.default_ttl)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= settings.max_ttl:
        raise invalid_request(
            f"ttl_seconds must be an integer between 1 and {settings.max_ttl} (tokens.max_ttl)",
            "ttl_seconds",
        )
    allowed = body.get("allowed_models")
    models: tuple[str, ...] = ()
    if allowed is not None:
        if (
            not isinstance(allowed, list)
            or not allowed
            or len(allowed) > MAX_ALLOWED_MODELS
            or not all(isinstance(ref, str) and 0 < len(ref) <= 256 for ref in allowed)
        ):
            raise invalid_request(
                f"allowed_models must be a non-empty array of up to {MAX_ALLOWED_MODELS} "
                "model refs or globs (e.g. fc:openai/gpt-4o-mini, slot:chat, fc:openai/*)",
                "allowed_models",
            )
        models = tuple(allowed)
        if key.allowed:
            outside = [ref for ref in models if not any(fnmatchcase(ref, p) for p in key.allowed)]
            if outside:
                raise GatewayError(
                    403,
                    "model_not_allowed",
                    f"key {key.id!r} may not use {', '.join(outside)}, so it cannot grant "
                    f"them; allowed: {', '.join(key.allowed)}",
                    param="allowed_models",
                )
    elif key.allowed:
        models = key.allowed
    origin = body.get("origin")
    if origin is not None:
        origin = normalize_origin(origin) if isinstance(origin, str) else None
        if origin is None:
            raise invalid_request(
                "origin must be a web origin: scheme://host[:port], e.g. https://app.example.com",
                "origin",
            )
    client_ip = body.get("client_ip")
    if client_ip is not None:
        client_ip = normalize_ip(client_ip) if isinstance(client_ip, str) else None
        if client_ip is None:
            raise invalid_request("client_ip must be an IPv4 or IPv6 address", "client_ip")
    return TokenGrant(key.id, customer, ttl, models, origin, client_ip)


class ClientTokens:
    """Mints and verifies client tokens with one secret; built once per config load."""

    def __init__(self, settings: TokenSettings) -> None:
        assert settings.secret is not None, "client tokens need a secret"
        import jwt  # only a config with client tokens needs PyJWT (≈2 ms of startup)

        self._jwt = jwt
        self._secret = settings.secret
        self.default_ttl = settings.default_ttl
        self.max_ttl = settings.max_ttl
        self._verified: dict[str, TokenClaims] = {}

    def mint(self, grant: TokenGrant, now: float | None = None) -> tuple[str, TokenClaims]:
        issued = int(time.time() if now is None else now)
        claims = TokenClaims(
            key_id=grant.key_id,
            customer=grant.customer,
            issued_at=issued,
            expires_at=issued + grant.ttl,
            allowed_models=grant.allowed_models,
            origin=grant.origin,
            client_ip=grant.client_ip,
        )
        payload: dict[str, Any] = {
            "iss": ISSUER,
            "sub": claims.key_id,
            "customer": claims.customer,
            "iat": claims.issued_at,
            "exp": claims.expires_at,
            "jti": secrets.token_urlsafe(12),
        }
        if claims.allowed_models:
            payload["allowed_models"] = list(claims.allowed_models)
        if claims.origin is not None:
            payload["origin"] = claims.origin
        if claims.client_ip is not None:
            payload["client_ip"] = claims.client_ip
        return self._jwt.encode(payload, self._secret, algorithm=ALGORITHM), claims

    def verify(self, token: str, now: float) -> TokenClaims:
        """The claims of a genuine, unexpired token; TokenError says what is wrong otherwise."""
        claims = self._verified.get(token)
        if claims is None:
            claims = self._decode(token)
            if len(self._verified) >= CACHE_SIZE:
                self._verified.clear()
            self._verified[token] = claims
        if claims.issued_at > now + CLOCK_SKEW:  # would outlive max_ttl by the skew
            self._verified.pop(token, None)
            raise TokenError(
                "the client token was issued in the future (its iat is ahead of this gateway's "
                "clock): check the minting gateway's clock",
                origin=claims.origin,
            )
        if claims.expires_at <= now:
            self._verified.pop(token, None)
            expired = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(claims.expires_at))
            raise TokenError(
                f"the client token expired at {expired}: mint a new one", origin=claims.origin
            )
        return claims

    def _decode(self, token: str) -> TokenClaims:
        jwt = self._jwt
        try:
            payload = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                options={
                    "require": _REQUIRED_CLAIMS,
                    "verify_exp": False,  # checked by `verify` on every use, cached or not
                    "verify_iat": False,  # checked by `verify`, with CLOCK_SKEW
                },
                leeway=CLOCK_SKEW,  # replicas' clocks may differ by a little
            )
        except jwt.ImmatureSignatureError:
            raise TokenError(
                "the client token is not valid yet (its nbf is in the future): check the "
                "minting gateway's clock"
            ) from None
        except jwt.InvalidSignatureError:
            raise TokenError(
                "the client token's signature does not verify (altered, or signed with "
                "another secret)"
            ) from None
        except (jwt.InvalidIssuerError, jwt.MissingRequiredClaimError):
            raise TokenError("not a Ringside client token") from None
        except jwt.InvalidTokenError:
            raise TokenError("the client token is malformed") from None
        claims = _claims(payload)
        if claims is None:
            raise TokenError("the client token's claims are malformed")
        if claims.expires_at - claims.issued_at > self.max_ttl:
            raise TokenError(
                f"the client token lives longer than this gateway allows ({self.max_ttl}s)"
            )
        return claims


def _claims(payload: Mapping[str, Any]) -> TokenClaims | None:
    sub, customer = payload.get("sub"), payload.get("customer")
    iat, exp = payload.get("iat"), payload.get("exp")
    models = payload.get("allowed_models", [])
    origin, client_ip = payload.get("origin"), payload.get("client_ip")
    if (
        not isinstance(sub, str)
        or not isinstance(customer, str)
        or not isinstance(iat, int)
        or not isinstance(exp, int)
        or not isinstance(models, list)
        or not all(isinstance(ref, str) for ref in models)
        or not isinstance(origin, str | None)
        or not isinstance(client_ip, str | None)
    ):
        return None
    return TokenClaims(sub, customer, iat, exp, tuple(models), origin, client_ip)


def token_answer(token: str, claims: TokenClaims) -> dict[str, Any]:
    """What `POST /v1/client_tokens` (and `ringside token mint --json`) answers."""
    return {
        "object": "client_token",
        "token": token,
        "expires_at": claims.expires_at,
        "expires_in": claims.expires_at - claims.issued_at,
        "key_id": claims.key_id,
        "customer": claims.customer,
        "allowed_models": list(claims.allowed_models) or None,
        "origin": claims.origin,
        "client_ip": claims.client_ip,
    }

"""Who is calling: API keys (SHA-256 hashes in config, constant-time check), client tokens,
FC-Customer, the client IP (X-Forwarded-For believed only from `trusted_proxies`), and the
model refs a key or token may use. Open mode (no keys) is allowed only on loopback."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase

from sidecar.client_tokens import (
    ClientTokens,
    TokenError,
    cors_headers,
    looks_like_jwt,
    normalize_ip,
    same_ip,
)
from sidecar.errors import GatewayError
from sidecar.flow import CUSTOMER_PATTERN, Flow, Principal
from sidecar.settings.model import KeySettings, Settings

_PROXY_CACHE_SIZE = 4096

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def unauthorized(message: str, headers: Mapping[str, str] | None = None) -> GatewayError:
    return GatewayError(
        401,
        "invalid_api_key",
        message,
        headers={"WWW-Authenticate": 'Bearer realm="ringside"', **(headers or {})},
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


def matching_origin(request_origin: str | None, bound: str | None) -> str | None:
    """The request's `Origin` when it is the one a token is bound to (browsers send it in the
    normalized form, lower case, default port omitted)."""
    if bound is None or request_origin is None or request_origin.lower() != bound:
        return None
    return request_origin


def permitted(ref: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(ref, pattern) for pattern in patterns)


class TrustedProxies:
    """The client's address: the peer, or, when the peer is a trusted proxy, the right-most
    `X-Forwarded-For` entry that is not itself a trusted proxy (entries further left were
    written by the client and are never believed)."""

    def __init__(self, cidrs: Sequence[str]) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in cidrs
        )
        self._trusted: dict[str, bool] = {}

    def trusted(self, address: str) -> bool:
        found = self._trusted.get(address)
        if found is None:
            ip = normalize_ip(address)
            parsed = ipaddress.ip_address(ip) if ip is not None else None
            found = parsed is not None and any(parsed in net for net in self.networks)
            if len(self._trusted) >= _PROXY_CACHE_SIZE:
                self._trusted.clear()
            self._trusted[address] = found
        return found

    def client_ip(self, peer: str, headers: Mapping[str, str]) -> str:
        if not self.networks or not self.trusted(peer):
            return peer
        getall = getattr(headers, "getall", None)
        values = getall("X-Forwarded-For", []) if getall else [headers.get("X-Forwarded-For")]
        hops = [hop.strip() for value in values if value for hop in value.split(",")]
        client = peer
        for hop in reversed(hops):
            address = normalize_ip(_strip_port(hop))
            if address is None:
                break  # garbage: keep the last address a trusted hop vouched for
            client = address
            if not self.trusted(address):
                break
        return client


def _strip_port(hop: str) -> str:
    """`1.2.3.4:5678` and `[2001:db8::1]:443` as some proxies write them → the address."""
    if hop.startswith("["):
        return hop[1 : hop.find("]")] if "]" in hop else hop
    if hop.count(":") == 1:
        return hop.partition(":")[0]
    return hop


class Auth:
    def __init__(self, settings: Settings) -> None:
        self.keys = settings.keys
        self.keys_by_id = {key.id: key for key in settings.keys}
        self.open_mode = settings.open_mode
        self.tokens = ClientTokens(settings.tokens) if settings.tokens.secret else None
        self.proxies = TrustedProxies(settings.trusted_proxies)

    def find_key(self, secret: str) -> KeySettings | None:
        """Compare the digest with every configured hash, without an early exit."""
        digest = hashlib.sha256(secret.encode()).digest()
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.sha256, digest):
                found = key
        return found

    @staticmethod
    def key_problem(key: KeySettings, now: float) -> str | None:
        if key.revoked:
            return f"API key {key.id!r} has been revoked"
        if key.expires_at is not None and key.expires_at <= now:
            return f"API key {key.id!r} has expired"
        return None

    @staticmethod
    def credential(headers: Mapping[str, str]) -> tuple[str, str]:
        """(scheme in lower case, credential) of the Authorization header, or 401."""
        header = headers.get("Authorization")
        if not header:
            raise unauthorized("missing Authorization header: send 'Authorization: Bearer <key>'")
        scheme, _, credential = header.strip().partition(" ")
        credential = credential.strip()
        scheme = scheme.lower()
        if scheme not in ("bearer", "client") or not credential:
            raise unauthorized(
                "Authorization must be 'Bearer <API key or client token>' or 'Client <token>'"
            )
        return scheme, credential

    def api_key(self, headers: Mapping[str, str]) -> KeySettings:
        """The valid API key of a request that must be made with one (not a client token)."""
        if self.open_mode:
            raise unauthorized(
                "this gateway has no keys (open mode): client tokens are bound to an API key, "
                "so configure keys to mint them"
            )
        scheme, credential = self.credential(headers)
        key = self.find_key(credential) if scheme == "bearer" else None
        if key is None:
            if scheme == "client" or looks_like_jwt(credential):
                raise unauthorized("a client token cannot do this: send an API key")
            raise unauthorized("the API key is not known to this gateway")
        problem = self.key_problem(key, time.time())
        if problem is not None:
            raise unauthorized(problem)
        return key

    def authenticate(self, headers: Mapping[str, str], client_ip: str = "") -> Principal:
        """The caller of a request, or 401; in open mode everyone is anonymous."""
        if self.open_mode:
            return Principal(customer=customer_from_header(headers))
        scheme, credential = self.credential(headers)
        if scheme == "bearer":
            key = self.find_key(credential)
            if key is not None:
                problem = self.key_problem(key, time.time())
                if problem is not None:
                    raise unauthorized(problem)
                return Principal(
                    key_id=key.id,
                    developer=key.developer,
                    customer=customer_from_header(headers),
                    allowed=key.allowed,
                )
            if self.tokens is None or not looks_like_jwt(credential):
                raise unauthorized("the API key is not known to this gateway")
        elif self.tokens is None:
            raise unauthorized("client tokens are not enabled on this gateway")
        return self.token_principal(credential, headers, client_ip)

    def token_principal(self, token: str, headers: Mapping[str, str], client_ip: str) -> Principal:
        """A client token's caller: its key (which must still be valid), its customer (which
        wins over FC-Customer), its refs, and the Origin and IP it is bound to."""
        assert self.tokens is not None
        request_origin = headers.get("Origin")
        now = time.time()
        try:
            claims = self.tokens.verify(token, now)
        except TokenError as exc:
            # a genuine token (expired, say) used by its own page gets a 401 the page can read
            origin = matching_origin(request_origin, exc.origin)
            raise unauthorized(exc.message, cors_headers(origin) if origin else None) from None
        origin = matching_origin(request_origin, claims.origin)
        cors = cors_headers(origin) if origin else None
        key = self.keys_by_id.get(claims.key_id)
        if key is None:
            raise unauthorized(
                f"the API key {claims.key_id!r} this client token was minted with is no longer "
                "configured",
                cors,
            )
        problem = self.key_problem(key, now)
        if problem is not None:
            raise unauthorized(f"this client token's {problem}", cors)
        if claims.origin is not None and origin is None:
            raise unauthorized(
                f"this client token is bound to origin {claims.origin}; the request came from "
                f"{request_origin or 'no origin'}"
            )
        if claims.client_ip is not None and not same_ip(client_ip, claims.client_ip):
            raise unauthorized(
                f"this client token is bound to IP {claims.client_ip}; the request came from "
                f"{client_ip or 'an unknown address'}",
                cors,
            )
        return Principal(
            key_id=key.id,
            developer=key.developer,
            customer=claims.customer,
            allowed=key.allowed,
            token_allowed=claims.allowed_models,
            origin=origin,
        )

    def headers(self, flow: Flow) -> None:
        """Before the body is read: an unauthenticated caller cannot make us buffer it."""
        flow.client_ip = self.proxies.client_ip(flow.client_ip, flow.headers)
        flow.principal = self.authenticate(flow.headers, flow.client_ip)
        if flow.principal.origin is not None:
            flow.extra_headers.update(cors_headers(flow.principal.origin))

    def routed(self, flow: Flow) -> None:
        principal = flow.principal
        if flow.route is None or not (principal.allowed or principal.token_allowed):
            return
        model = flow.body.get("model")
        requested = [model] if isinstance(model, str) else list(model or [])
        for patterns, holder in (
            (principal.allowed, "key"),
            (principal.token_allowed, "client token"),
        ):
            if not patterns or all(permitted(ref, patterns) for ref in requested):
                continue
            denied = [c.ref for c in flow.route.candidates if not permitted(c.ref, patterns)]
            if denied:
                raise GatewayError(
                    403,
                    "model_not_allowed",
                    f"this {holder} may not use {', '.join(denied)}; allowed: "
                    f"{', '.join(patterns)}",
                    param="model",
                )

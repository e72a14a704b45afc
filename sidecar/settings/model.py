"""The validated configuration as frozen dataclasses: built once per load, never per request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Listen:
    api: HostPort = HostPort("127.0.0.1", 8787)
    admin: HostPort = HostPort("0.0.0.0", 8788)


@dataclass(frozen=True, slots=True)
class Storage:
    backend: str = "sqlite"
    sqlite_path: str = "./ringside.db"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_max_connections: int = 64  # per process: a burst waits for one (stores/redis_pool.py)
    fail_open: bool = False
    journal_path: str = "./ringside-journal.db"
    reservation_ttl: float = 600.0  # seconds a budget hold lives unless settled (crash safety)
    usage_retention_days: float = 90.0  # usage records older than this are deleted


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 5.0
    read: float = 60.0
    total: float | None = None
    pool: float | None = None  # waiting for a free connection (max_connections); None: connect


@dataclass(frozen=True, slots=True)
class ProviderTls:
    """A provider's own CA bundle and client certificate; `context` is built at load."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    context: Any = field(default=None, compare=False, repr=False)  # ssl.SSLContext
    files_key: tuple[object, ...] = ()  # the files and their mtimes: names `context`


@dataclass(frozen=True, slots=True)
class Price:
    input_per_mtok: float
    output_per_mtok: float

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok
        ) / 1e6


@dataclass(frozen=True, slots=True)
class Circuit:
    failures: int = 5
    cooldown: float = 30.0


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    name: str
    kind: str
    base_url: str | None
    api_key_env: str | None
    api_key: str | None = field(default=None, repr=False)  # the secret itself: never logged
    timeout: Timeouts = Timeouts()
    retries: int = 0
    retry_backoff: float = 0.25
    retry_after_cap: float = 10.0
    circuit: Circuit = Circuit()
    headers: Mapping[str, str] = field(default_factory=dict)
    native_json_schema: bool | None = None
    catalog_only: bool = False
    default_price: Price | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    proxy: str | None = None  # None: from the environment (HTTPS_PROXY...); "": direct
    max_connections: int = 100  # per origin
    tls: ProviderTls | None = None
    # kind-specific (SPEC 5): azure api_version / deployments; vertex project / location;
    # bedrock region
    api_version: str | None = None
    deployments: Mapping[str, str] = field(default_factory=dict)
    token_file: str | None = None  # a bearer token (azure: Entra ID), re-read when it changes
    token_env: str | None = None  # a bearer token in the environment, read at load
    token: str | None = field(default=None, repr=False)  # token_env's value: never logged
    project: str | None = None
    location: str | None = None
    region: str | None = None
    # the calling application, for kinds that have headers naming it (openrouter HTTP-Referer,
    # X-Title)
    app_url: str | None = None
    app_name: str | None = None


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """A catalog row: a priced `fc:provider/model` ref and what it can do."""

    ref: str
    provider: str
    model_id: str
    price: Price | None
    context: int | None = None
    max_output: int | None = None
    caps: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Rewrite:
    set: Mapping[str, Any] = field(default_factory=dict)
    cap: Mapping[str, float] = field(default_factory=dict)
    drop: tuple[str, ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RateLimit:
    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True, slots=True)
class Budget:
    usd: float
    period: str = "month"


@dataclass(frozen=True, slots=True)
class KeySettings:
    id: str
    sha256: bytes = field(repr=False)
    developer: str
    allowed: tuple[str, ...] = ()
    revoked: bool = False
    expires_at: float | None = None
    budget: Budget | None = None
    rate_limit: RateLimit | None = None


@dataclass(frozen=True, slots=True)
class CustomerSettings:
    id: str
    budget: Budget | None = None
    rate_limit: RateLimit | None = None


@dataclass(frozen=True, slots=True)
class TokenSettings:
    """Client tokens (SPEC 4): HS256 JWTs signed with the secret in `secret_env`.

    `secret` is None when that variable is unset: client tokens are then disabled."""

    secret_env: str = "RINGSIDE_TOKEN_SECRET"
    secret: bytes | None = field(default=None, repr=False)  # never logged
    default_ttl: int = 900
    max_ttl: int = 3600


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """Bearer tokens of the admin listener (SPEC 5 `admin`); None = not set. Never logged.

    `token` guards `GET /v1/customers/{id}/usage`; `metrics_token`, when set, guards
    `GET /metrics`. `token_source` names where `token` came from (`admin.token`, or the
    environment variable it falls back to), so that a refusal can say what to send."""

    token: bytes | None = field(default=None, repr=False)
    token_source: str = "admin.token"
    metrics_token: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 20 * 1024 * 1024
    max_cascade: int = 8  # candidates one request may expand to (each may cost a call)
    # connections (sidecar/server_limits.py): deadlines in seconds, caps per listener
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    idle_timeout: float = 75.0
    max_connections: int = 4096
    admin_max_connections: int = 256


KUBERNETES_DELAY_SECONDS = 5.0  # shutdown.delay_seconds' default inside a Kubernetes pod


@dataclass(frozen=True, slots=True)
class Shutdown:
    """What SIGTERM does (SPEC 8; sidecar/shutdown.py): /readyz fails at once, the api listener
    serves for `delay_seconds` more (while load balancers and Services stop sending), then
    accepts no new connection; what is still running gets `grace_seconds`, and is then ended.

    `delay_seconds` defaults to 0, and to KUBERNETES_DELAY_SECONDS inside a pod (the loader
    reads KUBERNETES_SERVICE_HOST, which the kubelet sets in every container)."""

    delay_seconds: float = 0.0
    grace_seconds: float = 20.0


@dataclass(frozen=True, slots=True)
class AddonSpec:
    path: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Settings:
    """One loaded configuration. Requests keep the instance they started with across reloads."""

    source: str
    listen: Listen
    storage: Storage
    providers: Mapping[str, ProviderSettings]
    models: Mapping[str, ModelEntry]
    slots: Mapping[str, tuple[str, ...]]
    rewrite: Mapping[str, Rewrite]
    keys: tuple[KeySettings, ...]
    customers: Mapping[str, CustomerSettings]
    rate_limits: Mapping[str, RateLimit]
    trusted_proxies: tuple[str, ...]
    limits: Limits
    metrics_enabled: bool
    access_log: bool
    addons: tuple[AddonSpec, ...]
    warnings: tuple[str, ...] = ()
    tokens: TokenSettings = TokenSettings()
    admin: AdminSettings = AdminSettings()
    shutdown: Shutdown = Shutdown()
    # path prefix → provider name (sidecar/settings/passthrough.py), the longest prefix first
    passthrough: Mapping[str, str] = field(default_factory=dict)

    @property
    def open_mode(self) -> bool:
        """No keys configured: every caller is anonymous (allowed only on loopback)."""
        return not self.keys

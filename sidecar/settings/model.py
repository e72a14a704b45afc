"""The validated configuration as frozen dataclasses: built once per load, never per request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.providers.base import Usage


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
    # redis, sqlite: each process leases slices of a budget, admits requests on them in memory
    # (sidecar/stores/budget_lease.py); a slice is up to this many worst cases of a request
    budget_leases: bool = True
    budget_lease_slice: int = 16
    budget_lease_idle: float = 2.0  # seconds unused before a lease's rest is given back
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
class Rates:
    """USD per million tokens of each kind a provider bills. A kind without its own rate
    (None) is billed as its parent: cached and cache-written input as input, input written to
    a one-hour cache as cache-written input (Anthropic bills it dearer), reasoning as
    output. `worst_input` / `worst_output` are the dearest rate an input / output token can be
    billed at (a cache write costs more than plain input at some providers)."""

    input_per_mtok: float
    output_per_mtok: float
    cache_read_per_mtok: float | None = None
    cache_write_per_mtok: float | None = None
    reasoning_per_mtok: float | None = None
    cache_write_1h_per_mtok: float | None = None
    worst_input: float = field(default=0.0, init=False, compare=False)
    worst_output: float = field(default=0.0, init=False, compare=False)

    def __post_init__(self) -> None:
        inputs = (
            self.input_per_mtok,
            self.cache_read_per_mtok,
            self.cache_write_per_mtok,
            self.cache_write_1h_per_mtok,
        )
        outputs = (self.output_per_mtok, self.reasoning_per_mtok)
        object.__setattr__(self, "worst_input", max(r for r in inputs if r is not None))
        object.__setattr__(self, "worst_output", max(r for r in outputs if r is not None))


@dataclass(frozen=True, slots=True)
class Price(Rates):
    """A model's prices, resolved at load (sidecar/prices.py): base rates, and `tiers` that
    replace them all when a call's input tokens exceed `above` (the highest such tier wins:
    a long-context tier bills every token of the call at its rates, as providers do)."""

    tiers: tuple[tuple[int, Rates], ...] = ()
    # no tiers and no rate of its own for any detail: a usage costs input × rate + output ×
    # rate whatever its details say (the common case, priced without looking at them)
    plain: bool = field(default=True, init=False, compare=False)

    def __post_init__(self) -> None:
        Rates.__post_init__(self)
        detailed = (
            self.cache_read_per_mtok,
            self.cache_write_per_mtok,
            self.cache_write_1h_per_mtok,
            self.reasoning_per_mtok,
        )
        plain = not self.tiers and all(rate is None for rate in detailed)
        object.__setattr__(self, "plain", plain)

    def rates(self, prompt_tokens: int) -> Rates:
        for above, rates in reversed(self.tiers):
            if prompt_tokens > above:
                return rates
        return self

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Plain input and output tokens (no cache, no reasoning detail)."""
        rates = self.rates(prompt_tokens) if self.tiers else self
        return (
            prompt_tokens * rates.input_per_mtok + completion_tokens * rates.output_per_mtok
        ) / 1e6

    def usage_cost_usd(self, usage: Usage) -> float:
        """USD of one call's whole usage, billed as genai-prices bills it (tests/test_prices.py
        checks the two agree): the input tokens read from the provider's cache at the
        cache-read rate, those written to it at the cache-write rate (the one-hour cache's
        at its own rate where the price has one), the rest at the input
        rate; reasoning tokens at the reasoning rate when there is one (else as output); every
        rate from the tier the call's whole input reaches."""
        prompt = usage.prompt_tokens
        output = usage.completion_tokens
        if self.plain:
            return (prompt * self.input_per_mtok + output * self.output_per_mtok) / 1e6
        rates = self.rates(prompt) if self.tiers else self
        detail = 0.0
        if usage.cache_read_tokens and rates.cache_read_per_mtok is not None:
            cached = min(usage.cache_read_tokens, prompt)
            prompt -= cached
            detail += cached * rates.cache_read_per_mtok
        if usage.cache_write_tokens:
            written = min(usage.cache_write_tokens, prompt)
            hour = min(usage.cache_write_1h_tokens, written)
            if hour and rates.cache_write_1h_per_mtok is not None:
                prompt -= hour
                written -= hour
                detail += hour * rates.cache_write_1h_per_mtok
            if rates.cache_write_per_mtok is not None:
                prompt -= written
                detail += written * rates.cache_write_per_mtok
        if usage.reasoning_tokens and rates.reasoning_per_mtok is not None:
            reasoning = min(usage.reasoning_tokens, output)
            output -= reasoning
            detail += reasoning * rates.reasoning_per_mtok
        return (detail + prompt * rates.input_per_mtok + output * rates.output_per_mtok) / 1e6

    def worst_cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        """An upper bound for at most these tokens: each input token at the dearest input rate
        of the dearest tier it can reach (no cache discount assumed), each output token at the
        dearest output rate."""
        if not self.tiers:
            return (prompt_tokens * self.worst_input + completion_tokens * self.worst_output) / 1e6
        worst_in = self.worst_input
        worst_out = self.worst_output
        for above, rates in self.tiers:
            if prompt_tokens > above:
                worst_in = max(worst_in, rates.worst_input)
                worst_out = max(worst_out, rates.worst_output)
        return (prompt_tokens * worst_in + completion_tokens * worst_out) / 1e6


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
    # where `price` came from: "config", or the price data's model ("genai-prices 0.2.3:
    # openai/gpt-4o-mini"); None when unpriced
    price_source: str | None = None


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
    # what bodies from 64 KiB may hold at once, raw and parsed, per worker (api/body_memory.py)
    max_body_memory_bytes: int = 128 * 1024 * 1024
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


DEFAULT_PRICES_URL = (  # genai-prices' own (genai_prices.update_prices.DEFAULT_UPDATE_URL)
    "https://raw.githubusercontent.com/pydantic/genai-prices/refs/heads/main/"
    "prices/new_data/v2/data.json"
)


@dataclass(frozen=True, slots=True)
class PriceSettings:
    """The `prices` section: where catalog prices come from besides the config (sidecar/prices.py).

    The installed genai-prices package's pinned snapshot is used, with no network, unless
    `auto_update` is set: then the data is fetched from `url` at start and every
    `update_interval` seconds off the request path (sidecar/prices_update.py), and the config
    is built again with it; a failed fetch is logged and the data in use stays."""

    data: str = "genai-prices"  # "none": config prices only, the data never loaded (~14 MB)
    auto_update: bool = False
    update_interval: float = 3600.0
    url: str = DEFAULT_PRICES_URL


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
    prices: PriceSettings = PriceSettings()
    # the price data this load was built with (sidecar.prices.PriceBook): prices refs outside
    # the catalog the first time the router meets them; None when built without
    price_book: Any = field(default=None, compare=False, repr=False)

    @property
    def open_mode(self) -> bool:
        """No keys configured: every caller is anonymous (allowed only on loopback)."""
        return not self.keys

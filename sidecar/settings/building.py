"""Building a config: schema-valid data → `Settings`. What a JSON Schema cannot say is checked
here (refs to providers and slots, slot loops, reserved headers, proxies, TLS files, tokens), and
a field the file leaves out takes its default from `sidecar.settings.model`."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from sidecar.settings.model import (
    KUBERNETES_DELAY_SECONDS,
    AddonSpec,
    AdminSettings,
    Budget,
    Circuit,
    CustomerSettings,
    HostPort,
    KeySettings,
    Limits,
    Listen,
    ModelEntry,
    Price,
    PriceSettings,
    ProviderSettings,
    ProviderTls,
    RateLimit,
    Rewrite,
    Settings,
    Shutdown,
    Storage,
    Timeouts,
    TokenSettings,
)
from sidecar.settings.passthrough import build_passthrough
from sidecar.settings.reading import ConfigError, KeyPath, Located

if TYPE_CHECKING:
    from sidecar.prices import PriceBook, PriceData

ADMIN_TOKEN_ENV = "RINGSIDE_ADMIN_TOKEN"  # admin.token when the config does not set one
MIN_ADMIN_TOKEN_CHARS = 16
_BEARER_TOKEN = re.compile(r"[\x21-\x7e]+")  # what an Authorization header carries as is


def _hostport(text: str) -> HostPort:
    host, _, port = text.rpartition(":")
    return HostPort(host.strip("[]"), int(port))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# set by the client itself: a configured value would break the framing or the routing
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "proxy-authorization"}
)


def _header_problems(headers: Mapping[str, str], at: tuple[str, ...], where: Located) -> list[str]:
    """Configured upstream headers that the client must refuse: reserved names, and names or
    values holding CR, LF or NUL (a header injection)."""
    problems = []
    for name, value in headers.items():
        if name.lower() in _RESERVED_HEADERS:
            problems.append(where.problem((*at, name), "is set by the gateway, not the config"))
        elif any(c in f"{name}{value}" for c in "\r\n\0"):
            problems.append(where.problem((*at, name), "holds a CR, LF or NUL"))
    return problems


def _proxy(
    value: str | None, at: tuple[str, ...], where: Located, problems: list[str]
) -> str | None:
    """A provider's `proxy:`: None (unset: the environment's), "" (`""` or `none`: direct),
    or a proxy URL the client can use."""
    if value is None:
        return None
    if value.strip().lower() in ("", "none"):
        return ""
    from sidecar.http1.proxy import Proxy

    try:
        Proxy.parse(value)
    except ValueError as exc:
        problems.append(where.problem(at, str(exc)))
    return value


def _tls(
    data: Mapping[str, str] | None, at: tuple[str, ...], where: Located, problems: list[str]
) -> ProviderTls | None:
    """A provider's `tls:`, its SSL context built once, here."""
    if not data:
        return None
    import ssl

    ca_file, cert_file, key_file = data.get("ca_file"), data.get("cert_file"), data.get("key_file")
    if key_file and not cert_file:
        problems.append(where.problem((*at, "key_file"), "needs cert_file"))
        return None
    files_key: list[object] = []
    for path in (ca_file, cert_file, key_file):
        try:
            files_key += [path, os.stat(path).st_mtime_ns if path else None]
        except OSError as exc:
            problems.append(where.problem(at, f"{path}: {exc.strerror}"))
            return None
    try:
        context = ssl.create_default_context(cafile=ca_file)
        if cert_file:
            context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError, ValueError) as exc:
        problems.append(where.problem(at, f"unusable: {exc}"))
        return None
    return ProviderTls(ca_file, cert_file, key_file, context, tuple(files_key))


def _bearer_token(
    pdata: Mapping[str, Any],
    at: tuple[str, ...],
    where: Located,
    env: Mapping[str, str],
    problems: list[str],
    warnings: list[str],
) -> str | None:
    """A provider's `token_env` value (a bearer token read once, here), after warning of a
    `token_env` that is unset or a `token_file` that is not there yet (calls fail until it is);
    a value no header can carry is refused."""
    token_file = pdata.get("token_file")
    if token_file and not os.path.isfile(token_file):
        warnings.append(
            where.problem((*at, "token_file"), f"{token_file} is not a file (yet): calls fail "
                                               "until it holds a token")
        )  # fmt: skip
    name = pdata.get("token_env")
    if not name:
        return None
    token = env.get(name, "").strip() or None
    if token is None:
        warnings.append(
            where.problem((*at, "token_env"), f"{name} is not set: calls to this provider fail")
        )
    elif not _BEARER_TOKEN.fullmatch(token):
        problems.append(
            where.problem((*at, "token_env"), f"{name} holds characters a header cannot carry")
        )
        return None
    return token


def _price(data: Mapping[str, Any] | None) -> Price | None:
    """A price the config states (`default_price`, or a catalog entry's own); None when it
    states none. Cached and cache-written input without a rate of their own are billed as
    input."""
    if data is None or "input_per_mtok" not in data or "output_per_mtok" not in data:
        return None  # half a price is a problem of its own (_entry_price_problems)
    return Price(
        float(data["input_per_mtok"]),
        float(data["output_per_mtok"]),
        **_given(
            data,
            cache_read_per_mtok=float,
            cache_write_per_mtok=float,
            cache_write_1h_per_mtok=float,
        ),
    )


_PRICE_FIELDS = (
    "input_per_mtok",
    "output_per_mtok",
    "cache_read_per_mtok",
    "cache_write_per_mtok",
    "cache_write_1h_per_mtok",
)


def _entry_price_problems(ref: str, mdata: Mapping[str, Any], where: Located) -> list[str]:
    """A catalog entry states its price whole (input and output) or not at all."""
    stated = [name for name in _PRICE_FIELDS if name in mdata]
    if not stated or ("input_per_mtok" in mdata and "output_per_mtok" in mdata):
        return []
    return [
        where.problem(
            ("models", ref),
            f"states {', '.join(stated)} but not both input_per_mtok and output_per_mtok: "
            "state the price whole, or leave every price field out to take the price data's",
        )
    ]


def _rate(data: Mapping[str, Any] | None) -> RateLimit | None:
    return None if data is None else RateLimit(rpm=data.get("rpm"), tpm=data.get("tpm"))


def _budget(data: Mapping[str, Any] | None) -> Budget | None:
    return None if data is None else Budget(float(data["usd"]), **_given(data, period=None))


def _given(section: Mapping[str, Any], **fields: Callable[[Any], Any] | None) -> dict[str, Any]:
    """The `fields` that `section` sets, each read with its conversion (None: as is); a field
    left out takes its default from the dataclass in `sidecar.settings.model`, the one place
    defaults are written."""
    return {
        name: section[name] if convert is None else convert(section[name])
        for name, convert in fields.items()
        if name in section
    }


def split_fc_ref(ref: str) -> tuple[str, str] | None:
    """`fc:provider/model-id` → (provider, model-id); None when malformed."""
    if not ref.startswith("fc:"):
        return None
    provider, sep, model_id = ref[3:].partition("/")
    if not sep or not provider or not model_id:
        return None
    return provider, model_id


def build(
    data: dict[str, Any],
    where: Located,
    env: Mapping[str, str],
    price_data: PriceData | None = None,
) -> Settings:
    """The Settings of schema-valid `data`; every problem found is raised in one ConfigError.
    `env` gives the secrets the file names (api_key_env, tokens.secret_env, the admin token);
    `price_data` fills the prices the catalog leaves out (None: the installed package's)."""
    problems: list[str] = []
    warnings: list[str] = []

    listen = Listen(**_given(data.get("listen", {}), api=_hostport, admin=_hostport))
    for name in ("api", "admin"):
        port = getattr(listen, name).port
        if not 0 < port < 65536:
            problems.append(where.problem(("listen", name), f"port {port} is out of range"))

    storage = Storage(**data.get("storage", {}))

    from sidecar.providers import SUPPORTED_KINDS, catalog_caps, provider_problems

    providers: dict[str, ProviderSettings] = {}
    for name, pdata in data.get("providers", {}).items():
        if pdata["kind"] not in SUPPORTED_KINDS:
            problems.append(
                where.problem(
                    ("providers", name, "kind"),
                    f"kind {pdata['kind']!r} has no adapter in this build yet; supported: "
                    + ", ".join(sorted(SUPPORTED_KINDS)),
                )
            )
            continue
        api_key = None
        key_env = pdata.get("api_key_env")
        if key_env:
            api_key = env.get(key_env) or None
            if api_key is None:
                warnings.append(
                    where.problem(
                        ("providers", name, "api_key_env"),
                        f"{key_env} is not set: calls to provider {name!r} will fail",
                    )
                )
        timeout = pdata.get("timeout", {})
        at = ("providers", name)
        token = _bearer_token(pdata, at, where, env, problems, warnings)
        problems.extend(_header_problems(pdata.get("headers", {}), (*at, "headers"), where))
        proxy = _proxy(pdata.get("proxy"), (*at, "proxy"), where, problems)
        tls = _tls(pdata.get("tls"), (*at, "tls"), where, problems)
        options = dict(pdata.get("options", {}))
        if "mock" in pdata:
            options["mock"] = pdata["mock"]
        providers[name] = ProviderSettings(
            name=name,
            kind=pdata["kind"],
            base_url=pdata.get("base_url"),
            api_key_env=key_env,
            api_key=api_key,
            timeout=Timeouts(**_given(timeout, connect=float, read=float, total=float, pool=float)),
            circuit=Circuit(**pdata.get("circuit", {})),
            headers=dict(pdata.get("headers", {})),
            native_json_schema=pdata.get("native_json_schema"),
            default_price=_price(pdata.get("default_price")),
            options=options,
            proxy=proxy,
            tls=tls,
            token=token,
            **_given(
                pdata,
                retries=None,
                retry_backoff=float,
                retry_after_cap=float,
                catalog_only=None,
                max_connections=int,
                api_version=None,
                deployments=dict,
                token_file=None,
                token_env=None,
                project=None,
                location=None,
                region=None,
                app_url=None,
                app_name=None,
            ),
        )
        for key, message in provider_problems(providers[name]):
            problems.append(where.problem((*at, key) if key else at, message))

    # an entry without its own `caps:` list has its provider kind's
    kind_caps = {name: catalog_caps(provider) for name, provider in providers.items()}
    from sidecar.prices import price_book

    prices = PriceSettings(
        **_given(
            data.get("prices", {}), data=None, auto_update=None, update_interval=float, url=None
        )
    )
    if prices.data == "none" and prices.auto_update:
        problems.append(where.problem(("prices", "auto_update"), "needs prices.data: genai-prices"))
    kinds = {provider.kind for provider in providers.values()} if prices.data != "none" else ()
    book = price_book(kinds, price_data)
    models: dict[str, ModelEntry] = {}
    for ref, mdata in data.get("models", {}).items():
        parts = split_fc_ref(ref)
        if parts is None:
            problems.append(where.problem(("models", ref), "expected fc:<provider>/<model>"))
            continue
        provider, model_id = parts
        if provider not in providers:
            problems.append(
                where.problem(("models", ref), f"provider {provider!r} is not in providers")
            )
            continue
        problems.extend(_entry_price_problems(ref, mdata, where))
        models[ref] = _entry(ref, provider, model_id, mdata, book, providers, kind_caps)

    slots: dict[str, tuple[str, ...]] = {}
    for name, refs in data.get("slots", {}).items():
        slots[name] = (refs,) if isinstance(refs, str) else tuple(refs)
    problems.extend(_check_slots(slots, providers, models, where))
    max_cascade = data.get("limits", {}).get("max_cascade", Limits().max_cascade)
    for name, refs in slots.items():
        if len(refs) > max_cascade:
            problems.append(
                where.problem(
                    ("slots", name),
                    f"lists {len(refs)} refs, more than limits.max_cascade ({max_cascade}) "
                    "that one request may try",
                )
            )

    rewrite: dict[str, Rewrite] = {}
    for target, rdata in data.get("rewrite", {}).items():
        kind, _, name = target.partition(":")
        known = slots if kind == "slot" else providers
        if name not in known:
            problems.append(where.problem(("rewrite", target), f"no {kind} named {name!r}"))
        problems.extend(
            _header_problems(rdata.get("headers", {}), ("rewrite", target, "headers"), where)
        )
        rewrite[target] = Rewrite(
            set=dict(rdata.get("set", {})),
            cap={k: float(v) for k, v in rdata.get("cap", {}).items()},
            drop=tuple(rdata.get("drop", ())),
            headers=dict(rdata.get("headers", {})),
        )

    keys: list[KeySettings] = []
    seen_ids: set[str] = set()
    for index, kdata in enumerate(data.get("keys", [])):
        if kdata["id"] in seen_ids:
            problems.append(where.problem(("keys", index, "id"), "duplicate key id"))
        seen_ids.add(kdata["id"])
        expires = kdata.get("expires")
        keys.append(
            KeySettings(
                id=kdata["id"],
                sha256=bytes.fromhex(kdata["sha256"]),
                developer=kdata.get("developer", kdata["id"]),
                allowed=tuple(kdata.get("allowed", ())),
                **_given(kdata, revoked=None),
                expires_at=_timestamp(expires) if expires else None,
                budget=_budget(kdata.get("budget")),
                rate_limit=_rate(kdata.get("rate_limit")),
            )
        )

    customers = {
        cid: CustomerSettings(cid, _budget(c.get("budget")), _rate(c.get("rate_limit")))
        for cid, c in data.get("customers", {}).items()
    }
    rate_limits = {
        scope: RateLimit(rpm=r.get("rpm"), tpm=r.get("tpm"))
        for scope, r in data.get("rate_limits", {}).items()
    }
    trusted = tuple(data.get("trusted_proxies", ()))
    for index, cidr in enumerate(trusted):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            problems.append(where.problem(("trusted_proxies", index), f"{cidr!r} is not a CIDR"))

    tokens = _tokens(data.get("tokens"), where, env, problems, warnings)
    admin = _admin(data.get("admin", {}), where, env, problems, warnings)

    if not keys and not is_loopback(listen.api.host):
        problems.append(
            where.problem(
                ("listen", "api"),
                "no keys are configured (open mode), which is allowed only on a loopback "
                "listener: add keys or listen on 127.0.0.1",
            )
        )

    addons = []
    for item in data.get("addons", []):
        if isinstance(item, str):
            addons.append(AddonSpec(item))
        else:
            addons.append(AddonSpec(item["path"], dict(item.get("options", {}))))

    shutdown = _shutdown(data, where, env, warnings)
    passthrough = build_passthrough(data, providers, where, problems)

    if problems:
        raise ConfigError(problems)
    return Settings(
        source=where.source,
        listen=listen,
        storage=storage,
        providers=providers,
        models=models,
        slots=slots,
        rewrite=rewrite,
        keys=tuple(keys),
        customers=customers,
        rate_limits=rate_limits,
        trusted_proxies=trusted,
        limits=Limits(
            **_given(
                data.get("limits", {}),
                max_body_bytes=None,
                max_body_memory_bytes=None,
                max_cascade=None,
                header_timeout=float,
                body_timeout=float,
                idle_timeout=float,
                max_connections=None,
                admin_max_connections=None,
            )
        ),
        metrics_enabled=data.get("metrics", {}).get("enabled", True),
        access_log=data.get("access_log", {}).get("enabled", True),
        addons=tuple(addons),
        warnings=tuple(warnings),
        tokens=tokens,
        admin=admin,
        shutdown=shutdown,
        passthrough=passthrough,
        prices=prices,
        price_book=book,
    )


def _entry(
    ref: str,
    provider: str,
    model_id: str,
    mdata: Mapping[str, Any],
    book: PriceBook,
    providers: Mapping[str, ProviderSettings],
    kind_caps: Mapping[str, frozenset[str]],
) -> ModelEntry:
    """A catalog entry: what the config states, and the price (and context window) it leaves
    out from the price data of its provider's kind, when the data knows the model."""
    price = _price(mdata)
    source = "config" if price is not None else None
    context = mdata.get("context")
    if price is None or context is None:
        found = book.lookup(providers[provider].kind, model_id)
        if found is not None:
            if price is None:
                price, source = found.price, found.source
            if context is None:
                context = found.context
    return ModelEntry(
        ref=ref,
        provider=provider,
        model_id=model_id,
        price=price,
        context=context,
        max_output=mdata.get("max_output"),
        caps=frozenset(mdata["caps"]) if "caps" in mdata else kind_caps[provider],
        tags=frozenset(mdata.get("tags", ())),
        price_source=source,
    )


def _shutdown(
    data: Mapping[str, Any], where: Located, env: Mapping[str, str], warnings: list[str]
) -> Shutdown:
    """The `shutdown` section. `limits.drain_seconds`, what `grace_seconds` was called before
    the section existed, is still read (a config that worked keeps working), with a warning."""
    section = data.get("shutdown", {})
    delay = section.get("delay_seconds")
    if delay is None:
        in_pod = "KUBERNETES_SERVICE_HOST" in env
        delay = KUBERNETES_DELAY_SECONDS if in_pod else Shutdown().delay_seconds
    grace = section.get("grace_seconds")
    drain = data.get("limits", {}).get("drain_seconds")
    if drain is not None:
        if grace is None:
            grace = drain
            told = f"deprecated: read as shutdown.grace_seconds ({drain:g}); move it there"
        else:
            told = "deprecated and ignored: shutdown.grace_seconds is set; remove it"
        warnings.append(where.problem(("limits", "drain_seconds"), told))
    if grace is None:
        grace = Shutdown().grace_seconds
    return Shutdown(delay_seconds=float(delay), grace_seconds=float(grace))


MIN_TOKEN_SECRET_BYTES = 32


def _tokens(
    section: Mapping[str, Any] | None,
    where: Located,
    env: Mapping[str, str],
    problems: list[str],
    warnings: list[str],
) -> TokenSettings:
    """Client-token settings; the secret is read from the environment, never from the file."""
    defaults = TokenSettings()
    data = section or {}
    secret_env = data.get("secret_env", defaults.secret_env)
    max_ttl = data.get("max_ttl", defaults.max_ttl)
    default_ttl = data.get("default_ttl", min(defaults.default_ttl, max_ttl))
    if default_ttl > max_ttl:
        problems.append(
            where.problem(("tokens", "default_ttl"), f"{default_ttl} is over max_ttl ({max_ttl})")
        )
    secret = env.get(secret_env) or None
    if secret is not None and len(secret.encode()) < MIN_TOKEN_SECRET_BYTES:
        problems.append(
            where.problem(
                ("tokens", "secret_env") if "secret_env" in data else ("tokens",),
                f"{secret_env} holds {len(secret.encode())} bytes; a client-token secret needs "
                f"at least {MIN_TOKEN_SECRET_BYTES} (e.g. `openssl rand -hex 32`)",
            )
        )
    if secret is None and section is not None:
        message = f"{secret_env} is not set: client tokens are disabled"
        warnings.append(where.problem(("tokens",), message))
    return TokenSettings(
        secret_env=secret_env,
        secret=secret.encode() if secret is not None else None,
        default_ttl=default_ttl,
        max_ttl=max_ttl,
    )


def _admin(
    data: Mapping[str, Any],
    where: Located,
    env: Mapping[str, str],
    problems: list[str],
    warnings: list[str],
) -> AdminSettings:
    """The admin tokens. Surrounding whitespace is dropped (a Secret written with `echo` ends in
    a newline) and an empty value means not set; `admin.token` falls back to the environment
    variable RINGSIDE_ADMIN_TOKEN. No message quotes a token."""
    tokens: dict[str, bytes | None] = {}
    for name in ("token", "metrics_token"):
        text = str(data.get(name, "")).strip()
        if text and not _BEARER_TOKEN.fullmatch(text):
            problems.append(
                where.problem(
                    ("admin", name),
                    "must be printable ASCII without spaces, as a bearer token is sent "
                    "(e.g. `openssl rand -hex 32`); the value is not shown",
                )
            )
        elif text and len(text) < MIN_ADMIN_TOKEN_CHARS:
            warnings.append(
                where.problem(
                    ("admin", name),
                    f"{len(text)} characters are easy to guess: use at least "
                    f"{MIN_ADMIN_TOKEN_CHARS} random ones (e.g. `openssl rand -hex 32`)",
                )
            )
        tokens[name] = text.encode() if text else None
    token, source = tokens["token"], "admin.token"
    if token is None:
        token, source = (env.get(ADMIN_TOKEN_ENV) or "").strip().encode() or None, ADMIN_TOKEN_ENV
    if token is not None and token == tokens["metrics_token"]:
        warnings.append(
            where.problem(
                ("admin", "metrics_token"),
                f"is the same as the admin token ({source}): whoever scrapes /metrics can also "
                "read every customer's usage; give Prometheus a token of its own",
            )
        )
    return AdminSettings(token=token, token_source=source, metrics_token=tokens["metrics_token"])


def metrics_exposure_warning(settings: Settings) -> str | None:
    """One line for the operator when /metrics (customer ids, limits and spend) is open to
    whoever reaches a non-loopback admin listener; None when it is not."""
    admin = settings.listen.admin
    if (
        settings.admin.metrics_token is not None
        or not settings.metrics_enabled
        or is_loopback(admin.host)
    ):
        return None
    return (
        f"{settings.source}: admin.metrics_token: not set, and the admin listener {admin} is not "
        "loopback: /metrics shows customer ids, budgets and spend to anyone on the pod network; "
        "set admin.metrics_token (Prometheus sends it as a bearer token) or restrict the admin "
        "port with k8s/monitoring/networkpolicy.yaml"
    )


def _timestamp(text: str) -> float:
    parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def _check_slots(
    slots: Mapping[str, tuple[str, ...]],
    providers: Mapping[str, ProviderSettings],
    models: Mapping[str, ModelEntry],
    where: Located,
) -> list[str]:
    problems = []
    for name, refs in slots.items():
        for index, ref in enumerate(refs):
            path: KeyPath = ("slots", name) if len(refs) == 1 else ("slots", name, index)
            if ref.startswith("fc:"):
                parts = split_fc_ref(ref)
                if parts is None or parts[0] not in providers:
                    problems.append(where.problem(path, f"{ref}: unknown provider"))
                elif providers[parts[0]].catalog_only and ref not in models:
                    problems.append(where.problem(path, f"{ref}: not in models (catalog_only)"))
            elif ref.startswith("slot:"):
                problems.extend(
                    where.problem(path, message) for message in _slot_cycle(ref[5:], slots, [name])
                )
    return problems


def _slot_cycle(target: str, slots: Mapping[str, tuple[str, ...]], trail: list[str]) -> list[str]:
    if target not in slots:
        return [f"slot:{target} is not defined"]
    if target in trail:
        return [f"slots refer to each other in a loop: {' → '.join([*trail, target])}"]
    problems: list[str] = []
    for ref in slots[target]:
        if ref.startswith("slot:"):
            problems.extend(_slot_cycle(ref[5:], slots, [*trail, target]))
    return problems

"""YAML file → validated `Settings`, with errors that name the file, line and key path."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

import yaml

from sidecar.schema_compiler import Predicate, compile_predicate, trusted_matcher
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

if TYPE_CHECKING:
    import jsonschema

KeyPath = tuple[str | int, ...]
ADMIN_TOKEN_ENV = "RINGSIDE_ADMIN_TOKEN"  # admin.token when the config does not set one
SECRET_PATHS = frozenset({("admin", "token"), ("admin", "metrics_token")})  # never echoed
MIN_ADMIN_TOKEN_CHARS = 16
_BEARER_TOKEN = re.compile(r"[\x21-\x7e]+")  # what an Authorization header carries as is
_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """A configuration problem; `str()` is `file:line: key.path: message`, one per line."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@cache
def config_schema() -> dict[str, Any]:
    try:  # installed next to this module (package_data): importlib.resources costs ≈1 ms more
        with open(os.path.join(os.path.dirname(__file__), "schema.json"), encoding="utf-8") as f:
            text = f.read()
    except (OSError, TypeError):  # a loader without files (zip import)
        from importlib import resources

        text = resources.files("sidecar.settings").joinpath("schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


@cache
def _validator() -> jsonschema.Draft202012Validator:
    import jsonschema

    return jsonschema.Draft202012Validator(
        config_schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


class _ConfigFormats:
    """The one format the config schema uses, checked exactly as jsonschema checks it."""

    def __init__(self) -> None:
        from rfc3339_validator import validate_rfc3339

        self.checkers: dict[str, Any] = {"date-time": validate_rfc3339}

    def conforms(self, instance: object, format: str) -> bool:
        return not isinstance(instance, str) or self.checkers[format](instance.upper())


@cache
def _valid_config() -> Predicate | None:
    """A compiled check of the config schema: a valid file (the usual case) is accepted
    without importing jsonschema (≈0.1 s of startup); jsonschema explains an invalid one."""
    return compile_predicate(config_schema(), _ConfigFormats(), trusted_matcher)


def format_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


class _Located:
    """Finds the line of a key path in the YAML node tree."""

    def __init__(self, source: str, root: yaml.Node | None) -> None:
        self.source = source
        self.root = root

    def line(self, path: KeyPath) -> int:
        node = self.root
        line = node.start_mark.line + 1 if node is not None else 1
        for part in path:
            child = None
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    if key_node.value == part:
                        child, line = value_node, key_node.start_mark.line + 1
                        break
            elif (
                isinstance(node, yaml.SequenceNode)
                and isinstance(part, int)
                and 0 <= part < len(node.value)
            ):
                child = node.value[part]
                line = child.start_mark.line + 1
            if child is None:
                break
            node = child
        return line

    def problem(self, path: KeyPath, message: str) -> str:
        return f"{self.source}:{self.line(path)}: {format_path(path)}: {message}"


def _expand_env(value: Any, path: KeyPath, env: Mapping[str, str], missing: list[KeyPath]) -> Any:
    if isinstance(value, str) and "${" in value:

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            missing.append((*path, f"${{{name}}}"))
            return ""

        return _ENV_PATTERN.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, (*path, k), env, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, (*path, i), env, missing) for i, v in enumerate(value)]
    return value


def load_settings(path: str, env: Mapping[str, str] | None = None) -> Settings:
    """Read, expand, validate and build. Raises ConfigError; never returns a half-valid Settings."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    return parse_settings(text, path, os.environ if env is None else env)


def _compose(text: str, loader_class: Any) -> tuple[yaml.Node | None, Any]:
    loader = loader_class(text)
    try:
        root = loader.get_single_node()
        return root, (loader.construct_document(root) if root is not None else {})
    finally:
        loader.dispose()


_FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, when PyYAML has it


def parse_settings(text: str, source: str, env: Mapping[str, str]) -> Settings:
    try:
        try:
            root, raw = _compose(text, _FAST_LOADER)  # ≈0.2 ms; the pure-Python parser ≈1.4 ms
        except yaml.YAMLError:  # parsed again, so that the problem is told as it always was
            root, raw = _compose(text, yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{source}:{line}: not valid YAML: {problem}"]) from None
    where = _Located(source, root)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([where.problem((), "the file must hold a mapping of sections")])

    missing: list[KeyPath] = []
    data = _expand_env(raw, (), env, missing)
    if missing:
        raise ConfigError(
            [where.problem(p[:-1], f"environment variable {p[-1]} is not set") for p in missing]
        )

    fast = _valid_config()
    if fast is not None and fast(data):
        return _build(data, where, env)
    errors = sorted(_validator().iter_errors(data), key=lambda e: [str(p) for p in e.path])
    if errors and _coerce_expanded(data, errors, raw):
        errors = sorted(_validator().iter_errors(data), key=lambda e: [str(p) for p in e.path])
    if errors:
        raise ConfigError(
            [where.problem(path, message) for e in errors for path, message in _schema_problems(e)]
        )
    return _build(data, where, env)


_SCALAR_TYPES: dict[str, type | tuple[type, ...]] = {
    "integer": int,
    "number": (int, float),
    "boolean": bool,
}


def _coerce_expanded(data: Any, errors: list[jsonschema.ValidationError], raw: Any) -> bool:
    """`retries: ${RETRIES:-2}` expands to the string "2": where the schema wants a number or a
    boolean and the value came from `${…}`, read the expanded text as a YAML scalar."""
    changed = False
    for error in errors:
        wanted = _SCALAR_TYPES.get(str(error.validator_value))
        path = tuple(error.absolute_path)
        if error.validator != "type" or wanted is None or not path:
            continue
        original = raw
        for part in path:
            original = original[part]
        if not (isinstance(original, str) and "${" in original and isinstance(error.instance, str)):
            continue
        try:
            value = yaml.safe_load(error.instance)
        except yaml.YAMLError:
            continue
        if isinstance(value, wanted) and (wanted is bool or not isinstance(value, bool)):
            parent = data
            for part in path[:-1]:
                parent = parent[part]
            parent[path[-1]] = value
            changed = True
    return changed


def _schema_problems(error: jsonschema.ValidationError) -> list[tuple[KeyPath, str]]:
    """A schema error as (key path, message); an unknown key is named, at its own line."""
    path: KeyPath = tuple(error.absolute_path)
    if path in SECRET_PATHS:  # jsonschema's message quotes the value: a token, here
        return [(path, error.message.replace(repr(error.instance), "the value"))]
    if (
        error.validator == "additionalProperties"
        and error.validator_value is False
        and isinstance(error.instance, dict)
        and isinstance(error.schema, dict)
    ):
        known = sorted(error.schema.get("properties", {}))
        unknown = [key for key in error.instance if key not in known]
        if unknown:
            expected = f"expected one of: {', '.join(known)}"
            return [((*path, key), f"unknown key; {expected}") for key in unknown]
    return [(path, error.message)]


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


def _header_problems(headers: Mapping[str, str], at: tuple[str, ...], where: _Located) -> list[str]:
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
    value: str | None, at: tuple[str, ...], where: _Located, problems: list[str]
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
    data: Mapping[str, str] | None, at: tuple[str, ...], where: _Located, problems: list[str]
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


def _price(data: Mapping[str, Any] | None) -> Price | None:
    if data is None:
        return None
    return Price(float(data["input_per_mtok"]), float(data["output_per_mtok"]))


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


def _build(data: dict[str, Any], where: _Located, env: Mapping[str, str]) -> Settings:
    problems: list[str] = []
    warnings: list[str] = []

    listen = Listen(**_given(data.get("listen", {}), api=_hostport, admin=_hostport))
    for name in ("api", "admin"):
        port = getattr(listen, name).port
        if not 0 < port < 65536:
            problems.append(where.problem(("listen", name), f"port {port} is out of range"))

    storage = Storage(**data.get("storage", {}))

    from sidecar.providers import SUPPORTED_KINDS

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
            **_given(
                pdata,
                retries=None,
                retry_backoff=float,
                retry_after_cap=float,
                catalog_only=None,
                max_connections=int,
            ),
        )

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
        models[ref] = ModelEntry(
            ref=ref,
            provider=provider,
            model_id=model_id,
            price=_price(mdata),
            context=mdata.get("context"),
            max_output=mdata.get("max_output"),
            caps=frozenset(mdata.get("caps", ())),
            tags=frozenset(mdata.get("tags", ())),
        )

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
    )


def _shutdown(
    data: Mapping[str, Any], where: _Located, env: Mapping[str, str], warnings: list[str]
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
    where: _Located,
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
    where: _Located,
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
    where: _Located,
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

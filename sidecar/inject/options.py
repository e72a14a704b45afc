"""What to inject into one pod: the injector's defaults, overridden by the pod's annotations.

An annotation that is present but invalid (a quantity Kubernetes would not parse, a ConfigMap
name that cannot exist, a request above its limit) refuses the pod with a message naming the
annotation: injecting with the default instead would hide the mistake, and leaving the sidecar
out would start an app whose OpenAI calls bypass the sidecar's keys and budgets.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from decimal import Decimal

PREFIX = "ringside.fightclub.pro/"
INJECT = PREFIX + "inject"
IMAGE = PREFIX + "image"
CONFIG_MAP = PREFIX + "config-map"
ENV_SECRET = PREFIX + "env-secret"

DEFAULT_IMAGE = "ghcr.io/fightclub/ringside:0.1.0"
DEFAULT_CONFIG_MAP = "ringside-config"
DEFAULT_ENV_SECRET = "ringside-provider-keys"  # optional unless an annotation names it
# annotation suffix → (ResourceRequirements section, resource). Defaults as k8s/base sizes its
# sidecar from the bench: RSS 49-64 MiB idle to loaded, 178 MiB at the peak of the hostile
# soak; 0.5-0.8 ms of CPU per request. One process never uses more than a core, so a 1-core
# limit only caps a runaway, it never throttles a busy event loop.
RESOURCES: dict[str, tuple[str, str]] = {
    "cpu-request": ("requests", "cpu"),
    "cpu-limit": ("limits", "cpu"),
    "memory-request": ("requests", "memory"),
    "memory-limit": ("limits", "memory"),
}
DEFAULT_RESOURCES: dict[str, str] = {
    "cpu-request": "100m",
    "cpu-limit": "1",
    "memory-request": "96Mi",
    "memory-limit": "256Mi",
}
KNOWN = {INJECT, IMAGE, CONFIG_MAP, ENV_SECRET} | {PREFIX + key for key in RESOURCES}

_QUANTITY = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([KMGTPE]i|[eE][+-]?\d{1,2}|[numkMGTPE])?")
_BINARY = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_SCALE = {
    **{suffix: Decimal(2) ** power for suffix, power in _BINARY.items()},
    **{suffix: Decimal(10) ** power for suffix, power in _DECIMAL.items()},
}
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_IMAGE = re.compile(r"[^\s\x00-\x1f\x7f]{1,1024}")


class OptionError(ValueError):
    """The pod's ringside annotations cannot be honoured; the message names every problem."""


def quantity_value(text: str) -> Decimal | None:
    """The value of a non-negative Kubernetes resource quantity (`100m`, `1.5Gi`, `2e3`), or
    None when Kubernetes would not accept `text` as one."""
    match = _QUANTITY.fullmatch(text) if len(text) <= 64 else None
    if match is None:
        return None
    number, suffix = match.groups()
    value = Decimal(number)
    if suffix is None:
        return value
    if suffix in _SCALE:
        return value * _SCALE[suffix]
    return value.scaleb(int(suffix[1:]))


def is_dns_subdomain(name: str) -> bool:
    """A valid name for a ConfigMap or a Secret (RFC 1123 subdomain)."""
    return len(name) <= 253 and _DNS_SUBDOMAIN.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class InjectDefaults:
    """The injector's own settings (flags or environment): what a pod gets without overrides."""

    image: str = DEFAULT_IMAGE
    config_map: str = DEFAULT_CONFIG_MAP
    env_secret: str = DEFAULT_ENV_SECRET  # "" = the sidecar gets no envFrom Secret
    resources: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_RESOURCES))

    def problems(self) -> list[str]:
        """What is wrong with these defaults, checked once at start (the injector refuses to
        run rather than deny every pod)."""
        values = {IMAGE: self.image, CONFIG_MAP: self.config_map, ENV_SECRET: self.env_secret}
        values.update({PREFIX + key: self.resources.get(key, "") for key in RESOURCES})
        return _problems(values, overridden=values.keys())


@dataclass(frozen=True, slots=True)
class InjectOptions:
    """The resolved choices for one pod."""

    image: str
    config_map: str
    env_secret: str | None
    env_secret_optional: bool  # the default Secret may be absent; one an annotation names not
    resources: dict[str, dict[str, str]]  # a Kubernetes ResourceRequirements


def wants_injection(annotations: Mapping[str, str]) -> tuple[bool, list[str]]:
    """Whether the pod asks for the sidecar (exactly `"true"`, as Kubernetes writes a YAML
    boolean quoted), and a warning for a value that looks like a mistake (`"True"`, `"yes"`)."""
    value = annotations.get(INJECT)
    if value is None or value in ("true", "false"):
        return value == "true", []
    return False, [f'{INJECT}: "{value[:40]}" is neither "true" nor "false": not injected']


def options_for(
    annotations: Mapping[str, str], defaults: InjectDefaults
) -> tuple[InjectOptions, list[str]]:
    """The pod's options and warnings about unknown `ringside.fightclub.pro/` annotations.

    An annotation overrides its default; an empty resource annotation removes that default
    (e.g. `memory-limit: ""` for no memory limit). Raises OptionError naming every bad one."""
    values = {
        IMAGE: defaults.image,
        CONFIG_MAP: defaults.config_map,
        ENV_SECRET: defaults.env_secret,
    }
    values.update({PREFIX + key: defaults.resources.get(key, "") for key in RESOURCES})
    overridden = {key: annotations[key] for key in values if key in annotations}
    values.update(overridden)
    problems = _problems(values, overridden.keys())
    if problems:
        raise OptionError("; ".join(problems))
    resources: dict[str, dict[str, str]] = {}
    for key, (section, resource) in RESOURCES.items():
        if values[PREFIX + key]:
            resources.setdefault(section, {})[resource] = values[PREFIX + key]
    unknown = sorted(key for key in annotations if key.startswith(PREFIX) and key not in KNOWN)
    warnings = [f"unknown annotation {key[:80]} ignored" for key in unknown]
    options = InjectOptions(
        image=values[IMAGE],
        config_map=values[CONFIG_MAP],
        env_secret=values[ENV_SECRET] or None,
        env_secret_optional=ENV_SECRET not in overridden,
        resources=resources,
    )
    return options, warnings


def _problems(values: Mapping[str, str], overridden: Collection[str]) -> list[str]:
    """Every problem of `values` (annotation → value); `overridden` says which values were
    given, so that a request above a default limit says which annotation to add."""
    problems = []
    for key, value in values.items():
        shown = value[:80]
        if key == IMAGE and not _IMAGE.fullmatch(value):
            problems.append(f"{key}: {shown!r} is not an image reference")
        elif key == CONFIG_MAP and not is_dns_subdomain(value):
            problems.append(f"{key}: {shown!r} is not a ConfigMap name")
        elif key == ENV_SECRET and value and not is_dns_subdomain(value):
            problems.append(f"{key}: {shown!r} is not a Secret name")
        elif key.removeprefix(PREFIX) in RESOURCES and value and quantity_value(value) is None:
            problems.append(f"{key}: {shown!r} is not a Kubernetes quantity (e.g. 100m, 256Mi)")
    for resource in ("cpu", "memory"):
        request = values.get(f"{PREFIX}{resource}-request") or ""
        limit = values.get(f"{PREFIX}{resource}-limit") or ""
        low, high = quantity_value(request), quantity_value(limit)
        if low is not None and high is not None and low > high:
            default = "" if f"{PREFIX}{resource}-limit" in overridden else " (the default)"
            problems.append(
                f"{PREFIX}{resource}-request {request} is above {PREFIX}{resource}-limit "
                f"{limit}{default}"
            )
    return problems

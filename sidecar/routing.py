"""Model references (`fc:`, `slot:`, `match:`) → an ordered Route of Candidates.

Pure: no I/O, no clock. Slot expansions and catalog rows are compiled once per Settings;
`match:` constraint strings are parsed once and cached per Router.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from sidecar.errors import GatewayError
from sidecar.settings.building import split_fc_ref
from sidecar.settings.model import ModelEntry, Price, ProviderSettings, Settings

DEFAULT_OUTPUT_CAP = 4096  # tokens assumed for a model whose max_output the catalog omits
MAX_REF_LENGTH = 256  # a ref is echoed in X-Ringside-Model-Used / -Models-Tried: bounded


@dataclass(frozen=True, slots=True)
class Candidate:
    """One model the cascade may call."""

    ref: str
    provider: ProviderSettings
    model_id: str
    entry: ModelEntry | None
    price: Price | None
    label: str  # bounded metric label: the ref, or fc:<provider>/_other
    slot: str | None = None

    @property
    def context(self) -> int | None:
        return self.entry.context if self.entry else None

    def output_cap(self, requested: int | None) -> int:
        cap = self.entry.max_output if self.entry and self.entry.max_output else None
        if requested is not None:
            return min(requested, cap) if cap else requested
        return cap or DEFAULT_OUTPUT_CAP


@dataclass(slots=True)  # made per request: a frozen init costs a call per field
class Estimate:
    """What routing needs to know of the request: its size and output cap."""

    prompt_tokens: int
    max_output: int | None


@dataclass(frozen=True, slots=True)
class MatchQuery:
    caps: frozenset[str] = frozenset()
    providers: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()
    min_context: int | None = None
    max_input_price: float | None = None
    max_output_price: float | None = None
    count: int = 1


@dataclass(slots=True)
class Route:
    candidates: list[Candidate] = field(default_factory=list)
    skipped_open: list[str] = field(default_factory=list)  # refs left out: circuit open

    @property
    def is_cascade(self) -> bool:
        return len(self.candidates) > 1


_CONSTRAINT = re.compile(
    r"^(?:(?P<set>caps|provider|tag)=(?P<values>[A-Za-z0-9_.|+-]+)"
    r"|ctx>=(?P<ctx>\d+)"
    r"|(?P<price>in|out)<=(?P<usd>\d+(?:\.\d+)?)"
    r"|n=(?P<n>[1-9]\d{0,2}))$"
)


def parse_match(text: str) -> MatchQuery:
    """Parse the part after `match:`; raises 400 invalid_model_ref naming the bad constraint."""
    caps: set[str] = set()
    providers: set[str] = set()
    tags: set[str] = set()
    values: dict[str, object] = {}
    for raw in text.split(","):
        part = raw.strip()
        found = _CONSTRAINT.match(part)
        if not found:
            raise GatewayError(
                400,
                "invalid_model_ref",
                f"match: constraint {part!r} is not one of caps=a+b, provider=x|y, ctx>=N, "
                "in<=USD, out<=USD, tag=NAME, n=K",
                param="model",
            )
        if found["set"] == "caps":
            caps.update(v for v in found["values"].split("+") if v)
        elif found["set"] == "provider":
            providers.update(v for v in found["values"].split("|") if v)
        elif found["set"] == "tag":
            tags.add(found["values"])
        elif found["ctx"]:
            values["min_context"] = int(found["ctx"])
        elif found["price"]:
            values["max_input_price" if found["price"] == "in" else "max_output_price"] = float(
                found["usd"]
            )
        else:
            values["count"] = int(found["n"])
    return MatchQuery(
        caps=frozenset(caps),
        providers=frozenset(providers),
        tags=frozenset(tags),
        **values,  # type: ignore[arg-type]
    )


def _matches(entry: ModelEntry, query: MatchQuery) -> bool:
    if query.caps and not query.caps <= entry.caps:
        return False
    if query.providers and entry.provider not in query.providers:
        return False
    if query.tags and not query.tags <= entry.tags:
        return False
    if query.min_context is not None and (entry.context or 0) < query.min_context:
        return False
    price = entry.price
    if query.max_input_price is not None and (
        price is None or price.input_per_mtok > query.max_input_price
    ):
        return False
    return not (
        query.max_output_price is not None
        and (price is None or price.output_per_mtok > query.max_output_price)
    )


def expected_cost(candidate: Candidate, estimate: Estimate) -> float:
    """Cost of *this* request on a candidate: estimated prompt × input + output cap × output."""
    if candidate.price is None:
        return float("inf")
    return candidate.price.cost_usd(
        estimate.prompt_tokens, candidate.output_cap(estimate.max_output)
    )


def unwritable_ref(ref: str) -> GatewayError:
    """A ref the response headers could not carry (they name the refs tried): refused before
    any call, so no money moves for an answer that could not be written."""
    shown = ref[:64] + ("…" if len(ref) > 64 else "")
    return GatewayError(
        400,
        "invalid_model_ref",
        f"model ref {shown!r} is not 1-{MAX_REF_LENGTH} printable ASCII characters "
        "(no control characters such as CR or LF)",
        param="model",
    )


def too_many(count: int, limit: int) -> GatewayError:
    """A request may not buy more upstream calls than `limits.max_cascade` candidates."""
    return GatewayError(
        400,
        "invalid_request",
        f"model expands to {count} candidate models; at most {limit} may be tried per request "
        "(limits.max_cascade)",
        param="model",
    )


def model_not_found(message: str) -> GatewayError:
    return GatewayError(404, "model_not_found", message, param="model")


class Router:
    """The routing table of one Settings: compiled once, used by every request."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        slot_refs = {ref for refs in settings.slots.values() for ref in refs}
        self._labelled = set(settings.models) | slot_refs
        self._fc_cache: dict[str, Candidate] = {}
        for ref in (*settings.models, *(r for r in slot_refs if r.startswith("fc:"))):
            self._fc_cache[ref] = self._build_fc(ref)
        self._catalog = [self._fc_cache[ref] for ref in settings.models]
        self.parse_match = lru_cache(maxsize=256)(parse_match)
        self.max_cascade = settings.limits.max_cascade

    def _build_fc(self, ref: str, slot: str | None = None) -> Candidate:
        parts = split_fc_ref(ref)
        if parts is None:
            raise GatewayError(
                400,
                "invalid_model_ref",
                f"model ref {ref!r} is malformed: use fc:<provider>/<model>",
                param="model",
            )
        provider_name, model_id = parts
        provider = self.settings.providers.get(provider_name)
        if provider is None:
            raise model_not_found(f"provider {provider_name!r} of {ref} is not configured")
        entry = self.settings.models.get(ref)
        if entry is None and provider.catalog_only:
            raise model_not_found(
                f"{ref} is not in the model catalog and provider {provider_name!r} is catalog_only"
            )
        label = ref if ref in self._labelled else f"fc:{provider_name}/_other"
        if entry is not None:
            price = entry.price
        else:  # priced by the price data when it knows the model, else the provider's default
            book = self.settings.price_book
            found = book.lookup(provider.kind, model_id) if book is not None else None
            price = found.price if found is not None else provider.default_price
        return Candidate(ref, provider, model_id, entry, price, label, slot)

    def candidate(self, ref: str, slot: str | None = None) -> Candidate:
        cached = self._fc_cache.get(ref)
        if cached is None:
            if len(self._fc_cache) < 4096:
                cached = self._fc_cache[ref] = self._build_fc(ref)
            else:
                cached = self._build_fc(ref)
        if slot is not None and cached.slot != slot:
            return Candidate(
                cached.ref,
                cached.provider,
                cached.model_id,
                cached.entry,
                cached.price,
                cached.label,
                slot,
            )
        return cached

    def resolve(
        self,
        model: object,
        estimate: Estimate,
        circuit_open: Callable[[str], bool] = lambda provider: False,
    ) -> Route:
        """The request's `model` field → Route; raises 400/404 GatewayErrors per SPEC 2.1."""
        refs: Sequence[object]
        if isinstance(model, str):
            refs = (model,)
        elif isinstance(model, list):
            if not model:
                raise GatewayError(
                    400, "invalid_request", "model must not be an empty array", param="model"
                )
            refs = model
            if len(model) > self.max_cascade:
                raise too_many(len(model), self.max_cascade)
        else:
            raise GatewayError(
                400,
                "invalid_request",
                "model must be a string or an array of strings",
                param="model",
            )
        route = Route()
        seen: set[str] = set()
        for ref in refs:
            if not isinstance(ref, str):
                raise GatewayError(
                    400,
                    "invalid_request",
                    "every model in the array must be a string",
                    param="model",
                )
            if len(ref) > MAX_REF_LENGTH or not (ref.isascii() and ref.isprintable()):
                raise unwritable_ref(ref)
            self._expand(ref, estimate, circuit_open, route, seen, None)
        expanded = len(route.candidates) + len(route.skipped_open)
        if expanded > self.max_cascade:
            raise too_many(expanded, self.max_cascade)
        if not route.candidates and route.skipped_open:
            raise GatewayError(
                503,
                "upstream_unavailable",
                "every candidate's provider circuit is open (recent upstream failures): "
                + ", ".join(route.skipped_open),
                headers={"x-should-retry": "false"},  # the breaker decides when to try again
            )
        return route

    def _expand(
        self,
        ref: str,
        estimate: Estimate,
        circuit_open: Callable[[str], bool],
        route: Route,
        seen: set[str],
        slot: str | None,
    ) -> None:
        if ref.startswith("fc:"):
            self._add(self.candidate(ref, slot), circuit_open, route, seen)
        elif ref.startswith("slot:"):
            name = ref[5:]
            if not name:
                raise GatewayError(
                    400,
                    "invalid_model_ref",
                    "slot: needs a slot name, e.g. slot:chat",
                    param="model",
                )
            refs = self.settings.slots.get(name)
            if refs is None:
                raise model_not_found(f"slot {name!r} is not in the routing table")
            for inner in refs:
                self._expand(inner, estimate, circuit_open, route, seen, slot or name)
        elif ref.startswith("match:"):
            query = self.parse_match(ref[6:])
            matched = [c for c in self._catalog if _matches(c.entry, query)]  # type: ignore[arg-type]
            if not matched:
                raise model_not_found(f"{ref} matches no model in the catalog")
            matched.sort(key=lambda c: expected_cost(c, estimate))
            added = 0
            for found in matched:
                if added >= query.count:
                    break
                if slot is not None:
                    found = self.candidate(found.ref, slot)
                if self._add(found, circuit_open, route, seen):
                    added += 1
        else:
            raise GatewayError(
                400,
                "invalid_model_ref",
                f"model {ref!r} is not a Ringside model ref: prefix it with fc:<provider>/, "
                "slot: or match: (e.g. fc:openai/gpt-4o-mini)",
                param="model",
            )

    @staticmethod
    def _add(
        candidate: Candidate, circuit_open: Callable[[str], bool], route: Route, seen: set[str]
    ) -> bool:
        if candidate.ref in seen:
            return False
        seen.add(candidate.ref)
        if circuit_open(candidate.provider.name):
            route.skipped_open.append(candidate.ref)
            return False
        route.candidates.append(candidate)
        return True

"""The injector's pure parts in process: JSON Pointer escaping, the quantity grammar, options
over defaults, and `decide` on every odd shape a Pod's fields can take (never an exception but
MalformedPod, which the webhook answers 400)."""

from __future__ import annotations

import copy
from decimal import Decimal
from typing import Any

import jsonpatch
import pytest

from sidecar.inject.options import (
    DEFAULT_RESOURCES,
    InjectDefaults,
    OptionError,
    options_for,
    quantity_value,
)
from sidecar.inject.patch import Decision, MalformedPod, decide, pointer_token
from tests.injector import INJECT, app_pod


@pytest.mark.parametrize(
    ("key", "token"),
    [("plain", "plain"), ("a/b", "a~1b"), ("a~b", "a~0b"), ("~/", "~0~1"), ("~1", "~01")],
)
def test_pointer_token_escapes_tilde_before_slash(key: str, token: str) -> None:
    assert pointer_token(key) == token
    document = {"annotations": {key: "old"}}
    jsonpatch.apply_patch(
        document, [{"op": "replace", "path": f"/annotations/{token}", "value": "new"}], True
    )
    assert document == {"annotations": {key: "new"}}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("100m", Decimal("0.1")), ("1", Decimal(1)), ("0.5", Decimal("0.5")),
        (".5", Decimal("0.5")),
        ("256Mi", Decimal(256 * 2**20)), ("1Gi", Decimal(2**30)), ("1G", Decimal(10**9)),
        ("2k", Decimal(2000)), ("1e3", Decimal(1000)), ("1E3", Decimal(1000)),
        ("5e-1", Decimal("0.5")), ("1E", Decimal(10**18)), ("0", Decimal(0)), ("3.", Decimal(3)),
    ],
)  # fmt: skip
def test_quantities_kubernetes_accepts(text: str, value: Decimal) -> None:
    assert quantity_value(text) == value


@pytest.mark.parametrize(
    "text",
    ["", "-1", "+1", "1K", "1MB", "1gi", "1 Gi", "Gi", "1.2.3", "1e", "1e999", "1Mi ", "0x10",
     "1" * 65, "half", "∞"],
)  # fmt: skip
def test_quantities_kubernetes_refuses(text: str) -> None:
    assert quantity_value(text) is None


def test_annotations_override_defaults_and_empty_removes_one() -> None:
    defaults = InjectDefaults(env_secret="keys", resources={**DEFAULT_RESOURCES, "cpu-limit": "1"})
    options, warnings = options_for(
        {"ringside.fightclub.pro/cpu-limit": "", "ringside.fightclub.pro/env-secret": ""},
        defaults,
    )
    assert options.resources == {"requests": {"cpu": "100m", "memory": "96Mi"},
                                 "limits": {"memory": "256Mi"}}  # fmt: skip
    assert options.env_secret is None
    assert warnings == []


def test_every_bad_annotation_is_named_at_once() -> None:
    with pytest.raises(OptionError) as caught:
        options_for(
            {"ringside.fightclub.pro/cpu-request": "lots", "ringside.fightclub.pro/image": ""},
            InjectDefaults(),
        )
    assert "ringside.fightclub.pro/cpu-request: 'lots'" in str(caught.value)
    assert "ringside.fightclub.pro/image: ''" in str(caught.value)


def test_a_request_above_an_annotated_limit_names_both() -> None:
    with pytest.raises(
        OptionError, match=r"cpu-request 2 is above ringside.fightclub.pro/cpu-limit 500m$"
    ):
        options_for(
            {"ringside.fightclub.pro/cpu-request": "2", "ringside.fightclub.pro/cpu-limit": "500m"},
            InjectDefaults(),
        )  # fmt: skip


def test_defaults_are_checked_like_annotations() -> None:
    assert InjectDefaults().problems() == []
    bad = InjectDefaults(config_map="Routing", resources={**DEFAULT_RESOURCES, "cpu-limit": "x"})
    assert len(bad.problems()) == 2


ODD_VALUES: list[Any] = [None, 0, "x", True, [], {}, [1], [None], ["x"], {"name": 1}, [{}]]
PLACES = [
    ("metadata",), ("metadata", "annotations"), ("spec",), ("spec", "containers"),
    ("spec", "containers", 0), ("spec", "containers", 0, "env"),
    ("spec", "containers", 0, "env", 0),
    ("spec", "containers", 0, "ports"), ("spec", "containers", 0, "ports", 0),
    ("spec", "containers", 0, "name"), ("spec", "initContainers"), ("spec", "initContainers", 0),
    ("spec", "initContainers", 0, "restartPolicy"), ("spec", "volumes"), ("spec", "volumes", 0),
    ("spec", "volumes", 0, "name"),
]  # fmt: skip


@pytest.mark.parametrize("place", PLACES, ids=lambda p: ".".join(map(str, p)))
def test_any_shape_is_a_decision_or_malformed_and_a_patch_always_applies(
    place: tuple[str | int, ...],
) -> None:
    base = app_pod(INJECT, initContainers=[{"name": "migrate", "image": "m:1"}])
    for value in ODD_VALUES:
        pod = copy.deepcopy(base)
        target: Any = pod
        for key in place[:-1]:
            target = target[key]
        target[place[-1]] = value
        try:
            decision = decide(pod, InjectDefaults())
        except MalformedPod:
            continue  # answered 400; any other exception would be a 500
        assert isinstance(decision, Decision)
        if decision.patch:
            jsonpatch.apply_patch(pod, decision.patch)  # every path exists or is addable


def test_a_pod_without_the_annotation_is_not_inspected_beyond_its_shape() -> None:
    assert decide(app_pod(), InjectDefaults()) == Decision("skipped")
    assert decide(app_pod({"ringside.fightclub.pro/inject": "false"}), InjectDefaults()).patch == []

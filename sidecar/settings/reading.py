"""Reading a config: YAML text → data with `${ENV}` expanded and valid against the config's JSON
Schema (`schema.json`), with problems that name the file, line and key path. What the data
builds is `sidecar.settings.building`."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Mapping, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

import yaml

from sidecar.schema_compiler import Predicate, compile_predicate, trusted_matcher

if TYPE_CHECKING:
    import jsonschema

KeyPath = tuple[str | int, ...]
SECRET_PATHS = frozenset({("admin", "token"), ("admin", "metrics_token")})  # never echoed
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


class Located:
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
    if isinstance(value, dt.date):  # YAML reads `api_version: 2024-10-21` as a date: no field is
        return value.isoformat()  # one, so it is the text the file holds (as if quoted)
    return value


def _compose(text: str, loader_class: Any) -> tuple[yaml.Node | None, Any]:
    loader = loader_class(text)
    try:
        root = loader.get_single_node()
        return root, (loader.construct_document(root) if root is not None else {})
    finally:
        loader.dispose()


_FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, when PyYAML has it


def read_config(text: str, source: str, env: Mapping[str, str]) -> tuple[dict[str, Any], Located]:
    """YAML text → the data with `${ENV}` expanded and checked against the config schema, and
    where each key is in the file. Raises ConfigError, naming file, line and key path."""
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
    where = Located(source, root)
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
        return data, where
    errors = sorted(_validator().iter_errors(data), key=lambda e: [str(p) for p in e.path])
    if errors and _coerce_expanded(data, errors, raw):
        errors = sorted(_validator().iter_errors(data), key=lambda e: [str(p) for p in e.path])
    if errors:
        raise ConfigError(
            [where.problem(path, message) for e in errors for path, message in _schema_problems(e)]
        )
    return data, where


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

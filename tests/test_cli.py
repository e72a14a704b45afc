"""The `ringside` command line (SPEC 7): check-config exit codes, keys new, and the reference
config/ringside.yaml (valid with no environment, every schema field present)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import openai_config
from tests.procs import SidecarProcess
from tests.support import HELLO, REPO_ROOT, post_chat, request, ringside, start_sidecar
from tests.upstreams.openai_fake import FakeOpenAI

DEMO = REPO_ROOT / "config" / "demo.yaml"
REFERENCE = REPO_ROOT / "config" / "ringside.yaml"
SCHEMA = REPO_ROOT / "sidecar" / "settings" / "schema.json"


def test_check_config_of_a_good_file_exits_0_with_a_one_line_summary() -> None:
    result = ringside("check-config", str(DEMO))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"ok: {DEMO}:")
    assert "4 models" in lines[0] and "3 slots" in lines[0]


def test_check_config_of_a_bad_file_exits_non_zero_with_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("storage: {backend: mongo}\n")
    result = ringside("check-config", str(path))
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.startswith(f"{path}:1: storage.backend: ")


def test_check_config_of_a_missing_file_exits_non_zero(tmp_path: Path) -> None:
    result = ringside("check-config", str(tmp_path / "absent.yaml"))
    assert result.returncode != 0
    assert "absent.yaml" in result.stderr and "cannot read" in result.stderr


def test_check_config_warns_about_an_unset_provider_key_but_passes(tmp_path: Path) -> None:
    path = tmp_path / "ringside.yaml"
    path.write_text(yaml.safe_dump(openai_config("http://127.0.0.1:9/v1")))
    result = ringside("check-config", str(path))
    assert result.returncode == 0
    assert "warning:" in result.stderr and "TEST_OPENAI_KEY is not set" in result.stderr


EXPOSED = "admin.metrics_token: not set, and the admin listener"


def check_admin_exposure(tmp_path: Path, listen_admin: str, **admin: str) -> str:
    """check-config's stderr for the fake-upstream config with this admin listener/section."""
    config = openai_config("http://127.0.0.1:9/v1", listen={"admin": listen_admin})
    if admin:
        config["admin"] = admin
    path = tmp_path / "ringside.yaml"
    path.write_text(yaml.safe_dump(config))
    result = ringside("check-config", str(path), env={"TEST_OPENAI_KEY": "sk-unused"})
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_check_config_warns_when_metrics_are_open_off_loopback(tmp_path: Path) -> None:
    stderr = check_admin_exposure(tmp_path, "0.0.0.0:8788")
    [line] = [line for line in stderr.splitlines() if EXPOSED in line]
    assert line.startswith("warning: ") and "0.0.0.0:8788" in line
    assert "customer ids" in line and "k8s/monitoring/networkpolicy.yaml" in line


def test_check_config_is_quiet_with_a_metrics_token_or_a_loopback_admin(tmp_path: Path) -> None:
    assert EXPOSED not in check_admin_exposure(tmp_path, "0.0.0.0:8788", metrics_token="m" * 32)
    assert EXPOSED not in check_admin_exposure(tmp_path, "127.0.0.1:8788")


def test_serve_warns_once_at_startup_when_metrics_are_open_off_loopback(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    proc = SidecarProcess(
        openai_config(fake_openai.url),
        {"TEST_OPENAI_KEY": "sk-unused"},
        str(tmp_path),
        extra_args=["--admin-host", "0.0.0.0"],  # the last --admin-host wins
    ).start()
    try:
        for _ in range(3):
            assert request(proc.admin_url, "GET", "/metrics").status == 200
        post_chat(proc, {"model": "fc:openai/gpt-4o-mini", "messages": HELLO})
        warnings = [line for line in proc.stderr().splitlines() if EXPOSED in line]
        assert len(warnings) == 1 and "WARNING" in warnings[0], proc.stderr()
    finally:
        proc.stop()


def test_serve_on_a_loopback_admin_listener_does_not_warn(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(openai_config(fake_openai.url))  # --admin-host 127.0.0.1
    assert request(proc.admin_url, "GET", "/metrics").status == 200
    assert EXPOSED not in proc.stderr()


def test_installed_ringside_script_is_the_same_program() -> None:
    script = Path(sys.executable).parent / "ringside"
    if not script.exists():
        pytest.skip("the package is not installed in this interpreter's environment")
    result = subprocess.run(
        [str(script), "check-config", str(DEMO)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert result.stdout == ringside("check-config", str(DEMO)).stdout


def test_unknown_subcommand_exits_non_zero() -> None:
    result = ringside("frobnicate")
    assert result.returncode != 0
    assert "usage: ringside" in result.stderr


# -- keys new --------------------------------------------------------------------------------


def new_key(key_id: str) -> tuple[str, dict[str, Any]]:
    result = ringside("keys", "new", "--id", key_id)
    assert result.returncode == 0, result.stderr
    secret = re.search(r"^key \(shown once[^:]*\): (\S+)$", result.stdout, re.M)
    line = re.search(r"^(\s*- \{.*\})$", result.stdout, re.M)
    assert secret is not None and line is not None, result.stdout
    return secret.group(1), yaml.safe_load(line.group(1))[0]


def test_keys_new_prints_a_fresh_key_each_time() -> None:
    first, _ = new_key("app1")
    second, _ = new_key("app1")
    assert first != second
    assert len(first) >= 32


def test_keys_new_config_line_authenticates_its_key(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    secret, entry = new_key("billing")
    assert entry["id"] == "billing"
    proc = sidecar_factory(openai_config(fake_openai.url, keys=[entry]))
    body = {"model": "fc:openai/gpt-4o-mini", "messages": HELLO}
    assert post_chat(proc, body, {"Authorization": f"Bearer {secret}"}).status == 200
    assert post_chat(proc, body, {"Authorization": f"Bearer {secret}x"}).status == 401
    line = [r for r in proc.access_log() if r["status"] == 200]
    assert line and line[0]["key_id"] == "billing"
    assert secret not in proc.stdout()


# -- the reference config --------------------------------------------------------------------


def test_reference_config_is_valid_with_no_environment() -> None:
    result = ringside("check-config", str(REFERENCE), env={})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: {REFERENCE}:")
    problems = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert problems == []


def _child(owner: str, name: str) -> str:
    return f"{owner}.{name}" if owner else name


def _fields(schema: dict[str, Any]) -> dict[str, set[str]]:
    """Object fields of the schema, grouped by owner: a $defs name, or the top-level section."""
    owners: dict[str, set[str]] = {}

    def walk(node: Any, owner: str) -> None:
        if not isinstance(node, dict):
            return
        if "$ref" in node:
            return  # a $def: walked once under its own name below
        for key in ("oneOf", "anyOf", "allOf"):
            for sub in node.get(key, []):
                walk(sub, owner)
        for name, sub in node.get("properties", {}).items():
            if sub.get("deprecated") is True:
                continue  # still read, for old configs; the reference shows what replaced it
            owners.setdefault(owner, set()).add(name)
            walk(sub, _child(owner, name) if "$ref" not in sub else owner)
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], owner + ".*")
        if isinstance(node.get("items"), dict):
            walk(node["items"], owner + "[]")

    walk(schema, "")
    for name, definition in schema["$defs"].items():
        walk(definition, "#" + name)
    return owners


def _present(schema: dict[str, Any], config: Any) -> dict[str, set[str]]:
    """The same grouping for the fields the config actually sets."""
    found: dict[str, set[str]] = {}

    def resolve(node: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[1]
            return schema["$defs"][name], "#" + name
        return node, None

    def walk(node: dict[str, Any], value: Any, owner: str) -> None:
        node, named = resolve(node)
        owner = named or owner
        for key in ("oneOf", "anyOf", "allOf"):
            for sub in node.get(key, []):
                walk(sub, value, owner)
        if isinstance(value, dict):
            properties = node.get("properties", {})
            for name, item in value.items():
                if name in properties:
                    found.setdefault(owner, set()).add(name)
                    sub = properties[name]
                    walk(sub, item, _child(owner, name) if "$ref" not in sub else owner)
                elif isinstance(node.get("additionalProperties"), dict):
                    walk(node["additionalProperties"], item, owner + ".*")
        elif isinstance(value, list) and isinstance(node.get("items"), dict):
            for item in value:
                walk(node["items"], item, owner + "[]")

    walk(schema, config, "")
    return found


def test_reference_config_sets_every_schema_field() -> None:
    schema = json.loads(SCHEMA.read_text())
    text = REFERENCE.read_text()
    expected, present = _fields(schema), _present(schema, yaml.safe_load(text))
    missing = {
        f"{owner}:{name}"
        for owner, names in expected.items()
        for name in names - present.get(owner, set())
    }
    # An addon must be importable (check-config imports it), a provider's TLS files must exist:
    # the reference shows them in comments.
    commented = {"addons[]:path", "addons[]:options", "#provider:tls"} | {
        f"#provider.tls:{name}" for name in ("ca_file", "cert_file", "key_file")
    }
    assert missing == commented
    assert re.search(r"^#.*\{path: \S+:\S+, options: \{", text, re.M)
    assert re.search(r"^\s*# tls: \{ca_file: \S+, cert_file: \S+, key_file: \S+\}", text, re.M)


def test_reference_config_comments_every_field() -> None:
    lines = REFERENCE.read_text().splitlines()
    names = {name for names in _fields(json.loads(SCHEMA.read_text())).values() for name in names}
    # of addons and a provider's tls, shown only in a commented example (see above)
    names -= {"path", "tls", "ca_file", "cert_file", "key_file"}

    def explained(name: str) -> bool:
        for number, line in enumerate(lines):
            if re.search(rf"(^|[\s{{,]){re.escape(name)}:", line.split("#")[0]) and (
                "#" in line or lines[number - 1].lstrip().startswith("#")
            ):
                return True
        return False

    assert sorted(name for name in names if not explained(name)) == []


@pytest.fixture
def reference_sidecar(tmp_path: Path) -> Iterator[SidecarProcess]:
    proc = start_sidecar(tmp_path, REFERENCE.read_text(), env={"OPENAI_API_KEY": "sk-unused"})
    proc.start()
    yield proc
    proc.stop(signal.SIGINT)  # no shutdown.delay_seconds: the reference's 5 s are for pods


def test_reference_config_serves(reference_sidecar: SidecarProcess) -> None:
    assert request(reference_sidecar.admin_url, "GET", "/readyz").status == 200
    answer = request(reference_sidecar.url, "GET", "/v1/models")
    assert answer.status == 401  # keys are configured

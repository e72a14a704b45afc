"""Configuration errors name the file, the line and the key path; `${ENV}` expands; open mode is
refused off loopback (SPEC 5). Checked the way a user meets them: `ringside check-config`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.providers import SUPPORTED_KINDS
from tests.conftest import openai_config
from tests.procs import SidecarProcess
from tests.support import HELLO, REPO_ROOT, ringside, sdk
from tests.upstreams.openai_fake import FakeOpenAI

BASE = """\
storage: {backend: memory}
providers:
  openai:
    kind: openai
    base_url: http://127.0.0.1:9/v1
models:
  fc:openai/gpt-4o-mini: {input_per_mtok: 0.15, output_per_mtok: 0.6}
"""


def check(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> tuple[int, str, Path]:
    path = tmp_path / "ringside.yaml"
    path.write_text(text)
    result = ringside("check-config", str(path), env=env)
    return result.returncode, result.stderr, path


def line_of(text: str, marker: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if marker in line)


def assert_refused(tmp_path: Path, text: str, marker: str, key_path: str, words: str) -> None:
    """check-config exits non-zero with `FILE:LINE: KEY.PATH: ...WORDS...`."""
    code, stderr, path = check(tmp_path, text)
    assert code != 0
    expected = f"{path}:{line_of(text, marker)}: {key_path}: "
    lines = [line for line in stderr.splitlines() if line.startswith(expected)]
    assert lines, f"no line starting {expected!r} in:\n{stderr}"
    assert words in lines[0], lines[0]


def test_schema_error_names_file_line_and_key_path(tmp_path: Path) -> None:
    text = BASE.replace("    kind: openai\n", "    kind: openai\n    timeout: {read: -1}\n")
    assert_refused(tmp_path, text, "timeout:", "providers.openai.timeout.read", "-1")


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    text = BASE.replace("    kind: openai\n", "    kind: openai\n    retries: many\n")
    assert_refused(tmp_path, text, "retries:", "providers.openai.retries", "not of type")


def test_unknown_key_is_named_at_its_own_line(tmp_path: Path) -> None:
    text = BASE.replace("    kind: openai\n", "    kind: openai\n    timout: {read: 3}\n")
    assert_refused(tmp_path, text, "timout", "providers.openai.timout", "unknown key")


def test_unknown_top_level_section_is_named(tmp_path: Path) -> None:
    text = BASE + "ratelimits: {ip: {rpm: 5}}\n"
    assert_refused(tmp_path, text, "ratelimits", "ratelimits", "rate_limits")


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    text = BASE + "slots:\n  chat: [fc:openai/gpt-4o-mini\nlimits: {}\n"
    code, stderr, path = check(tmp_path, text)
    assert code != 0
    assert stderr.startswith(f"{path}:")
    line = int(stderr.split(":")[1])
    assert line in (line_of(text, "chat:"), line_of(text, "limits:"))
    assert "not valid YAML" in stderr


def test_unknown_provider_in_models_is_named(tmp_path: Path) -> None:
    text = BASE + "  fc:anthropic/claude: {input_per_mtok: 1, output_per_mtok: 5}\n"
    assert_refused(tmp_path, text, "fc:anthropic", "models.fc:anthropic/claude", "anthropic")


def test_unknown_provider_in_slots_is_named(tmp_path: Path) -> None:
    text = BASE + "slots:\n  chat:\n    - fc:openai/gpt-4o-mini\n    - fc:ghost/model\n"
    assert_refused(tmp_path, text, "fc:ghost", "slots.chat[1]", "unknown provider")


def test_slot_cycle_is_refused_naming_the_loop(tmp_path: Path) -> None:
    text = BASE + "slots:\n  a: [fc:openai/gpt-4o-mini, slot:b]\n  b: slot:a\n"
    code, stderr, path = check(tmp_path, text)
    assert code != 0
    assert f"{path}:{line_of(text, 'a: [')}: slots.a[1]: " in stderr
    assert "loop" in stderr and "a → b → a" in stderr


def test_slot_naming_an_undefined_slot_is_refused(tmp_path: Path) -> None:
    text = BASE + "slots:\n  chat: slot:missing\n"
    assert_refused(tmp_path, text, "chat:", "slots.chat", "slot:missing is not defined")


def test_missing_env_names_the_variable_and_key(tmp_path: Path) -> None:
    text = BASE.replace("http://127.0.0.1:9/v1", "${UPSTREAM_BASE_URL}")
    assert_refused(tmp_path, text, "base_url", "providers.openai.base_url", "${UPSTREAM_BASE_URL}")


def test_env_given_satisfies_the_reference(tmp_path: Path) -> None:
    text = BASE.replace("http://127.0.0.1:9/v1", "${UPSTREAM_BASE_URL}")
    code, stderr, _ = check(tmp_path, text, env={"UPSTREAM_BASE_URL": "http://127.0.0.1:1/v1"})
    assert code == 0, stderr


def test_env_expanding_to_an_invalid_value_is_a_schema_error(tmp_path: Path) -> None:
    text = BASE.replace("http://127.0.0.1:9/v1", "${UPSTREAM_BASE_URL:-ftp://nowhere}")
    assert_refused(tmp_path, text, "base_url", "providers.openai.base_url", "ftp://nowhere")


def test_kind_without_an_adapter_is_refused(tmp_path: Path) -> None:
    schema = json.loads((REPO_ROOT / "sidecar/settings/schema.json").read_text())
    kinds = schema["$defs"]["provider"]["properties"]["kind"]["enum"]
    missing = sorted(set(kinds) - SUPPORTED_KINDS)
    if not missing:
        pytest.skip("every kind of SPEC 5 has an adapter")
    text = BASE.replace("kind: openai", f"kind: {missing[0]}")
    assert_refused(tmp_path, text, "kind:", "providers.openai.kind", "no adapter")


def test_rewrite_of_an_unknown_slot_is_refused(tmp_path: Path) -> None:
    text = BASE + "rewrite:\n  slot:nope: {drop: [seed]}\n"
    assert_refused(tmp_path, text, "slot:nope", "rewrite.slot:nope", "no slot named 'nope'")


def test_every_problem_is_reported_one_per_line(tmp_path: Path) -> None:
    text = BASE.replace("    kind: openai\n", "    kind: openai\n    retries: -1\n") + (
        "limits: {max_body_bytes: 10}\n"
    )
    code, stderr, _ = check(tmp_path, text)
    assert code != 0
    assert "providers.openai.retries" in stderr and "limits.max_body_bytes" in stderr
    assert len(stderr.strip().splitlines()) == 2


def test_open_mode_is_refused_on_a_non_loopback_listener(tmp_path: Path) -> None:
    text = "listen: {api: 0.0.0.0:8787}\n" + BASE
    assert_refused(tmp_path, text, "listen:", "listen.api", "open mode")


def test_keys_allow_a_non_loopback_listener(tmp_path: Path) -> None:
    text = "listen: {api: 0.0.0.0:8787}\n" + BASE + f"keys:\n  - {{id: a, sha256: {'ab' * 32}}}\n"
    code, stderr, _ = check(tmp_path, text)
    assert code == 0, stderr


def test_serve_refuses_open_mode_on_a_non_loopback_host(tmp_path: Path) -> None:
    path = tmp_path / "ringside.yaml"
    path.write_text(BASE)
    result = ringside("serve", "--config", str(path), "--host", "0.0.0.0", "--port", "1")
    assert result.returncode != 0
    assert "open mode" in result.stderr and "0.0.0.0" in result.stderr


def test_env_and_env_defaults_expand_in_a_running_sidecar(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    config = openai_config("${FAKE_BASE_URL}")
    config["providers"]["openai"]["headers"] = {
        "X-Team": "${TEAM_NAME:-platform}",
        "X-Deploy": "${DEPLOY_ENV:-dev}",
        "X-Empty": "[${NOTHING:-}]",
    }
    proc = sidecar_factory(config, env={"FAKE_BASE_URL": fake_openai.url, "DEPLOY_ENV": "prod"})
    sdk(proc).chat.completions.create(model="fc:openai/gpt-4o-mini", messages=HELLO)
    headers = fake_openai.received[0].headers
    assert (headers["X-Team"], headers["X-Deploy"], headers["X-Empty"]) == (
        "platform",
        "prod",
        "[]",
    )


def test_env_expansion_gives_numbers_and_booleans_where_the_schema_wants_them(
    tmp_path: Path,
) -> None:
    from sidecar.settings import parse_settings

    text = (
        "storage: {backend: memory, fail_open: '${FAIL_OPEN}'}\n"
        "providers:\n"
        "  openai: {kind: openai, retries: '${RETRIES:-2}', timeout: {read: '${READ}'},\n"
        "           headers: {X-Org: '${ORG}'}}\n"
    )
    env = {"FAIL_OPEN": "true", "READ": "12.5", "ORG": "123"}
    settings = parse_settings(text, "env.yaml", env)
    provider = settings.providers["openai"]
    assert provider.retries == 2
    assert provider.timeout.read == 12.5
    assert settings.storage.fail_open is True
    assert provider.headers["X-Org"] == "123"  # a string field keeps the digits as text


def test_what_the_file_leaves_out_takes_the_dataclass_defaults() -> None:
    from sidecar.settings import parse_settings
    from sidecar.settings.model import Budget, Limits, Listen, ProviderSettings, Shutdown

    text = (
        "storage: {backend: memory}\n"
        "providers:\n  openai: {kind: openai}\n"
        "keys: [{id: app, sha256: '" + "0" * 64 + "', budget: {usd: 5}}]\n"
    )
    settings = parse_settings(text, "defaults.yaml", {})
    assert settings.listen == Listen()
    assert settings.limits == Limits()
    assert settings.shutdown == Shutdown()
    assert settings.providers["openai"] == ProviderSettings("openai", "openai", None, None)
    assert settings.keys[0].revoked is False
    assert settings.keys[0].budget == Budget(5.0)


def test_env_expansion_that_is_not_a_number_is_still_a_clear_error() -> None:
    from sidecar.settings import ConfigError, parse_settings

    text = "providers:\n  openai: {kind: openai, retries: '${RETRIES}'}\n"
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, "env.yaml", {"RETRIES": "many"})
    assert "env.yaml:2: providers.openai.retries: 'many' is not of type 'integer'" in str(
        caught.value
    )


# -- admin: the admin listener's tokens ------------------------------------------------------


def test_admin_tokens_are_read_stripped_and_empty_means_unset() -> None:
    from sidecar.settings import parse_settings

    text = BASE + "admin: {token: '  ${ADMIN_FROM_ENV}', metrics_token: '${UNSET_METRICS:-}'}\n"
    env = {"ADMIN_FROM_ENV": "from-env-0123456789abcdef\n"}  # a Secret written with `echo`
    settings = parse_settings(text, "admin.yaml", env)
    assert settings.admin.token == b"from-env-0123456789abcdef"
    assert settings.admin.token_source == "admin.token"
    assert settings.admin.metrics_token is None


def test_admin_token_falls_back_to_the_environment_variable() -> None:
    from sidecar.settings import parse_settings

    env = {"RINGSIDE_ADMIN_TOKEN": "env-token-0123456789abcdef\n"}
    settings = parse_settings(BASE, "admin.yaml", env)
    assert settings.admin.token == b"env-token-0123456789abcdef"
    assert settings.admin.token_source == "RINGSIDE_ADMIN_TOKEN"
    assert parse_settings(BASE, "admin.yaml", {}).admin.token is None


def test_admin_tokens_are_not_in_the_settings_repr() -> None:
    from sidecar.settings import parse_settings

    text = BASE + "admin: {token: secret-admin-0123456789, metrics_token: secret-scrape-0123456}\n"
    shown = repr(parse_settings(text, "admin.yaml", {}))
    assert "secret-admin" not in shown and "secret-scrape" not in shown


def test_a_metrics_token_with_a_space_is_refused_without_showing_it(tmp_path: Path) -> None:
    text = BASE + "admin:\n  metrics_token: 'two words-0123456789'\n"
    assert_refused(tmp_path, text, "metrics_token", "admin.metrics_token", "printable ASCII")
    assert "two words" not in check(tmp_path, text)[1]


def test_an_admin_token_of_the_wrong_type_is_refused_without_showing_it(tmp_path: Path) -> None:
    text = BASE + "admin:\n  token: 918273645546372819\n"
    assert_refused(tmp_path, text, "token:", "admin.token", "the value is not of type 'string'")
    assert "918273645546372819" not in check(tmp_path, text)[1]


def test_an_unset_variable_in_an_admin_token_is_named(tmp_path: Path) -> None:
    text = BASE + "admin:\n  metrics_token: ${RINGSIDE_METRICS_TOKEN}\n"
    assert_refused(
        tmp_path, text, "metrics_token", "admin.metrics_token", "${RINGSIDE_METRICS_TOKEN}"
    )


def test_a_short_or_shared_admin_token_is_a_warning(tmp_path: Path) -> None:
    text = BASE + "admin: {token: same-token-0123456789, metrics_token: same-token-0123456789}\n"
    code, stderr, _ = check(tmp_path, text)
    assert code == 0, stderr
    assert "admin.metrics_token: is the same as the admin token (admin.token)" in stderr
    code, stderr, _ = check(tmp_path, BASE + "admin: {metrics_token: qz7k}\n")
    assert code == 0 and "admin.metrics_token: 4 characters are easy to guess" in stderr
    assert "qz7k" not in stderr

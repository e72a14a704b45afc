"""A provider's egress settings at config load (`ringside check-config`): headers the gateway
sets itself, or that hold a line break, are refused with their key path; so are a proxy URL
the client cannot use and TLS files that do not exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_config import BASE, assert_refused, check


@pytest.mark.parametrize("name", ["Host", "content-length", "Transfer-Encoding", "Connection"])
def test_a_header_the_gateway_sets_is_refused(tmp_path: Path, name: str) -> None:
    text = (
        BASE
        + f"""\
rewrite:
  provider:openai:
    headers: {{{name}: x}}
"""
    )
    assert_refused(tmp_path, text, "headers:", f"rewrite.provider:openai.headers.{name}", "set by")


def test_a_provider_header_value_with_a_line_break_is_refused(tmp_path: Path) -> None:
    text = BASE.replace("    base_url:", '    headers: {X-Team: "a\\r\\nX-Evil: 1"}\n    base_url:')
    assert_refused(tmp_path, text, "headers:", "providers.openai.headers.X-Team", "CR, LF")


def test_a_socks_proxy_is_refused(tmp_path: Path) -> None:
    text = BASE.replace("    base_url:", "    proxy: socks5://p:1080\n    base_url:")
    assert_refused(tmp_path, text, "proxy:", "providers.openai.proxy", "unsupported proxy")


def test_a_missing_ca_file_is_refused(tmp_path: Path) -> None:
    text = BASE.replace("    base_url:", "    tls: {ca_file: /nonexistent.pem}\n    base_url:")
    assert_refused(tmp_path, text, "tls:", "providers.openai.tls", "/nonexistent.pem")


def test_proxy_none_and_max_connections_load(tmp_path: Path) -> None:
    text = BASE.replace(
        "    base_url:",
        "    proxy: none\n    max_connections: 4\n    timeout: {pool: 1}\n    base_url:",
    )
    code, stderr, _ = check(tmp_path, text)
    assert code == 0, stderr

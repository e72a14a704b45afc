"""The `shutdown` section (SPEC 5, 8): its defaults, inside a Kubernetes pod and elsewhere, and
`limits.drain_seconds`, its old name, still read with a warning."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import ringside

CONFIG = "storage: {backend: memory}\nproviders: {m: {kind: mock}}\n"


def test_delay_defaults_to_5_seconds_in_a_kubernetes_pod_and_to_0_elsewhere() -> None:
    from sidecar.settings import parse_settings

    pod = parse_settings(CONFIG, "c.yaml", {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}).shutdown
    laptop = parse_settings(CONFIG, "c.yaml", {}).shutdown
    assert (pod.delay_seconds, pod.grace_seconds) == (5, 20)
    assert (laptop.delay_seconds, laptop.grace_seconds) == (0, 20)


def test_limits_drain_seconds_is_read_as_the_grace_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG + "limits: {drain_seconds: 7}\n")

    result = ringside("check-config", str(path))

    assert result.returncode == 0, result.stderr
    assert f"{path}:3: limits.drain_seconds: deprecated: read as shutdown.grace_seconds (7)" in (
        result.stderr
    )
    from sidecar.settings import load_settings

    assert load_settings(str(path)).shutdown.grace_seconds == 7


def test_limits_drain_seconds_beside_grace_seconds_is_ignored_with_a_warning(
    tmp_path: Path,
) -> None:
    from sidecar.settings import load_settings

    path = tmp_path / "c.yaml"
    path.write_text(CONFIG + "limits: {drain_seconds: 7}\nshutdown: {grace_seconds: 3}\n")

    settings = load_settings(str(path))

    assert settings.shutdown.grace_seconds == 3
    assert any("drain_seconds: deprecated and ignored" in w for w in settings.warnings)


@pytest.mark.parametrize("field", ["delay_seconds", "grace_seconds"])
def test_a_negative_shutdown_time_is_refused(tmp_path: Path, field: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG + f"shutdown: {{{field}: -1}}\n")

    result = ringside("check-config", str(path))

    assert result.returncode != 0
    assert f"shutdown.{field}" in result.stderr

"""Usage reporting: one record per request, the admin usage endpoint, `ringside usage export`
as CSV and JSONL, and the budget gauges of /metrics."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.procs import SidecarProcess
from tests.support import metric, metric_samples, post_chat, request, ringside
from tests.test_budget import (
    ADMIN_ENV,
    ADMIN_TOKEN,
    ANSWER,
    BODY,
    PRICED,
    budget_config,
    nano,
    settled_usage,
)
from tests.upstreams.openai_fake import FakeOpenAI, Reply

MINI = "fc:openai/gpt-4o-mini"  # 100 x $0.15/M + 50 x $0.60/M = $0.000045
KEY = "rk_usage_tests"
AUTH = {"Authorization": f"Bearer {KEY}"}


def keyed_config(upstream: str, storage: dict[str, Any]) -> dict[str, Any]:
    config = budget_config(upstream, storage, acme=0.001)
    config["keys"] = [
        {"id": "app1", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "developer": "alice"}
    ]
    return config


def next_month() -> str:
    today = dt.datetime.now(dt.UTC).date()
    first = dt.date(today.year + today.month // 12, today.month % 12 + 1, 1)
    return f"{first.isoformat()}T00:00:00Z"


def get_usage(proc: SidecarProcess, customer: str, token: str | None = ADMIN_TOKEN) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return request(proc.admin_url, "GET", f"/v1/customers/{customer}/usage", headers=headers)


def test_usage_endpoint_is_disabled_without_an_admin_token(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(budget_config(fake_openai.url, {"backend": "memory"}, acme=1.0))

    answer = get_usage(proc, "acme")

    assert answer.status == 403
    assert answer.error["code"] == "admin_disabled"
    assert "RINGSIDE_ADMIN_TOKEN" in answer.error["message"]


def test_usage_endpoint_rejects_a_wrong_or_missing_admin_token(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(budget_config(fake_openai.url, {"backend": "memory"}), ADMIN_ENV)

    assert get_usage(proc, "acme", "not-the-token").status == 401
    missing = get_usage(proc, "acme", None)
    assert missing.status == 401 and missing.error["code"] == "invalid_api_key"
    bad = get_usage(proc, "bad%20id")
    assert bad.status == 400 and bad.error["code"] == "invalid_request"


def test_usage_endpoint_reports_budget_requests_tokens_and_models(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    fake_openai.on_model("priced", ANSWER)
    fake_openai.on_model("gpt-4o-mini", ANSWER)
    config = budget_config(fake_openai.url, {"backend": "memory"}, acme=0.001)
    proc = sidecar_factory(config, ADMIN_ENV)
    for body in (BODY, BODY, {**BODY, "model": MINI}):
        assert post_chat(proc, body, {"FC-Customer": "acme"}).status == 200
    refused = post_chat(proc, {**BODY, "max_tokens": 1000}, {"FC-Customer": "acme"})
    assert refused.status == 402

    report = settled_usage(proc, "acme", 4)

    assert report["customer"] == "acme" and report["period"] == "month"
    assert report["resets_at"] == next_month()
    assert report["limit_usd"] == 0.001
    assert nano(report["spent_usd"]) == 445_000
    assert nano(report["remaining_usd"]) == 555_000
    assert report["reserved_usd"] == 0
    assert (report["requests"], report["errors"]) == (4, 1)
    assert report["tokens"] == {"input": 300, "output": 150, "total": 450}
    assert nano(report["cost_usd"]) == 445_000
    assert report["models"] == [
        {"model": PRICED, "requests": 2, "tokens_in": 200, "tokens_out": 100, "cost_usd": 0.0004},
        {"model": MINI, "requests": 1, "tokens_in": 100, "tokens_out": 50, "cost_usd": 0.000045},
        {"model": None, "requests": 1, "tokens_in": 0, "tokens_out": 0, "cost_usd": 0.0},
    ]


def test_usage_of_a_customer_without_budget_has_no_limit(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    fake_openai.on_model("priced", ANSWER)
    proc = sidecar_factory(budget_config(fake_openai.url, {"backend": "memory"}), ADMIN_ENV)
    assert post_chat(proc, BODY, {"FC-Customer": "free"}).status == 200

    report = settled_usage(proc, "free", 1)

    assert (report["limit_usd"], report["spent_usd"], report["remaining_usd"]) == (None,) * 3
    assert nano(report["cost_usd"]) == 200_000
    assert get_usage(proc, "free").json()["requests"] == 1
    day = request(
        proc.admin_url, "GET", "/v1/customers/free/usage?period=day",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ).json()  # fmt: skip
    assert day["period"] == "day" and day["requests"] == 1


def test_requests_with_a_rejected_key_leave_no_usage_record(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    proc = sidecar_factory(keyed_config(fake_openai.url, {"backend": "memory"}), ADMIN_ENV)

    rejected = post_chat(proc, BODY, {"Authorization": "Bearer wrong", "FC-Customer": "acme"})
    accepted = post_chat(proc, BODY, {**AUTH, "FC-Customer": "acme"})

    assert (rejected.status, accepted.status) == (401, 200)
    assert settled_usage(proc, "acme", 1)["requests"] == 1


def exported(config: Path, *args: str) -> str:
    result = ringside("usage", "export", "--config", str(config), *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_export_writes_every_record_field_as_csv_and_jsonl(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    storage = {"backend": "sqlite", "sqlite_path": str(tmp_path / "usage.db")}
    proc = sidecar_factory(keyed_config(fake_openai.url, storage), ADMIN_ENV)
    fake_openai.script(Reply(status=503), ANSWER, ANSWER)
    cascade = {**BODY, "model": ["fc:openai/gpt-4o", PRICED]}
    headers = {**AUTH, "FC-Customer": "acme"}
    assert post_chat(proc, cascade, {**headers, "X-Request-Id": "req-cascade"}).status == 200
    assert post_chat(proc, BODY, {**AUTH, "X-Request-Id": "req-nocustomer"}).status == 200
    settled_usage(proc, "acme", 1)
    proc.stop()  # the export reads the file, not the sidecar

    rows = list(csv.DictReader(io.StringIO(exported(proc.config_path, "--format", "csv"))))
    lines = exported(proc.config_path, "--format", "jsonl").splitlines()

    assert [r["request_id"] for r in rows] == ["req-cascade", "req-nocustomer"]
    first = rows[0]
    assert first["key_id"] == "app1" and first["dev"] == "alice" and first["customer"] == "acme"
    assert first["refs_tried"] == f"fc:openai/gpt-4o,{PRICED}"
    assert first["ref_used"] == PRICED and first["status"] == "200"
    assert (first["tokens_in"], first["tokens_out"], first["cost_usd"]) == ("100", "50", "0.0002")
    assert first["fallback"] == "true" and first["reprompts"] == "0"
    assert float(first["latency_ms"]) > 0
    assert first["time"].endswith("Z") and first["time"].startswith(str(dt.date.today().year))
    assert rows[1]["customer"] == "" and rows[1]["fallback"] == "false"
    records = [json.loads(line) for line in lines]
    assert records[0]["refs_tried"] == ["fc:openai/gpt-4o", PRICED]
    assert records[0]["cost_usd"] == 0.0002 and records[0]["fallback"] is True
    assert records[1]["customer"] is None and records[1]["request_id"] == "req-nocustomer"


def test_export_filters_by_customer_and_since(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    storage = {"backend": "sqlite", "sqlite_path": str(tmp_path / "usage.db")}
    proc = sidecar_factory(budget_config(fake_openai.url, storage, acme=1.0), ADMIN_ENV)
    for customer in ("acme", "other", "acme"):
        assert post_chat(proc, BODY, {"FC-Customer": customer}).status == 200
    settled_usage(proc, "other", 1)
    proc.stop()

    acme = exported(proc.config_path, "--format", "jsonl", "--customer", "acme").splitlines()
    recent = exported(proc.config_path, "--format", "jsonl", "--since", "1h").splitlines()
    future = exported(proc.config_path, "--format", "csv", "--since", "2999-01-01")

    assert [json.loads(line)["customer"] for line in acme] == ["acme", "acme"]
    assert len(recent) == 3
    assert future.strip().splitlines() == [
        "time,request_id,key_id,dev,customer,refs_tried,ref_used,status,tokens_in,tokens_out,"
        "cost_usd,latency_ms,fallback,reprompts"
    ]


def test_export_of_a_memory_store_explains_where_the_records_are(tmp_path: Path) -> None:
    config = tmp_path / "memory.yaml"
    config.write_text("storage: {backend: memory}\n")

    result = ringside("usage", "export", "--format", "csv", "--config", str(config))

    assert result.returncode == 1
    assert "/v1/customers/{id}/usage" in result.stderr


def test_budget_gauges_follow_spend_and_refusals(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    fake_openai.on_model("priced", ANSWER)
    proc = sidecar_factory(budget_config(fake_openai.url, {"backend": "memory"}, acme=0.0005))
    before = metric_samples(proc)
    for _ in range(3):
        post_chat(proc, BODY, {"FC-Customer": "acme"})

    after = metric_samples(proc)

    assert metric(before, "ringside_budget_limit_usd", customer="acme") == 0.0005
    assert metric(after, "ringside_budget_spent_usd", customer="acme") == 0.0004
    assert metric(after, "ringside_budget_remaining_usd", customer="acme") == 0.0001
    assert metric(after, "ringside_budget_exceeded_total", customer="acme") == 1


def test_spent_gauge_is_read_from_the_store_at_start(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    fake_openai.on_model("priced", ANSWER)
    storage = {"backend": "sqlite", "sqlite_path": str(tmp_path / "usage.db")}
    proc = sidecar_factory(budget_config(fake_openai.url, storage, acme=1.0))
    assert post_chat(proc, BODY, {"FC-Customer": "acme"}).status == 200
    proc.stop()
    proc.start()

    samples = metric_samples(proc)

    assert metric(samples, "ringside_budget_spent_usd", customer="acme") == 0.0002
    assert metric(samples, "ringside_budget_remaining_usd", customer="acme") == 0.9998

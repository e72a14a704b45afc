"""Prices from the genai-prices data (issue 23): entries without prices filled at load, refs
outside the catalog priced by the data, usage billed whole (cache reads and writes, reasoning,
long-context tiers) exactly as genai-prices' own calculation bills it; `ringside prices` and
check-config's price sources; `prices.auto_update` off the request path."""

from __future__ import annotations

import asyncio
import datetime as dt
import http.server
import json
import logging
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import pytest
import yaml

from sidecar.prices import PriceData, price_book
from sidecar.prices_update import fetch_blocking, update_periodically
from sidecar.providers import PRICE_PROVIDERS
from sidecar.providers.anthropic_answer import TokenCount
from sidecar.providers.base import Usage
from sidecar.providers.bedrock_answer import usage_of as bedrock_usage
from sidecar.providers.gemini_answer import token_usage
from sidecar.providers.openai_responses import responses_usage
from sidecar.routing import Estimate, Router
from sidecar.settings import ConfigError, parse_settings
from sidecar.settings.model import Price, PriceSettings
from tests.conftest import openai_config
from tests.procs import SidecarProcess, wait_until
from tests.support import HELLO, metric, metric_samples, post_chat, request, ringside
from tests.upstreams.openai_fake import FakeOpenAI, Reply

ADMIN_TOKEN = "admin-token-for-prices"
TOLERANCE = 1e-9  # USD
MINI = "fc:openai/gpt-4o-mini"


def bill(price: Price, usage: Usage) -> float:
    return price.usage_cost_usd(usage)


def book_price(kind: str, model: str) -> Price:
    found = price_book([kind], None).lookup(kind, model)
    assert found is not None, f"the price data has no {kind}/{model}"
    return found.price


def genai_cost(kind: str, model: str, usage: Usage, when: dt.datetime) -> Decimal:
    """genai-prices' own calculation of the same usage."""
    counted = genai_prices.Usage(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        cache_write_1h_tokens=usage.cache_write_1h_tokens or None,
        output_reasoning_tokens=usage.reasoning_tokens,
    )
    provider_id = PRICE_PROVIDERS[kind][0]
    calculated = genai_prices.calc_price(
        counted, model, provider_id=provider_id, genai_request_timestamp=when
    )
    return calculated.total_price


def U(
    prompt: int, completion: int, read: int = 0, write: int = 0, reasoning: int = 0, hour: int = 0
) -> Usage:
    """`hour`: the part of `write` written to a one-hour cache."""
    return Usage(prompt, completion, read, write, reasoning, cache_write_1h_tokens=hour)


# (provider kind, model id as a ref names it, usage)
CASES = [
    ("openai", "gpt-4o-mini", U(1200, 300)),
    ("openai", "gpt-4o-mini", U(1200, 300, read=1024)),
    ("openai", "o3-mini", U(5000, 4000, read=2048, reasoning=3500)),
    ("azure", "gpt-4o", U(3000, 500, read=1536)),
    ("anthropic", "claude-sonnet-4-20250514", U(10_000, 800, read=6000, write=3000)),
    ("anthropic", "claude-3-5-haiku-latest", U(2000, 100, write=2000)),
    ("anthropic", "claude-sonnet-4-20250514", U(10_000, 800, read=2000, write=6000, hour=4000)),
    ("anthropic", "claude-opus-4-1", U(3000, 50, write=3000, hour=3000)),
    ("bedrock", "us.anthropic.claude-3-5-haiku-20241022-v1:0", U(4000, 200, read=1000, write=500)),
    ("gemini", "gemini-2.5-pro", U(150_000, 2000, read=100_000, reasoning=1500)),
    ("gemini", "gemini-2.5-pro", U(250_000, 2000, read=100_000, reasoning=1500)),  # > 200k tier
    ("vertex", "gemini-2.5-flash", U(9000, 3000, read=4000, reasoning=2500)),
    ("xai", "grok-4", U(300_000, 1000, read=200_000)),
    ("mistral", "mistral-large-latest", U(700, 90)),
    ("groq", "llama-3.3-70b-versatile", U(700, 90)),
    ("together", "meta-llama/Llama-3.3-70B-Instruct-Turbo", U(700, 90)),
    ("cohere", "command-r-plus", U(700, 90)),
    ("openrouter", "openai/gpt-4o-mini", U(700, 90)),
]


@pytest.mark.parametrize(("kind", "model", "usage"), CASES)
def test_cost_equals_genai_prices_own_calculation(kind: str, model: str, usage: Usage) -> None:
    book = price_book([kind], None)
    found = book.lookup(kind, model)
    assert found is not None
    ours = bill(found.price, usage)
    theirs = genai_cost(kind, model, usage, book.now)
    assert abs(Decimal(repr(ours)) - theirs) <= Decimal(TOLERANCE), (ours, theirs)


def test_the_table_covers_cache_reads_writes_reasoning_and_a_tier() -> None:
    assert any(u.cache_read_tokens for _, _, u in CASES)
    assert any(u.cache_write_tokens for _, _, u in CASES)
    assert any(u.cache_write_1h_tokens for _, _, u in CASES)
    assert any(u.reasoning_tokens for _, _, u in CASES)
    tiered = book_price("gemini", "gemini-2.5-pro")
    assert tiered.tiers and tiered.rates(250_000) is not tiered


def test_a_long_context_call_pays_the_tier_rate_on_every_token() -> None:
    price = book_price("gemini", "gemini-2.5-pro")
    below, above = bill(price, U(200_000, 0)), bill(price, U(200_001, 0))
    assert above > 1.9 * below  # every token at the tier's rate, not only those past 200k


def test_cached_input_costs_less_and_a_cache_write_more_than_plain_input() -> None:
    price = book_price("anthropic", "claude-sonnet-4-20250514")
    plain = bill(price, U(10_000, 0))
    assert bill(price, U(10_000, 0, read=10_000)) < plain < bill(price, U(10_000, 0, write=10_000))


def test_a_one_hour_cache_write_costs_more_than_a_five_minute_one() -> None:
    """Anthropic bills writes to its one-hour cache at 2 x input, to the five-minute one at
    1.25 x: the same tokens, the dearer cache, the higher cost (and within the worst case)."""
    price = book_price("anthropic", "claude-sonnet-4-20250514")
    five = bill(price, U(10_000, 0, write=10_000))
    hour = bill(price, U(10_000, 0, write=10_000, hour=10_000))
    assert hour == pytest.approx(10_000 * 2 * price.input_per_mtok / 1e6)
    assert five == pytest.approx(10_000 * 1.25 * price.input_per_mtok / 1e6)
    assert hour <= price.worst_cost_usd(10_000, 0) + 1e-15


def test_the_worst_case_bounds_any_split_of_the_same_tokens() -> None:
    for kind, model, _ in CASES:
        price = book_price(kind, model)
        worst = price.worst_cost_usd(300_000, 4000)
        for usage in (U(300_000, 4000), U(300_000, 4000, write=300_000),
                      U(300_000, 4000, write=300_000, hour=300_000),
                      U(300_000, 4000, read=150_000, write=150_000, reasoning=4000)):  # fmt: skip
            assert bill(price, usage) <= worst + 1e-15, (kind, model, usage)


def test_a_time_of_day_price_is_charged_at_its_highest() -> None:
    price = book_price("deepseek", "deepseek-chat")
    when = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)  # inside its peak window
    usage = U(1000, 1000, read=500)
    theirs = genai_cost("deepseek", "deepseek-chat", usage, when)
    assert abs(Decimal(repr(bill(price, usage))) - theirs) <= Decimal(TOLERANCE)


# -- usage as each adapter reads it ------------------------------------------------------------


def test_openai_usage_details_are_read_and_the_answer_keeps_its_shape() -> None:
    raw = {"prompt_tokens": 100, "completion_tokens": 40, "total_tokens": 140,
           "prompt_tokens_details": {"cached_tokens": 64},
           "completion_tokens_details": {"reasoning_tokens": 30}}  # fmt: skip
    usage = Usage.from_openai(raw)
    assert usage == Usage(100, 40, cache_read_tokens=64, reasoning_tokens=30)
    assert usage.as_openai() == {"prompt_tokens": 100, "completion_tokens": 40, "total_tokens": 140}


def test_detail_counts_past_their_totals_or_not_numbers_are_bounded_or_ignored() -> None:
    raw = {"prompt_tokens": 10, "completion_tokens": 5,
           "prompt_tokens_details": {"cached_tokens": 99},
           "completion_tokens_details": {"reasoning_tokens": "many"}}  # fmt: skip
    assert Usage.from_openai(raw) == Usage(10, 5, cache_read_tokens=10)


def test_a_compatible_api_reporting_cache_hits_its_own_way_is_read() -> None:
    raw = {"prompt_tokens": 100, "completion_tokens": 4, "prompt_cache_hit_tokens": 80}
    assert Usage.from_openai(raw) == Usage(100, 4, cache_read_tokens=80)


def test_anthropic_cache_reads_and_writes_are_kept_apart() -> None:
    tokens = TokenCount()
    tokens.update({"input_tokens": 10, "cache_read_input_tokens": 300,
                   "cache_creation_input_tokens": 50, "output_tokens": 7})  # fmt: skip
    assert tokens.usage() == Usage(360, 7, cache_read_tokens=300, cache_write_tokens=50)
    assert tokens.as_openai()["prompt_tokens_details"] == {"cached_tokens": 300}


def test_anthropic_one_hour_cache_writes_are_read_from_cache_creation() -> None:
    tokens = TokenCount()
    tokens.update({"input_tokens": 10, "cache_read_input_tokens": 0,
                   "cache_creation_input_tokens": 500, "output_tokens": 7,
                   "cache_creation": {"ephemeral_5m_input_tokens": 200,
                                      "ephemeral_1h_input_tokens": 300}})  # fmt: skip
    assert tokens.usage() == Usage(510, 7, cache_write_tokens=500, cache_write_1h_tokens=300)


def test_bedrock_cache_reads_and_writes_are_kept_apart() -> None:
    counted = bedrock_usage({"inputTokens": 10, "outputTokens": 3, "cacheReadInputTokens": 200,
                             "cacheWriteInputTokens": 40})  # fmt: skip
    assert counted == (Usage(250, 3, cache_read_tokens=200, cache_write_tokens=40), 200)


def test_gemini_cached_content_and_thoughts_are_details_of_its_counts() -> None:
    counted = token_usage({"promptTokenCount": 1000, "cachedContentTokenCount": 600,
                           "candidatesTokenCount": 50, "thoughtsTokenCount": 200})  # fmt: skip
    assert counted is not None
    usage, shown = counted
    assert usage == Usage(1000, 250, cache_read_tokens=600, reasoning_tokens=200)
    assert shown["prompt_tokens_details"] == {"cached_tokens": 600}


def test_responses_usage_details_are_read() -> None:
    usage = responses_usage({"input_tokens": 50, "output_tokens": 20,
                             "input_tokens_details": {"cached_tokens": 32},
                             "output_tokens_details": {"reasoning_tokens": 12}})  # fmt: skip
    assert usage == Usage(50, 20, cache_read_tokens=32, reasoning_tokens=12)


# -- the catalog at load -------------------------------------------------------------------------


def settings_of(config: dict[str, Any], price_data: PriceData | None = None) -> Any:
    return parse_settings(yaml.safe_dump(config, sort_keys=False), "test.yaml", {}, price_data)


def config_with(
    models: dict[str, Any], upstream: str = "http://127.0.0.1:9", **sections: Any
) -> dict[str, Any]:
    config = openai_config(upstream, **sections)
    config["models"] = models
    return config


def test_an_entry_without_prices_takes_the_datas_price_and_context() -> None:
    settings = settings_of(config_with({"fc:openai/gpt-4o-mini": {"max_output": 1000}}))
    entry = settings.models["fc:openai/gpt-4o-mini"]
    assert entry.price == book_price("openai", "gpt-4o-mini")
    assert entry.context == 128000 and entry.max_output == 1000
    assert entry.price_source.startswith("genai-prices ")
    assert entry.price_source.endswith(": openai/gpt-4o-mini")


def test_a_price_the_config_states_wins_over_the_data_whole() -> None:
    entry = settings_of(
        config_with({"fc:openai/gpt-4o-mini": {"input_per_mtok": 9, "output_per_mtok": 10}})
    ).models["fc:openai/gpt-4o-mini"]
    assert entry.price == Price(9.0, 10.0)  # no cache rate of the data's: cached input is input
    assert entry.price_source == "config"
    assert entry.context == 128000  # what the config leaves out still comes from the data


def test_a_config_price_may_state_its_one_hour_cache_write_rate() -> None:
    ref = MINI
    stated = {"input_per_mtok": 3, "output_per_mtok": 15, "cache_write_per_mtok": 3.75,
              "cache_write_1h_per_mtok": 6}  # fmt: skip
    price = settings_of(config_with({ref: stated})).models[ref].price
    assert price == Price(3.0, 15.0, cache_write_per_mtok=3.75, cache_write_1h_per_mtok=6.0)
    assert bill(price, U(1000, 0, write=1000, hour=400)) == pytest.approx(
        (600 * 3.75 + 400 * 6) / 1e6
    )


def test_a_config_context_wins_over_the_data() -> None:
    entry = settings_of(config_with({"fc:openai/gpt-4o-mini": {"context": 5000}})).models[
        "fc:openai/gpt-4o-mini"
    ]
    assert entry.context == 5000


def test_half_a_price_is_refused_at_load() -> None:
    with pytest.raises(ConfigError, match="not both input_per_mtok and output_per_mtok"):
        settings_of(config_with({"fc:openai/gpt-4o-mini": {"input_per_mtok": 1}}))


def test_a_model_the_data_does_not_know_stays_unpriced() -> None:
    entry = settings_of(config_with({"fc:openai/not-a-model": {}})).models["fc:openai/not-a-model"]
    assert entry.price is None and entry.price_source is None


def test_a_config_of_kinds_without_price_data_never_loads_it() -> None:
    config = {"providers": {"local": {"kind": "vllm", "base_url": "http://127.0.0.1:9/v1"}},
              "models": {"fc:local/gpt-4o-mini": {}}}  # fmt: skip
    settings = settings_of(config)
    assert settings.price_book.data is None
    assert settings.models["fc:local/gpt-4o-mini"].price is None


def test_refs_outside_the_catalog_are_priced_by_the_data_else_the_default_price() -> None:
    config = config_with({})
    config["providers"]["openai"]["default_price"] = {"input_per_mtok": 7, "output_per_mtok": 8}
    router = Router(settings_of(config))
    known = router.resolve("fc:openai/gpt-4o", Estimate(10, 10)).candidates[0]
    unknown = router.resolve("fc:openai/not-a-model", Estimate(10, 10)).candidates[0]
    assert known.price == book_price("openai", "gpt-4o")
    assert unknown.price == Price(7.0, 8.0)


def test_without_price_data_only_the_config_prices() -> None:
    priced = {"input_per_mtok": 2, "output_per_mtok": 8}
    config = config_with({MINI: {}, "fc:openai/gpt-4o": priced}, prices={"data": "none"})
    settings = settings_of(config)
    assert settings.price_book.data is None
    assert settings.models[MINI].price is None
    assert settings.models["fc:openai/gpt-4o"].price == Price(2.0, 8.0)
    assert Router(settings).candidate("fc:openai/gpt-4.1").price is None


def test_auto_update_without_price_data_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"prices\.auto_update: needs prices\.data: genai-prices"):
        settings_of(config_with({}, prices={"data": "none", "auto_update": True}))


def test_the_prices_section_is_read() -> None:
    settings = settings_of(config_with({}, prices={"auto_update": True, "update_interval": 600}))
    assert settings.prices.auto_update is True and settings.prices.update_interval == 600.0


# -- end to end: a real sidecar, the fake OpenAI upstream ---------------------------------------


def answer_with_details(prompt: int, cached: int, completion: int, reasoning: int) -> bytes:
    body = {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion,
                  "prompt_tokens_details": {"cached_tokens": cached},
                  "completion_tokens_details": {"reasoning_tokens": reasoning}},
    }  # fmt: skip
    return json.dumps(body).encode()


def test_an_entry_without_prices_is_served_billed_and_budgeted(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    raw = answer_with_details(prompt=1000, cached=600, completion=200, reasoning=50)
    fake_openai.on_model("gpt-4o-mini", Reply(raw_body=raw))
    config = config_with(
        {MINI: {"max_output": 1000}},
        fake_openai.url,
        customers={"acme": {"budget": {"usd": 1.0, "period": "month"}}},
    )
    proc = sidecar_factory(config, {"RINGSIDE_ADMIN_TOKEN": ADMIN_TOKEN})
    body = {"model": MINI, "messages": HELLO, "max_tokens": 300}

    answer = post_chat(proc, body, {"FC-Customer": "acme"})

    expected = bill(book_price("openai", "gpt-4o-mini"), U(1000, 200, read=600, reasoning=50))
    assert expected == pytest.approx((400 * 0.15 + 600 * 0.075 + 200 * 0.6) / 1e6)
    assert answer.status == 200, answer.body
    assert answer.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 600}
    assert float(answer.headers["X-Ringside-Cost-USD"]) == pytest.approx(expected, abs=1e-12)

    def spent() -> Any:
        report = request(proc.admin_url, "GET", "/v1/customers/acme/usage",
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()  # fmt: skip
        return report if report["requests"] == 1 else None

    report = wait_until(spent, 10)
    assert round(report["spent_usd"] * 1e9) == round(expected * 1e9)
    assert round(report["cost_usd"] * 1e9) == round(expected * 1e9)  # the usage records
    samples = metric_samples(proc)
    counted = metric(samples, "ringside_cost_usd_total", customer="acme", model=MINI)
    assert counted == pytest.approx(expected, abs=1e-12)


def test_an_unknown_model_is_still_refused_for_a_budgeted_customer(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    config = config_with(
        {"fc:openai/not-a-model": {}},
        fake_openai.url,
        customers={"acme": {"budget": {"usd": 1.0, "period": "month"}}},
    )
    proc = sidecar_factory(config)
    body = {"model": "fc:openai/not-a-model", "messages": HELLO}

    refused = post_chat(proc, body, {"FC-Customer": "acme"})

    assert refused.status == 400
    assert "fc:openai/not-a-model has no price" in refused.error["message"]
    assert fake_openai.models_called() == []


# -- the command line ----------------------------------------------------------------------------


def write_config(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "ringside.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_check_config_says_where_each_price_came_from(tmp_path: Path) -> None:
    path = write_config(tmp_path, config_with({
        MINI: {},
        "fc:openai/gpt-4o": {"input_per_mtok": 2, "output_per_mtok": 8},
        "fc:openai/not-a-model": {},
    }))  # fmt: skip

    result = ringside("check-config", str(path), env={"TEST_OPENAI_KEY": "sk-x"})

    assert result.returncode == 0, result.stderr
    summary, *lines = result.stdout.splitlines()
    assert "prices: 1 priced by the config, 1 by genai-prices " in summary
    assert summary.endswith(", 1 unpriced")
    assert lines[0].startswith(f"price: {MINI}: genai-prices ")
    assert lines[0].endswith(": openai/gpt-4o-mini")
    assert lines[1].startswith("price: fc:openai/not-a-model: none: unpriced")


def test_ringside_prices_prints_the_effective_catalog(tmp_path: Path) -> None:
    config = config_with({MINI: {}, "fc:openai/gpt-4o": {"input_per_mtok": 2,
                                                         "output_per_mtok": 8}})  # fmt: skip
    config["providers"]["openai"]["default_price"] = {"input_per_mtok": 7, "output_per_mtok": 8}
    path = write_config(tmp_path, config)

    catalog = ringside("prices", "--config", str(path))
    named = ringside("prices", "--config", str(path), "fc:openai/gemini-nope",
                     "fc:openai/gpt-4.1")  # fmt: skip

    assert catalog.returncode == 0, catalog.stderr
    lines = catalog.stdout.splitlines()
    assert lines[0].startswith("# USD per million tokens")
    assert lines[1] == f"{MINI}  context 128000"
    assert lines[2].startswith("    in 0.15  out 0.6  cache read 0.075  cache write -")
    assert lines[2].endswith(": openai/gpt-4o-mini)")
    assert lines[3:5] == [
        "fc:openai/gpt-4o  context 128000",  # the data's: the config states none
        "    in 2  out 8  cache read -  cache write -   (config)",
    ]
    assert named.returncode == 0, named.stderr
    assert "(providers.openai.default_price)" in named.stdout.splitlines()[2]
    assert ": openai/gpt-4.1)" in named.stdout.splitlines()[4]


def test_ringside_prices_shows_tiers_and_filters_by_provider(tmp_path: Path) -> None:
    config = config_with({MINI: {}})
    config["providers"]["google"] = {"kind": "gemini", "api_key_env": "GEMINI_KEY"}
    config["models"]["fc:google/gemini-2.5-pro"] = {}
    path = write_config(tmp_path, config)

    result = ringside("prices", "--config", str(path), "--provider", "google")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()[1:]
    assert lines[0] == "fc:google/gemini-2.5-pro"
    assert lines[2].startswith("    input over 200000 tokens: in 2.5  out 15  cache read 0.25")
    assert MINI not in result.stdout


# -- prices.auto_update --------------------------------------------------------------------------


class Holder:
    """A stand-in for runtime.RuntimeHolder: counts reloads."""

    def __init__(self) -> None:
        self.price_data: PriceData | None = None
        self.reloads: list[PriceData | None] = []
        self.reloaded = asyncio.Event()

    def reload(self) -> bool:
        self.reloads.append(self.price_data)
        self.reloaded.set()
        return True


RAW_DATA = [{
    "id": "openai", "name": "OpenAI", "api_pattern": "https://api\\.openai\\.com",
    "models": [{"id": "gpt-4o-mini", "match": {"equals": "gpt-4o-mini"},
                "prices": {"input_mtok": 1, "output_mtok": 2, "cache_read_mtok": 0.5}}],
}]  # fmt: skip


@pytest.fixture
def price_server() -> Iterator[str]:
    """A loopback server of one genai-prices data file."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(RAW_DATA).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/data.json"
    server.shutdown()


def test_fetched_data_prices_the_next_build(price_server: str) -> None:
    data = fetch_blocking(price_server)
    assert "(updated " in data.label
    entry = settings_of(config_with({MINI: {}}), data).models[MINI]
    assert entry.price == Price(1.0, 2.0, cache_read_per_mtok=0.5)
    assert entry.price_source.endswith(": openai/gpt-4o-mini")


async def test_auto_update_swaps_in_fetched_data_and_reloads(price_server: str) -> None:
    holder = Holder()
    settings = PriceSettings(auto_update=True, update_interval=3600, url=price_server)
    task = asyncio.create_task(update_periodically(holder, settings))
    await asyncio.sleep(0)
    try:
        await asyncio.wait_for(holder.reloaded.wait(), 10)
    finally:
        task.cancel()
    assert holder.price_data is not None and holder.reloads == [holder.price_data]


async def test_a_failed_fetch_is_logged_and_keeps_the_data_in_use(
    caplog: pytest.LogCaptureFixture,
) -> None:
    holder = Holder()
    kept = holder.price_data = PriceData.bundled()
    settings = PriceSettings(auto_update=True, update_interval=3600, url="http://127.0.0.1:9/x")

    async def failing(url: str) -> PriceData:
        raise OSError("connection refused")

    with caplog.at_level(logging.WARNING, logger="ringside"):
        task = asyncio.create_task(update_periodically(holder, settings, failing))
        await asyncio.sleep(0.05)
        task.cancel()
    assert holder.price_data is kept and holder.reloads == []
    assert "fetching http://127.0.0.1:9/x failed (OSError: connection refused)" in caplog.text

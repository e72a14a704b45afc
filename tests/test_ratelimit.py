"""Rate limits (SPEC 3, 4): per-IP, per-token, per-dev and per-customer requests and tokens per
minute; GCRA with a burst of N; 429 rate_limited with Retry-After, X-Ringside-RateLimit-Scope and
OpenAI's x-ratelimit-* headers; X-Forwarded-For only from trusted proxies; exact across replicas
sharing one Redis."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
import redis

from tests.conftest import openai_config
from tests.procs import RedisProcess, SidecarProcess, free_port
from tests.support import HELLO, Answer, metric, metric_samples, post_chat, request, sdk
from tests.upstreams.openai_fake import FakeOpenAI, Reply

MINI = "fc:openai/gpt-4o-mini"
KEYS = {"k_alice1": "alice", "k_alice2": "alice", "k_bob": "bob"}  # key secret → developer


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def keyed_config(upstream: str, **sections: Any) -> dict[str, Any]:
    keys = [
        {"id": secret.removeprefix("k_"), "sha256": sha256(secret), "developer": developer}
        for secret, developer in KEYS.items()
    ]
    return openai_config(upstream, keys=keys, **sections)


def call(
    proc: SidecarProcess,
    key: str = "k_alice1",
    customer: str | None = None,
    forwarded_for: str | None = None,
    content: str = "hi",
    **body: Any,
) -> Answer:
    headers = {"Authorization": f"Bearer {key}"}
    if customer is not None:
        headers["FC-Customer"] = customer
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    message = [{"role": "user", "content": content}]
    return post_chat(proc, {"model": MINI, "messages": message, **body}, headers)


def assert_rate_limited(answer: Answer, scope: str) -> None:
    assert answer.status == 429, answer.body
    assert answer.error["code"] == "rate_limited"
    assert answer.error["type"] == "rate_limit_error"
    assert answer.headers["X-Ringside-RateLimit-Scope"] == scope
    assert int(answer.headers["Retry-After"]) >= 1
    assert int(answer.headers["retry-after-ms"]) >= 1
    assert answer.headers["X-Request-Id"]


def limited(proc: SidecarProcess, scope: str) -> float:
    return metric(metric_samples(proc), "ringside_rate_limited_total", scope=scope)


# -- each scope on its own --------------------------------------------------------------------

# scope → (the caller that trips the limit, another caller of the same scope that is counted apart)
SCOPE_CALLERS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "ip": ({"forwarded_for": "203.0.113.1"}, {"forwarded_for": "203.0.113.2"}),
    "token": ({"key": "k_alice1"}, {"key": "k_alice2"}),  # same developer, other key
    "dev": ({"key": "k_alice1"}, {"key": "k_bob"}),
    "customer": ({"customer": "cust_a"}, {"customer": "cust_b"}),
}


@pytest.mark.parametrize("scope", list(SCOPE_CALLERS))
def test_each_scope_trips_on_its_own_and_names_itself(
    scope: str, fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    config = keyed_config(
        fake_openai.url, rate_limits={scope: {"rpm": 3}}, trusted_proxies=["127.0.0.1/32"]
    )
    proc = sidecar_factory(config)
    caller, other = SCOPE_CALLERS[scope]
    answers = [call(proc, **caller) for _ in range(4)]
    assert [a.status for a in answers] == [200, 200, 200, 429]
    refused = answers[3]
    assert_rate_limited(refused, scope)
    # rpm 3: one request every 20 s; the next one fits once a third of the minute has passed
    assert 15 <= int(refused.headers["Retry-After"]) <= 20
    assert refused.headers["x-ratelimit-limit-requests"] == "3"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert (
        "rate limit" in refused.error["message"]
        and "3 requests per minute" in refused.error["message"]
    )
    assert len(fake_openai.received) == 3  # the refused request never reached the provider
    assert call(proc, **other).status == 200  # another caller of that scope is counted apart
    assert limited(proc, scope) == 1
    assert sum(limited(proc, s) for s in SCOPE_CALLERS) == 1


def test_dev_scope_counts_every_key_of_the_developer(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(keyed_config(fake_openai.url, rate_limits={"dev": {"rpm": 2}}))
    assert call(proc, key="k_alice1").status == 200
    assert call(proc, key="k_alice2").status == 200
    assert_rate_limited(call(proc, key="k_alice1"), "dev")
    assert_rate_limited(call(proc, key="k_alice2"), "dev")
    assert call(proc, key="k_bob").status == 200


def test_successful_answers_carry_openai_ratelimit_headers(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    limits = {"token": {"rpm": 3, "tpm": 10000}}
    proc = sidecar_factory(keyed_config(fake_openai.url, rate_limits=limits))
    first, second = call(proc), call(proc)
    assert first.headers["x-ratelimit-limit-requests"] == "3"
    assert first.headers["x-ratelimit-remaining-requests"] == "2"
    assert second.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"] == "20s"
    assert first.headers["x-ratelimit-limit-tokens"] == "10000"
    assert 9000 < int(first.headers["x-ratelimit-remaining-tokens"]) < 10000
    assert first.headers["x-ratelimit-reset-tokens"].endswith("s")


def test_sdk_sees_a_rate_limit_error(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(keyed_config(fake_openai.url, rate_limits={"token": {"rpm": 1}}))
    client = sdk(proc, api_key="k_alice1")
    client.chat.completions.create(model=MINI, messages=HELLO)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=MINI, messages=HELLO)
    assert caught.value.code == "rate_limited"
    assert caught.value.response.headers["x-ringside-ratelimit-scope"] == "token"


# -- overrides per key and per customer -------------------------------------------------------


def test_key_and_customer_overrides_replace_the_scope_defaults(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    config = keyed_config(
        fake_openai.url,
        rate_limits={"token": {"rpm": 100}, "customer": {"rpm": 100}},
        customers={"cust_small": {"rate_limit": {"rpm": 1}}},
    )
    config["keys"][2]["rate_limit"] = {"rpm": 1}  # bob
    proc = sidecar_factory(config)
    assert call(proc, key="k_bob").status == 200
    refused = call(proc, key="k_bob")
    assert_rate_limited(refused, "token")
    assert refused.headers["x-ratelimit-limit-requests"] == "1"
    assert call(proc, customer="cust_small").status == 200
    assert_rate_limited(call(proc, customer="cust_small"), "customer")
    for _ in range(3):
        assert call(proc, customer="cust_big").status == 200


# -- GCRA: N at once, then a continuous refill --------------------------------------------------


def test_rpm_60_admits_60_at_once_then_one_per_second(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(openai_config(fake_openai.url, rate_limits={"ip": {"rpm": 60}}))
    body = {"model": MINI, "messages": HELLO}
    started = time.monotonic()
    burst = [post_chat(proc, body) for _ in range(61)]
    assert time.monotonic() - started < 0.95  # before the first refill, at 1 s
    assert [a.status for a in burst[:60]] == [200] * 60
    assert_rate_limited(burst[60], "ip")
    assert burst[60].headers["Retry-After"] == "1"
    assert int(burst[60].headers["retry-after-ms"]) <= 1000
    statuses = []
    while time.monotonic() - started < 3.2:
        statuses.append(post_chat(proc, body).status)
        time.sleep(0.01)
    # one more per second: about three in the 3.2 s after the burst, never a second burst
    assert 2 <= statuses.count(200) <= 4, statuses.count(200)
    assert statuses.count(429) > 50


def test_tpm_trips_on_big_prompts(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(keyed_config(fake_openai.url, rate_limits={"token": {"tpm": 1000}}))
    for _ in range(5):  # small prompts: far below the limit
        assert call(proc).status == 200
    big = "word " * 600  # ~3000 bytes: an estimate of ~770 tokens
    fake_openai.script(Reply(prompt_tokens=760, completion_tokens=40))
    first = call(proc, content=big)
    assert first.status == 200
    second = call(proc, content=big)
    assert_rate_limited(second, "token")
    assert second.headers["x-ratelimit-limit-tokens"] == "1000"
    assert "tokens per minute" in second.error["message"]
    assert call(proc).status == 200  # a small one still fits


def test_token_estimate_is_settled_to_the_real_usage(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    """max_tokens counts at admission; what the answer really used is what stays charged."""
    proc = sidecar_factory(keyed_config(fake_openai.url, rate_limits={"token": {"tpm": 1000}}))
    for _ in range(4):  # 4 × ~920 estimated: only possible because each is settled to 18
        answer = call(proc, max_tokens=900)
        assert answer.status == 200, answer.body
    fake_openai.script(Reply(prompt_tokens=20, completion_tokens=900), Reply(completion_tokens=1))
    assert call(proc, max_tokens=900).status == 200  # really used 920
    assert_rate_limited(call(proc, max_tokens=900), "token")


def test_refused_request_charges_no_other_scope(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    limits = {"token": {"rpm": 2}, "customer": {"rpm": 3}}
    proc = sidecar_factory(keyed_config(fake_openai.url, rate_limits=limits))
    assert call(proc, customer="c1").status == 200
    assert call(proc, customer="c1").status == 200
    for _ in range(5):  # refused by the key's limit: the customer's is not used up by them
        assert_rate_limited(call(proc, customer="c1"), "token")
    assert call(proc, key="k_bob", customer="c1").status == 200


# -- X-Forwarded-For ------------------------------------------------------------------------------


def test_forwarded_for_from_a_trusted_proxy_names_the_client(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    config = openai_config(
        fake_openai.url,
        rate_limits={"ip": {"rpm": 2}},
        trusted_proxies=["127.0.0.1/32", "10.0.0.0/8"],
    )
    proc = sidecar_factory(config)
    body = {"model": MINI, "messages": HELLO}
    # the client wrote a fake left part; the trusted proxies appended what they saw
    chain = {"X-Forwarded-For": "198.51.100.66, 203.0.113.5, 10.1.2.3"}
    assert post_chat(proc, body, chain).status == 200
    assert post_chat(proc, body, {"X-Forwarded-For": "203.0.113.5"}).status == 200
    assert_rate_limited(post_chat(proc, body, chain), "ip")
    assert post_chat(proc, body, {"X-Forwarded-For": "203.0.113.6"}).status == 200
    assert post_chat(proc, body).status == 200  # no header: the peer itself
    ips = [line["client_ip"] for line in proc.access_log()]
    assert ips == ["203.0.113.5", "203.0.113.5", "203.0.113.5", "203.0.113.6", "127.0.0.1"]


def test_forwarded_for_from_an_untrusted_peer_is_ignored(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    config = openai_config(
        fake_openai.url, rate_limits={"ip": {"rpm": 2}}, trusted_proxies=["10.0.0.0/8"]
    )
    proc = sidecar_factory(config)
    body = {"model": MINI, "messages": HELLO}
    answers = [post_chat(proc, body, {"X-Forwarded-For": f"203.0.113.{n}"}) for n in range(3)]
    assert [a.status for a in answers] == [200, 200, 429]
    assert_rate_limited(answers[2], "ip")
    assert {line["client_ip"] for line in proc.access_log()} == {"127.0.0.1"}


# -- Redis: one limit for every replica -------------------------------------------------------


def redis_config(fake: FakeOpenAI, url: str, rpm: int) -> dict[str, Any]:
    return keyed_config(
        fake.url,
        storage={"backend": "redis", "redis_url": url, "fail_open": True},
        rate_limits={"token": {"rpm": rpm}},
    )


@pytest.mark.redis
def test_two_sidecars_sharing_redis_admit_the_limit_together(
    fake_openai: FakeOpenAI,
    sidecar_factory: Callable[..., SidecarProcess],
    redis_server: RedisProcess,
) -> None:
    client = redis.Redis(port=redis_server.port)
    client.flushdb()
    config = redis_config(fake_openai, redis_server.url, rpm=10)
    first, second = sidecar_factory(config), sidecar_factory(config)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda n: call((first, second)[n % 2]), range(40)))
    statuses = [a.status for a in answers]
    assert statuses.count(200) == 10, statuses
    assert statuses.count(429) == 30
    assert all(
        a.headers["X-Ringside-RateLimit-Scope"] == "token" for a in answers if a.status == 429
    )
    assert limited(first, "token") + limited(second, "token") == 30
    assert len(fake_openai.received) == 10
    # one hash tag for every limiter key (a multi-key script needs one Cluster slot); TTL'd
    keys = [key.decode() for key in client.scan_iter("ringside:{rl}:*")]
    assert keys == ["ringside:{rl}:token:r:alice1"]
    assert 0 < client.pttl(keys[0]) <= 61_000
    client.close()


@pytest.mark.redis
def test_redis_limits_refill_like_in_process_ones(
    fake_openai: FakeOpenAI,
    sidecar_factory: Callable[..., SidecarProcess],
    redis_server: RedisProcess,
) -> None:
    redis.Redis(port=redis_server.port).flushdb()
    proc = sidecar_factory(redis_config(fake_openai, redis_server.url, rpm=60))
    started = time.monotonic()
    statuses = [call(proc).status for _ in range(61)]
    assert time.monotonic() - started < 0.95
    assert statuses == [200] * 60 + [429]
    time.sleep(1.05 - (time.monotonic() - started))
    assert call(proc).status == 200
    assert call(proc).status == 429


def test_with_redis_down_limits_hold_per_process_and_requests_are_served(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    proc = sidecar_factory(redis_config(fake_openai, dead, rpm=2))
    assert [call(proc).status for _ in range(3)] == [200, 200, 429]
    assert proc.stderr().count("redis unreachable") == 1  # once per outage, not per request


# -- client tokens ----------------------------------------------------------------------------

TOKEN_SECRET = {"RINGSIDE_TOKEN_SECRET": "ratelimit-test-secret-0123456789abcdef"}


def client_token(proc: SidecarProcess, key: str, customer: str) -> str:
    headers = {"Authorization": f"Bearer {key}"}
    answer = request(proc.url, "POST", "/v1/client_tokens", {"customer": customer}, headers)
    assert answer.status == 200, answer.body
    return str(answer.json()["token"])


def test_a_key_and_its_client_tokens_share_the_token_scope(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    config = keyed_config(fake_openai.url, rate_limits={"token": {"rpm": 2}})
    proc = sidecar_factory(config, TOKEN_SECRET)
    minted = client_token(proc, "k_alice1", "cust_t")
    assert call(proc, key="k_alice1").status == 200
    assert call(proc, key=minted).status == 200
    assert_rate_limited(call(proc, key=minted), "token")
    assert_rate_limited(call(proc, key="k_alice1"), "token")
    assert call(proc, key="k_alice2").status == 200


def test_a_client_token_counts_against_its_own_customer(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    config = keyed_config(fake_openai.url, rate_limits={"customer": {"rpm": 1}})
    proc = sidecar_factory(config, TOKEN_SECRET)
    minted = client_token(proc, "k_alice1", "cust_t")
    assert call(proc, key=minted, customer="cust_other").status == 200  # counted as cust_t
    assert_rate_limited(call(proc, key="k_bob", customer="cust_t"), "customer")
    assert call(proc, key="k_bob", customer="cust_other").status == 200


# -- upstream calls, not requests, are what a limit bounds --------------------------------------


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_every_upstream_call_of_a_cascade_counts_as_a_request(
    backend: str,
    request: pytest.FixtureRequest,
    fake_openai: FakeOpenAI,
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    storage: dict[str, Any] = {"backend": "memory"}
    if backend == "redis":
        server: RedisProcess = request.getfixturevalue("redis_server")
        storage = {"backend": "redis", "redis_url": server.url}
    customer = f"amp_{os.urandom(4).hex()}"
    config = keyed_config(fake_openai.url, storage=storage, rate_limits={"customer": {"rpm": 4}})
    proc = sidecar_factory(config)
    fake_openai.on_model("down-1", Reply(status=500))
    fake_openai.on_model("down-2", Reply(status=500))
    cascade = ["fc:openai/down-1", "fc:openai/down-2", MINI]

    first = call(proc, customer=customer, model=cascade)  # three upstream calls
    fourth = call(proc, customer=customer)
    fifth = call(proc, customer=customer)

    assert first.status == 200 and first.headers["X-Ringside-Model-Used"] == MINI
    assert fourth.status == 200
    assert_rate_limited(fifth, "customer")  # 3 + 1 calls of 4 per minute: no fifth
    assert len(fake_openai.received) == 4

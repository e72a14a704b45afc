"""Idempotency-Key (SPEC 2.5) through HTTP: replays, conflicts, waiting duplicates, streams,
per-key scopes, and records that outlive a sidecar (sqlite) or are shared by two (redis)."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.addons.idempotency import Idempotency, fingerprint
from sidecar.errors import GatewayError
from sidecar.flow import Flow, Principal
from sidecar.stores.idempotency_memory import MemoryStore
from tests.conftest import openai_config
from tests.procs import RedisProcess, SidecarProcess, free_port
from tests.support import (
    HELLO,
    Answer,
    async_sdk,
    metric,
    metric_samples,
    module_sidecar,
    post_chat,
    sdk,
    sse_events,
    without_circuit_breakers,
)
from tests.upstreams.openai_fake import FakeOpenAI, Reply

MINI = "fc:openai/gpt-4o-mini"
ALICE = "sk-test-alice-5f2c9e0d"
BOB = "sk-test-bob-81a7d3c4"
REPLAYED = "Idempotent-Replayed"
FAKE_CONTENT = "Hello from the fake upstream."


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def config(upstream_url: str, storage: dict[str, Any]) -> dict[str, Any]:
    keys = [
        {"id": "alice", "sha256": sha256_hex(ALICE), "developer": "alice"},
        {"id": "bob", "sha256": sha256_hex(BOB), "developer": "bob"},
    ]
    return without_circuit_breakers(openai_config(upstream_url, storage=storage, keys=keys))


@pytest.fixture(scope="module")
def gateway(
    _openai_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    workdir = tmp_path_factory.mktemp("idempotency")
    yield from module_sidecar(workdir, config(_openai_server.url, {"backend": "memory"}))


def new_key() -> str:
    return "order-" + uuid.uuid4().hex


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MINI, "messages": HELLO, **fields}


def post(
    proc: SidecarProcess, body: dict[str, Any], key: str, api_key: str = ALICE, **headers: str
) -> Answer:
    auth = {"Authorization": f"Bearer {api_key}", "Idempotency-Key": key}
    return post_chat(proc, body, {**auth, **headers})


def lasting_headers(answer: Answer) -> dict[str, str]:
    """The answer's headers without those the HTTP server sets anew on every response."""
    skip = {"date", "server", REPLAYED.lower()}
    return {k.lower(): v for k, v in answer.headers.items() if k.lower() not in skip}


# -- replays ---------------------------------------------------------------------------------


def test_a_repeat_gets_the_first_answer_without_a_second_upstream_call(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    client = sdk(gateway, ALICE)
    key = new_key()
    first = client.chat.completions.with_raw_response.create(
        model=MINI, messages=HELLO, extra_headers={"Idempotency-Key": key}
    )
    second = client.chat.completions.with_raw_response.create(
        model=MINI, messages=HELLO, extra_headers={"Idempotency-Key": key}
    )
    assert second.content == first.content
    assert second.parse().choices[0].message.content == FAKE_CONTENT
    assert second.headers[REPLAYED] == "true"
    assert REPLAYED not in first.headers
    assert len(fake_openai.received) == 1


def test_a_replay_carries_the_first_answer_headers(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    key = new_key()
    first = post(gateway, chat(), key)
    second = post(gateway, chat(), key)
    assert first.status == second.status == 200
    assert lasting_headers(second) == lasting_headers(first)
    assert second.headers["X-Ringside-Model-Used"] == MINI
    assert second.headers["X-Request-Id"] == first.headers["X-Request-Id"]
    assert second.headers[REPLAYED] == "true"


def test_a_replay_charges_nothing(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    key = new_key()
    first = post(gateway, chat(), key)
    replay_id = "req-replay-" + uuid.uuid4().hex
    post(gateway, chat(), key, **{"X-Request-Id": replay_id})
    records = {record["request_id"]: record for record in gateway.access_log()}
    assert records[first.headers["X-Request-Id"]]["cost_usd"] > 0
    replay = records[replay_id]
    assert (replay["status"], replay["cost_usd"], replay["tokens_in"]) == (200, 0, 0)
    assert replay["refs_tried"] == [] and replay["ref_used"] is None


def test_the_same_body_with_keys_in_another_order_is_a_repeat(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    key = new_key()
    post(gateway, {"model": MINI, "messages": HELLO, "temperature": 0.5}, key)
    second = post(gateway, {"temperature": 0.5, "messages": HELLO, "model": MINI}, key)
    assert second.status == 200
    assert second.headers[REPLAYED] == "true"
    assert len(fake_openai.received) == 1


def test_a_different_body_is_409_idempotency_key_reused(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    key = new_key()
    post(gateway, chat(), key)
    answer = post(gateway, chat(messages=[{"role": "user", "content": "something else"}]), key)
    assert answer.status == 409
    assert answer.error["code"] == "idempotency_key_reused"
    assert answer.error["param"] == "Idempotency-Key"
    assert REPLAYED not in answer.headers
    assert len(fake_openai.received) == 1


def test_the_sdk_sees_a_reused_key_as_a_conflict(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    client = openai.OpenAI(base_url=gateway.base_url, api_key=ALICE, max_retries=3, timeout=15)
    key = new_key()
    client.chat.completions.create(
        model=MINI, messages=HELLO, extra_headers={"Idempotency-Key": key}
    )
    conflicts_before = sum(r["status"] == 409 for r in gateway.access_log())
    with pytest.raises(openai.ConflictError) as caught:
        client.chat.completions.create(
            model=MINI, messages=HELLO, temperature=0, extra_headers={"Idempotency-Key": key}
        )
    assert caught.value.code == "idempotency_key_reused"
    assert caught.value.response.headers["x-should-retry"] == "false"
    conflicts = sum(r["status"] == 409 for r in gateway.access_log())
    assert conflicts == conflicts_before + 1  # the SDK (max_retries=3) did not send it again


def test_the_same_key_of_two_api_keys_does_not_collide(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    key = new_key()
    alice = post(gateway, chat(), key, api_key=ALICE)
    bob = post(gateway, chat(temperature=0), key, api_key=BOB)
    assert alice.status == bob.status == 200
    assert REPLAYED not in bob.headers
    assert len(fake_openai.received) == 2


# -- duplicates in flight --------------------------------------------------------------------


async def test_a_concurrent_duplicate_waits_and_gets_the_same_answer(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(content="worth the wait", delay=1.0))
    client = async_sdk(gateway, ALICE)
    key = new_key()

    async def call() -> Any:
        return await client.chat.completions.with_raw_response.create(
            model=MINI, messages=HELLO, extra_headers={"Idempotency-Key": key}
        )

    first_call = asyncio.create_task(call())
    await asyncio.sleep(0.3)  # the first request holds the key by now
    second = await call()
    first = await first_call
    assert second.content == first.content
    assert second.parse().choices[0].message.content == "worth the wait"
    assert second.headers[REPLAYED] == "true"
    assert len(fake_openai.received) == 1


async def test_a_waiting_duplicate_runs_itself_when_the_first_fails(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(status=503, delay=1.0), Reply(content="second try"))
    client = async_sdk(gateway, ALICE)
    key = new_key()

    async def call() -> Any:
        return await client.chat.completions.create(
            model=MINI, messages=HELLO, extra_headers={"Idempotency-Key": key}
        )

    first_call = asyncio.create_task(call())
    await asyncio.sleep(0.3)
    second = await call()
    with pytest.raises(openai.APIStatusError) as caught:
        await first_call
    assert caught.value.status_code == 503
    assert second.choices[0].message.content == "second try"
    assert len(fake_openai.received) == 2


async def test_a_duplicate_still_waiting_after_the_bound_is_409_with_retry_after() -> None:
    store = MemoryStore()
    addon = Idempotency(store.idempotency, wait=0.2)
    headers = CIMultiDictProxy(CIMultiDict({"Idempotency-Key": "order-1"}))
    flow = Flow("req_1", headers, "127.0.0.1", chat(), 0)
    flow.principal = Principal(key_id="alice")
    await store.idempotency.begin("alice", "order-1", fingerprint(flow), 30.0)
    with pytest.raises(GatewayError) as caught:
        await addon.request(flow)
    assert (caught.value.status, caught.value.code) == (409, "idempotency_key_reused")
    assert caught.value.headers["Retry-After"] == "1"
    assert caught.value.headers["x-should-retry"] == "false"  # waiting is the caller's call
    assert flow.response is None


# -- what is stored --------------------------------------------------------------------------


def test_an_upstream_failure_is_not_stored_so_a_retry_runs(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(status=503))
    key = new_key()
    first = post(gateway, chat(), key)
    second = post(gateway, chat(), key)
    assert first.status == 503
    assert first.error["code"] == "upstream_unavailable"
    assert second.status == 200
    assert REPLAYED not in second.headers
    assert len(fake_openai.received) == 2


def test_an_upstream_client_error_is_stored_and_replayed(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(
        Reply(status=400, error_code="invalid_value", error_type="invalid_request_error")
    )
    key = new_key()
    first = post(gateway, chat(), key)
    second = post(gateway, chat(), key)
    assert first.status == second.status == 400
    assert second.body == first.body
    assert second.headers[REPLAYED] == "true"
    assert len(fake_openai.received) == 1


# -- streams ---------------------------------------------------------------------------------


def test_a_stream_is_replayed_as_the_same_sse_events(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    key = new_key()
    first = post(gateway, chat(stream=True), key)
    second = post(gateway, chat(stream=True), key)
    assert second.status == 200
    assert second.headers["Content-Type"].startswith("text/event-stream")
    assert second.headers[REPLAYED] == "true"
    assert second.body == first.body
    assert sse_events(second.body)[-1] == "[DONE]"
    assert len(fake_openai.received) == 1


def test_the_openai_sdk_reads_a_replayed_stream(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    client = sdk(gateway, ALICE)
    key = new_key()

    def streamed_text() -> str:
        stream = client.chat.completions.create(
            model=MINI, messages=HELLO, stream=True, extra_headers={"Idempotency-Key": key}
        )
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    assert streamed_text() == FAKE_CONTENT
    assert streamed_text() == FAKE_CONTENT
    assert len(fake_openai.received) == 1


def test_a_stream_cut_by_the_upstream_is_not_stored(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(error_after_chunks=1))
    key = new_key()
    first = post(gateway, chat(stream=True), key)
    second = post(gateway, chat(stream=True), key)
    assert '"upstream_unavailable"' in first.body.decode()
    assert REPLAYED not in second.headers
    assert sse_events(second.body)[-1] == "[DONE]"
    assert len(fake_openai.received) == 2


# -- open mode, restarts, shared stores, store outages ---------------------------------------


def test_open_mode_replays_for_the_anonymous_caller(
    sidecar: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    key = new_key()
    first = post_chat(sidecar, chat(), {"Idempotency-Key": key})
    second = post_chat(sidecar, chat(), {"Idempotency-Key": key})
    assert second.body == first.body
    assert second.headers[REPLAYED] == "true"
    assert len(fake_openai.received) == 1


def test_sqlite_replays_across_a_sidecar_restart(
    fake_openai: FakeOpenAI,
    sidecar_factory: Callable[..., SidecarProcess],
    tmp_path: Path,
) -> None:
    settings = config(fake_openai.url, {"backend": "sqlite", "sqlite_path": str(tmp_path / "r.db")})
    key = new_key()
    before = sidecar_factory(settings)
    first = post(before, chat(), key)
    assert before.stop() == 0
    after = sidecar_factory(settings)
    second = post(after, chat(), key)
    assert second.status == 200
    assert second.body == first.body
    assert second.headers[REPLAYED] == "true"
    assert len(fake_openai.received) == 1


@pytest.fixture
def redis_pair(
    fake_openai: FakeOpenAI,
    sidecar_factory: Callable[..., SidecarProcess],
    redis_server: RedisProcess,
) -> tuple[SidecarProcess, SidecarProcess]:
    settings = config(fake_openai.url, {"backend": "redis", "redis_url": redis_server.url})
    return sidecar_factory(settings), sidecar_factory(settings)


@pytest.mark.redis
def test_two_sidecars_sharing_redis_replay_each_others_answers(
    redis_pair: tuple[SidecarProcess, SidecarProcess], fake_openai: FakeOpenAI
) -> None:
    one, two = redis_pair
    key = new_key()
    first = post(one, chat(), key)
    second = post(two, chat(), key)
    assert second.body == first.body
    assert second.headers[REPLAYED] == "true"
    assert len(fake_openai.received) == 1


@pytest.mark.redis
async def test_a_duplicate_on_another_sidecar_waits_for_the_first(
    redis_pair: tuple[SidecarProcess, SidecarProcess], fake_openai: FakeOpenAI
) -> None:
    one, two = redis_pair
    fake_openai.script(Reply(content="from the first sidecar", delay=1.0))
    key = new_key()
    first_call = asyncio.create_task(asyncio.to_thread(post, one, chat(), key))
    await asyncio.sleep(0.3)
    second = await asyncio.to_thread(post, two, chat(), key)
    first = await first_call
    assert second.body == first.body
    assert second.headers[REPLAYED] == "true"
    assert len(fake_openai.received) == 1


@pytest.fixture
def dead_redis_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def test_a_store_outage_is_503_store_unavailable_when_not_fail_open(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess], dead_redis_url: str
) -> None:
    proc = sidecar_factory(
        config(fake_openai.url, {"backend": "redis", "redis_url": dead_redis_url})
    )
    answer = post(proc, chat(), new_key())
    assert answer.status == 503
    assert answer.error["code"] == "store_unavailable"
    assert fake_openai.received == []


def test_a_request_without_the_header_needs_no_store(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess], dead_redis_url: str
) -> None:
    proc = sidecar_factory(
        config(fake_openai.url, {"backend": "redis", "redis_url": dead_redis_url})
    )
    answer = post_chat(proc, chat(), {"Authorization": f"Bearer {ALICE}"})
    assert answer.status == 200
    assert len(fake_openai.received) == 1


def test_a_store_outage_runs_the_request_when_fail_open(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess], dead_redis_url: str
) -> None:
    storage = {"backend": "redis", "redis_url": dead_redis_url, "fail_open": True}
    proc = sidecar_factory(config(fake_openai.url, storage))
    answers = [post(proc, chat(), new_key()) for _ in range(3)]
    assert [a.status for a in answers] == [200] * 3
    assert all(REPLAYED not in a.headers for a in answers)
    assert len(fake_openai.received) == 3
    # one line for the outage, not one per request; each skip counted
    assert proc.stderr().count("idempotency store unavailable") == 1
    labels = {"store": "idempotency", "operation": "begin"}
    assert metric(metric_samples(proc), "ringside_store_unavailable_total", **labels) == 3

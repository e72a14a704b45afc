"""API keys configured: 401 invalid_api_key for every way a key can be wrong, 403 model_not_allowed
for refs a key may not use (SPEC 3, 4)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import openai
import pytest
import yaml

from tests.conftest import PROVIDER_KEY, openai_config
from tests.procs import SidecarProcess, wait_until
from tests.support import HELLO, module_sidecar, post_chat, request, ringside, sdk
from tests.upstreams.openai_fake import FakeOpenAI

MINI = "fc:openai/gpt-4o-mini"
ALICE, BOB, REVOKED, EXPIRED = "rk_alice_key", "rk_bob_key", "rk_revoked_key", "rk_expired_key"


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@pytest.fixture(scope="module")
def gateway(
    _openai_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    config = openai_config(
        _openai_server.url,
        slots={"small": MINI, "big": "fc:openai/gpt-4o"},
        keys=[
            {"id": "alice", "sha256": sha256(ALICE), "developer": "alice"},
            {"id": "bob", "sha256": sha256(BOB), "allowed": ["fc:openai/gpt-4o-mini*"]},
            {"id": "gone", "sha256": sha256(REVOKED), "revoked": True},
            {"id": "old", "sha256": sha256(EXPIRED), "expires": "2020-01-01T00:00:00Z"},
        ],
    )
    yield from module_sidecar(tmp_path_factory.mktemp("auth"), config)


def chat(model: str = MINI) -> dict[str, object]:
    return {"model": model, "messages": HELLO}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_known_key_is_served(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    completion = sdk(gateway, api_key=ALICE).chat.completions.create(model=MINI, messages=HELLO)
    assert completion.choices[0].message.content == "Hello from the fake upstream."


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer rk_nobody_has_this"},
        {"Authorization": f"Basic {ALICE}"},
        {"Authorization": "Bearer "},
        bearer(REVOKED),
        bearer(EXPIRED),
    ],
    ids=["missing", "unknown", "wrong-scheme", "empty", "revoked", "expired"],
)
def test_bad_key_is_401_invalid_api_key(
    gateway: SidecarProcess, fake_openai: FakeOpenAI, headers: dict[str, str]
) -> None:
    answer = post_chat(gateway, chat(), headers)
    assert answer.status == 401
    assert answer.error["code"] == "invalid_api_key"
    assert answer.error["type"] == "authentication_error"
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert answer.headers["X-Request-Id"]
    assert fake_openai.received == []


def test_revoked_key_message_says_revoked(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    assert "revoked" in post_chat(gateway, chat(), bearer(REVOKED)).error["message"]


def test_sdk_sees_a_bad_key_as_authentication_error(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(gateway, api_key="rk_wrong").chat.completions.create(model=MINI, messages=HELLO)
    assert caught.value.code == "invalid_api_key"


def test_key_with_allowed_refs_may_use_them(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    assert post_chat(gateway, chat(MINI), bearer(BOB)).status == 200


def test_key_may_use_a_slot_that_expands_to_allowed_refs(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    assert post_chat(gateway, chat("slot:small"), bearer(BOB)).status == 200


def test_ref_outside_allowed_is_403_model_not_allowed(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    answer = post_chat(gateway, chat("fc:openai/gpt-4o"), bearer(BOB))
    assert answer.status == 403
    assert answer.error["code"] == "model_not_allowed"
    assert answer.error["param"] == "model"
    assert "fc:openai/gpt-4o" in answer.error["message"]
    assert fake_openai.received == []


def test_slot_expanding_outside_allowed_is_403(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        sdk(gateway, api_key=BOB).chat.completions.create(model="slot:big", messages=HELLO)
    assert caught.value.code == "model_not_allowed"
    assert fake_openai.received == []


def test_models_listing_needs_a_key(gateway: SidecarProcess) -> None:
    answer = request(gateway.url, "GET", "/v1/models")
    assert answer.status == 401
    assert answer.error["code"] == "invalid_api_key"


def test_models_listing_with_a_key(gateway: SidecarProcess) -> None:
    ids = [model.id for model in sdk(gateway, api_key=ALICE).models.list()]
    assert MINI in ids


def test_one_model_needs_a_key_too(gateway: SidecarProcess) -> None:
    answer = request(gateway.url, "GET", "/v1/models/slot:small")
    assert answer.status == 401
    assert answer.error["code"] == "invalid_api_key"


def test_one_model_is_retrieved_by_its_ref(gateway: SidecarProcess) -> None:
    """GET /v1/models/{ref} (SPEC 2.6): the SDK percent-encodes the `/` of an fc: ref; the
    entry is the list's own, parsed by the SDK as a Model."""
    client = sdk(gateway, api_key=ALICE)
    listed = {model.id: model for model in client.models.list()}
    model = client.models.retrieve(MINI)
    assert model.id == MINI
    assert model.object == "model"
    assert model.model_dump() == listed[MINI].model_dump()
    slot = client.models.retrieve("slot:small")
    assert slot.model_dump() == listed["slot:small"].model_dump()


def test_an_unknown_model_is_404_model_not_found(gateway: SidecarProcess) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        sdk(gateway, api_key=ALICE).models.retrieve("fc:openai/not-in-the-catalog")
    assert caught.value.code == "model_not_found"
    assert "fc:openai/not-in-the-catalog" in caught.value.message


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/" + "a" * 7000,  # long: the 404 quotes at most 200 characters of it
        "/v1/models/fc:openai%2F%00%0d%0aX-Injected:%20yes",  # NUL, CR/LF once decoded
        "/v1/models/fc:openai/%ff%fe",  # not UTF-8 once decoded
        "/v1/models/../v1/models",
    ],
    ids=["long", "control characters", "not utf-8", "dot segments"],
)
def test_a_hostile_model_ref_is_a_plain_404(gateway: SidecarProcess, path: str) -> None:
    answer = request(gateway.url, "GET", path, headers={"Authorization": f"Bearer {ALICE}"})
    assert answer.status == 404
    assert answer.error["code"] in ("model_not_found", "not_found")
    assert len(answer.error["message"]) < 600
    assert "X-Injected" not in answer.headers
    assert "\x00" not in answer.error["message"]  # escaped, never echoed raw


def test_one_model_answers_only_get(gateway: SidecarProcess) -> None:
    answer = request(gateway.url, "POST", "/v1/models/slot:small", {})
    assert answer.status == 405
    assert answer.headers["Allow"] == "GET, OPTIONS"
    assert answer.error["code"] == "method_not_allowed"


def test_key_names_the_caller_in_the_access_log(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    headers = {**bearer(ALICE), "FC-Customer": "cust_9", "X-Request-Id": "req_auth_log"}
    assert post_chat(gateway, chat(), headers).status == 200
    line = next(r for r in gateway.access_log() if r["request_id"] == "req_auth_log")
    assert (line["key_id"], line["dev"], line["customer"]) == ("alice", "alice", "cust_9")
    assert ALICE not in gateway.stdout() and ALICE not in gateway.stderr()


def test_key_without_developer_is_its_own_developer(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    assert post_chat(gateway, chat(), {**bearer(BOB), "X-Request-Id": "req_bob_dev"}).status == 200
    line = next(r for r in gateway.access_log() if r["request_id"] == "req_bob_dev")
    assert (line["key_id"], line["dev"]) == ("bob", "bob")


def test_provider_never_sees_the_client_key(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    assert post_chat(gateway, chat(), bearer(ALICE)).status == 200
    seen = fake_openai.received[-1].headers
    assert seen["Authorization"] == f"Bearer {PROVIDER_KEY}"
    assert not any(ALICE in value for value in seen.values())


def test_api_key_in_the_client_scheme_is_401(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    answer = post_chat(gateway, chat(), {"Authorization": f"Client {ALICE}"})
    assert answer.status == 401
    assert answer.error["code"] == "invalid_api_key"


def test_malformed_fc_customer_is_400(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    answer = post_chat(gateway, chat(), {**bearer(ALICE), "FC-Customer": "no spaces allowed"})
    assert answer.status == 400
    assert answer.error["param"] == "FC-Customer"
    assert fake_openai.received == []


def test_key_revoked_in_the_config_is_refused_after_reload(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    keys = [{"id": "alice", "sha256": sha256(ALICE)}, {"id": "bob", "sha256": sha256(BOB)}]
    proc = sidecar_factory(openai_config(fake_openai.url, keys=keys))
    assert post_chat(proc, chat(), bearer(ALICE)).status == 200
    keys[0]["revoked"] = True
    proc.write_config(openai_config(fake_openai.url, keys=keys))
    wait_until(lambda: post_chat(proc, chat(), bearer(ALICE)).status == 401, timeout=2.5)
    assert "revoked" in post_chat(proc, chat(), bearer(ALICE)).error["message"]
    assert post_chat(proc, chat(), bearer(BOB)).status == 200


def test_key_with_a_future_expiry_is_served(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    keys = [{"id": "alice", "sha256": sha256(ALICE), "expires": "2999-01-01T00:00:00Z"}]
    proc = sidecar_factory(openai_config(fake_openai.url, keys=keys))
    assert post_chat(proc, chat(), bearer(ALICE)).status == 200


def test_keys_new_developer_becomes_the_dev(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    result = ringside("keys", "new", "--id", "billing", "--developer", "dana")
    assert result.returncode == 0, result.stderr
    secret = result.stdout.split("give it to the caller): ", 1)[1].split()[0]
    entry = yaml.safe_load(result.stdout.split("config line (paste under keys:):", 1)[1])[0]
    assert entry["sha256"] == sha256(secret) and secret not in result.stdout.split("config line")[1]
    proc = sidecar_factory(openai_config(fake_openai.url, keys=[entry]))
    headers = {**bearer(secret), "X-Request-Id": "req_keys_new"}
    assert post_chat(proc, chat(), headers).status == 200
    line = next(r for r in proc.access_log() if r["request_id"] == "req_keys_new")
    assert (line["key_id"], line["dev"]) == ("billing", "dana")


@pytest.mark.parametrize("body", [b"{not json", b"x" * 3_000_000], ids=["garbage", "oversized"])
def test_caller_without_a_key_is_refused_before_its_body_is_read(
    gateway: SidecarProcess, fake_openai: FakeOpenAI, body: bytes
) -> None:
    answer = post_chat(gateway, body, {"Authorization": "Bearer rk_nobody_has_this"})
    assert answer.status == 401
    assert answer.error["code"] == "invalid_api_key"
    assert fake_openai.received == []

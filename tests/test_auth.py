"""API keys configured: 401 invalid_api_key for every way a key can be wrong, 403 model_not_allowed
for refs a key may not use (SPEC 3, 4)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import openai
import pytest

from tests.conftest import openai_config
from tests.procs import SidecarProcess
from tests.support import HELLO, module_sidecar, post_chat, request, sdk
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

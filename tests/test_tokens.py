"""Client tokens (SPEC 4): minted by an API key (POST /v1/client_tokens or `ringside token mint`),
bound to the key, a customer and optionally refs, an Origin and a client IP; accepted as
`Client <t>` or `Bearer <t>`; refused with 401 when expired, altered, used from elsewhere, or when
their key is revoked or gone. CORS for the Origin a token names."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from tests.conftest import PROVIDER_KEY, openai_config
from tests.procs import SidecarProcess, wait_until
from tests.support import Answer, module_sidecar, post_chat, request, ringside, sdk
from tests.upstreams.openai_fake import FakeOpenAI

MINI, BIG = "fc:openai/gpt-4o-mini", "fc:openai/gpt-4o"
SECRET = "test-token-secret-0123456789abcdef0123456789"
APP, NARROW, REVOKED = "rk_app_key", "rk_narrow_key", "rk_revoked_key"
ORIGIN = "https://app.example.com"
ENV = {"RINGSIDE_TOKEN_SECRET": SECRET}


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def config(upstream: str, **sections: Any) -> dict[str, Any]:
    keys = [
        {"id": "app", "sha256": sha256(APP), "developer": "web"},
        {"id": "narrow", "sha256": sha256(NARROW), "allowed": [MINI]},
        {"id": "gone", "sha256": sha256(REVOKED), "revoked": True},
    ]
    base = {
        "keys": keys,
        "trusted_proxies": ["127.0.0.1/32"],
        "tokens": {"default_ttl": 900, "max_ttl": 3600},
    }
    return openai_config(upstream, **{**base, **sections})


@pytest.fixture(scope="module")
def gateway(
    _openai_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    yield from module_sidecar(tmp_path_factory.mktemp("tokens"), config(_openai_server.url), ENV)


def mint(proc: SidecarProcess, key: str = APP, **fields: Any) -> Answer:
    fields.setdefault("customer", "cust_1")
    return request(
        proc.url, "POST", "/v1/client_tokens", fields, {"Authorization": f"Bearer {key}"}
    )


def token(proc: SidecarProcess, key: str = APP, **fields: Any) -> str:
    answer = mint(proc, key, **fields)
    assert answer.status == 200, answer.body
    return str(answer.json()["token"])


def chat(
    proc: SidecarProcess, credential: str, scheme: str = "Client", model: str = MINI, **headers: str
) -> Answer:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return post_chat(proc, body, {"Authorization": f"{scheme} {credential}", **headers})


def assert_401(answer: Answer, *words: str) -> None:
    assert answer.status == 401, answer.body
    assert answer.error["code"] == "invalid_api_key"
    for word in words:
        assert word in answer.error["message"], answer.error["message"]


def log_line(proc: SidecarProcess, request_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        return next((r for r in proc.access_log() if r["request_id"] == request_id), None)

    found: dict[str, Any] = wait_until(find, timeout=5)
    return found


# -- minting ------------------------------------------------------------------------------------


def test_mint_answers_a_token_bound_to_the_key_and_customer(gateway: SidecarProcess) -> None:
    before = time.time()
    answer = mint(gateway, customer="cust_1")
    assert answer.status == 200, answer.body
    assert answer.headers["Cache-Control"] == "no-store"
    data = answer.json()
    assert data["object"] == "client_token"
    assert data["key_id"] == "app" and data["customer"] == "cust_1"
    assert data["expires_in"] == 900  # tokens.default_ttl
    assert before + 898 <= data["expires_at"] <= time.time() + 900
    assert data["allowed_models"] is None and data["origin"] is None and data["client_ip"] is None
    claims = jwt.decode(data["token"], options={"verify_signature": False})
    assert claims["sub"] == "app" and claims["customer"] == "cust_1" and claims["iss"] == "ringside"
    assert jwt.get_unverified_header(data["token"])["alg"] == "HS256"
    assert APP not in data["token"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"ttl_seconds": 3601}, "ttl_seconds"),
        ({"ttl_seconds": 0}, "ttl_seconds"),
        ({"ttl_seconds": "60"}, "ttl_seconds"),
        ({"orgin": ORIGIN}, "orgin"),
        ({"customer": None}, "customer"),
        ({"customer": "has space"}, "customer"),
        ({"origin": "app.example.com"}, "origin"),
        ({"origin": "https://app.example.com/path"}, "origin"),
        ({"client_ip": "10.0.0.999"}, "client_ip"),
        ({"allowed_models": []}, "allowed_models"),
        ({"allowed_models": "fc:openai/gpt-4o-mini"}, "allowed_models"),
    ],
    ids=lambda value: json.dumps(value) if isinstance(value, dict) else str(value),
)
def test_mint_refuses_a_bad_request_naming_the_field(
    gateway: SidecarProcess, fields: dict[str, Any], param: str
) -> None:
    answer = mint(gateway, **fields)
    assert answer.status == 400, answer.body
    assert answer.error["code"] == "invalid_request"
    assert answer.error["param"] == param


@pytest.mark.parametrize(
    ("headers", "words"),
    [
        ({}, "missing Authorization"),
        ({"Authorization": "Bearer rk_nobody"}, "not known"),
        ({"Authorization": f"Bearer {REVOKED}"}, "revoked"),
    ],
    ids=["none", "unknown", "revoked"],
)
def test_mint_needs_a_valid_api_key(
    gateway: SidecarProcess, headers: dict[str, str], words: str
) -> None:
    answer = request(gateway.url, "POST", "/v1/client_tokens", {"customer": "c"}, headers)
    assert_401(answer, words)


def test_a_client_token_cannot_mint_tokens(gateway: SidecarProcess) -> None:
    minted = token(gateway)
    for scheme in ("Bearer", "Client"):
        headers = {"Authorization": f"{scheme} {minted}"}
        answer = request(gateway.url, "POST", "/v1/client_tokens", {"customer": "c"}, headers)
        assert_401(answer, "client token cannot")


def test_key_cannot_grant_refs_it_may_not_use(gateway: SidecarProcess) -> None:
    answer = mint(gateway, NARROW, allowed_models=[BIG])
    assert answer.status == 403
    assert answer.error["code"] == "model_not_allowed"
    assert answer.error["param"] == "allowed_models"
    inherited = mint(gateway, NARROW).json()
    assert inherited["allowed_models"] == [MINI]


def test_ttl_asked_for_is_the_token_lifetime(gateway: SidecarProcess) -> None:
    data = mint(gateway, ttl_seconds=3600).json()
    assert data["expires_in"] == 3600


# -- using a token ------------------------------------------------------------------------------


def test_token_works_as_the_openai_sdk_api_key(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    client = sdk(gateway, api_key=token(gateway, customer="cust_sdk"))
    completion = client.chat.completions.with_raw_response.create(
        model=MINI, messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.parse().choices[0].message.content == "Hello from the fake upstream."
    line = log_line(gateway, completion.headers["X-Request-Id"])
    assert (line["key_id"], line["dev"], line["customer"]) == ("app", "web", "cust_sdk")


def test_token_works_with_the_client_scheme(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    assert chat(gateway, token(gateway), "Client").status == 200
    assert chat(gateway, token(gateway), "client").status == 200


def test_token_customer_wins_over_fc_customer(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    minted = token(gateway, customer="cust_token")
    answer = chat(gateway, minted, **{"FC-Customer": "cust_header", "X-Request-Id": "req_tokcust"})
    assert answer.status == 200
    assert log_line(gateway, "req_tokcust")["customer"] == "cust_token"


def test_provider_never_sees_the_token(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    minted = token(gateway)
    assert chat(gateway, minted, "Bearer").status == 200
    seen = fake_openai.received[-1].headers
    assert seen["Authorization"] == f"Bearer {PROVIDER_KEY}"
    assert not any(minted in value or APP in value for value in seen.values())


def test_altered_token_is_401(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    header, payload, signature = token(gateway, customer="cust_1").split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["customer"] = "cust_someone_else"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert_401(chat(gateway, f"{header}.{forged}.{signature}"), "signature")
    flipped = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")
    assert_401(chat(gateway, f"{header}.{payload}.{flipped}"), "signature")
    assert_401(chat(gateway, "eyJnot.a.token"), "malformed")
    assert fake_openai.received == []


def test_token_signed_with_another_secret_is_401(gateway: SidecarProcess) -> None:
    now = int(time.time())
    claims = {"iss": "ringside", "sub": "app", "customer": "c", "iat": now, "exp": now + 60}
    foreign = jwt.encode(claims, "another-secret-of-the-right-length-0123456789", "HS256")
    assert_401(chat(gateway, foreign), "signature")
    assert_401(chat(gateway, foreign, "Bearer"), "signature")


def test_token_longer_than_max_ttl_is_401(gateway: SidecarProcess) -> None:
    now = int(time.time())
    claims = {"iss": "ringside", "sub": "app", "customer": "c", "iat": now, "exp": now + 7200}
    assert_401(chat(gateway, jwt.encode(claims, SECRET, "HS256")), "longer")


def test_expired_token_is_401(gateway: SidecarProcess) -> None:
    minted = token(gateway, ttl_seconds=2)
    assert chat(gateway, minted).status == 200  # used at once, it is valid (and cached)
    wait_until(lambda: chat(gateway, minted).status == 401, timeout=3.5, interval=0.2)
    assert_401(chat(gateway, minted), "expired")


def test_token_of_a_key_not_allowed_a_ref_is_403(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    minted = token(gateway, allowed_models=[MINI])
    answer = chat(gateway, minted, model=BIG)
    assert answer.status == 403
    assert answer.error["code"] == "model_not_allowed"
    assert chat(gateway, minted, model=MINI).status == 200
    assert [r.body["model"] for r in fake_openai.received] == ["gpt-4o-mini"]


# -- Origin and client IP -------------------------------------------------------------------------


def test_origin_bound_token_works_from_its_origin_with_cors(gateway: SidecarProcess) -> None:
    answer = chat(gateway, token(gateway, origin=ORIGIN), Origin=ORIGIN)
    assert answer.status == 200
    assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN
    exposed = answer.headers["Access-Control-Expose-Headers"]
    assert "X-Ringside-Model-Used" in exposed and "x-ratelimit-remaining-requests" in exposed
    assert "Origin" in answer.headers["Vary"]


@pytest.mark.parametrize(
    "origin", ["https://evil.example.com", "http://app.example.com", None], ids=str
)
def test_origin_bound_token_from_elsewhere_is_401_without_cors(
    gateway: SidecarProcess, origin: str | None
) -> None:
    headers = {"Origin": origin} if origin else {}
    answer = chat(gateway, token(gateway, origin=ORIGIN), **headers)
    assert_401(answer, "bound to origin")
    assert "Access-Control-Allow-Origin" not in answer.headers


def test_token_without_origin_gets_no_cors_headers(gateway: SidecarProcess) -> None:
    answer = chat(gateway, token(gateway), Origin=ORIGIN)
    assert answer.status == 200
    assert "Access-Control-Allow-Origin" not in answer.headers


def test_expired_token_401_is_readable_by_its_own_page(gateway: SidecarProcess) -> None:
    minted = token(gateway, origin=ORIGIN, ttl_seconds=1)
    wait_until(lambda: chat(gateway, minted, Origin=ORIGIN).status == 401, timeout=3, interval=0.2)
    answer = chat(gateway, minted, Origin=ORIGIN)
    assert_401(answer, "expired")
    assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_ip_bound_token_works_only_from_its_ip(gateway: SidecarProcess) -> None:
    minted = token(gateway, client_ip="203.0.113.9")
    # the sidecar trusts 127.0.0.1 as a proxy, so X-Forwarded-For names the client
    assert chat(gateway, minted, **{"X-Forwarded-For": "203.0.113.9"}).status == 200
    assert_401(chat(gateway, minted, **{"X-Forwarded-For": "203.0.113.10"}), "bound to IP")
    assert_401(chat(gateway, minted), "bound to IP")  # the peer itself, 127.0.0.1


def test_cors_preflight_is_answered_for_chat_completions(gateway: SidecarProcess) -> None:
    headers = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-lang",
    }
    answer = request(gateway.url, "OPTIONS", "/v1/chat/completions", None, headers)
    assert answer.status == 204
    assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in answer.headers["Access-Control-Allow-Methods"]
    allowed = answer.headers["Access-Control-Allow-Headers"].lower()
    for name in ("authorization", "content-type", "fc-customer", "x-stainless-lang"):
        assert name in allowed
    assert int(answer.headers["Access-Control-Max-Age"]) > 0
    models = request(gateway.url, "OPTIONS", "/v1/models", None, headers)
    assert "GET" in models.headers["Access-Control-Allow-Methods"]


def test_models_listing_with_an_origin_bound_token(gateway: SidecarProcess) -> None:
    minted = token(gateway, origin=ORIGIN)
    headers = {"Authorization": f"Client {minted}", "Origin": ORIGIN}
    answer = request(gateway.url, "GET", "/v1/models", None, headers)
    assert answer.status == 200
    assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN


# -- the key behind a token ---------------------------------------------------------------------


def test_token_of_a_revoked_key_is_401_after_reload(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(config(fake_openai.url), ENV)
    minted = token(proc)
    assert chat(proc, minted).status == 200
    revoked = config(fake_openai.url)
    revoked["keys"][0]["revoked"] = True
    proc.write_config(revoked)
    wait_until(lambda: chat(proc, minted).status == 401, timeout=2.5, interval=0.1)
    assert_401(chat(proc, minted), "'app'", "revoked")


def test_token_of_a_removed_key_is_401_after_reload(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(config(fake_openai.url), ENV)
    minted = token(proc)
    assert chat(proc, minted).status == 200
    removed = config(fake_openai.url)
    removed["keys"] = removed["keys"][1:]
    proc.write_config(removed)
    wait_until(lambda: chat(proc, minted).status == 401, timeout=2.5, interval=0.1)
    assert_401(chat(proc, minted), "no longer configured")


# -- ringside token mint --------------------------------------------------------------------------


def test_cli_minted_token_is_accepted_by_a_sidecar_with_the_same_secret(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    args = ["token", "mint", "--config", str(gateway.config_path), "--key-id", "app"]
    result = ringside(*args, "--customer", "cust_cli", env=ENV)
    assert result.returncode == 0, result.stderr
    minted = result.stdout.strip()
    answer = chat(gateway, minted, **{"X-Request-Id": "req_cli_token"})
    assert answer.status == 200
    assert log_line(gateway, "req_cli_token")["customer"] == "cust_cli"
    other = ringside(*args, "--customer", "c", env={"RINGSIDE_TOKEN_SECRET": "x" * 40})
    assert_401(chat(gateway, other.stdout.strip()), "signature")


def test_cli_mint_binds_what_it_is_asked_to(gateway: SidecarProcess) -> None:
    result = ringside(
        "token", "mint", "--config", str(gateway.config_path), "--key-id", "app",
        "--customer", "cust_cli", "--model", MINI, "--origin", ORIGIN,
        "--client-ip", "203.0.113.7", "--ttl", "60", "--json", env=ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["expires_in"] == 60
    assert (data["allowed_models"], data["origin"], data["client_ip"]) == (
        [MINI],
        ORIGIN,
        "203.0.113.7",
    )
    headers = {"Origin": ORIGIN, "X-Forwarded-For": "203.0.113.7"}
    assert chat(gateway, data["token"], **headers).status == 200
    assert chat(gateway, data["token"], model=BIG, **headers).status == 403


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["--key-id", "nobody"], ENV, "no key with id 'nobody'"),
        (["--key-id", "gone"], ENV, "revoked"),
        (["--key-id", "app", "--ttl", "7200"], ENV, "ttl_seconds"),
        (["--key-id", "app"], {}, "RINGSIDE_TOKEN_SECRET is not set"),
    ],
    ids=["unknown-key", "revoked-key", "ttl-over-max", "no-secret"],
)
def test_cli_mint_refuses_what_a_gateway_would_refuse(
    gateway: SidecarProcess, args: list[str], env: dict[str, str], words: str
) -> None:
    result = ringside(
        "token", "mint", "--config", str(gateway.config_path), "--customer", "c", *args, env=env
    )
    assert result.returncode == 2
    assert words in result.stderr
    assert result.stdout == ""


# -- without a secret ---------------------------------------------------------------------------


def test_without_a_secret_client_tokens_are_disabled(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(config(fake_openai.url))
    answer = mint(proc)
    assert answer.status == 501
    assert answer.error["code"] == "client_tokens_disabled"
    assert "RINGSIDE_TOKEN_SECRET" in answer.error["message"]
    now = int(time.time())
    claims = {"iss": "ringside", "sub": "app", "customer": "c", "iat": now, "exp": now + 60}
    assert_401(chat(proc, jwt.encode(claims, SECRET, "HS256")), "not enabled")
    preflight = request(
        proc.url, "OPTIONS", "/v1/chat/completions", None,
        {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
    )  # fmt: skip
    assert preflight.status == 204
    assert "Access-Control-Allow-Origin" not in preflight.headers
    assert "client tokens are disabled" in proc.stderr()


def test_a_short_secret_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "ringside.yaml"
    path.write_text(yaml.safe_dump(config("http://127.0.0.1:9/v1")))
    result = ringside("check-config", str(path), env={"RINGSIDE_TOKEN_SECRET": "short"})
    assert result.returncode == 1
    assert "tokens" in result.stderr and "at least 32" in result.stderr


def test_secret_env_names_the_variable(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    custom = config(fake_openai.url, tokens={"secret_env": "MY_TOKEN_SECRET", "max_ttl": 600})
    proc = sidecar_factory(custom, {"MY_TOKEN_SECRET": SECRET})
    assert mint(proc, ttl_seconds=600).status == 200
    assert mint(proc, ttl_seconds=601).error["param"] == "ttl_seconds"
    assert mint(proc).json()["expires_in"] == 600  # default_ttl 900 is capped by max_ttl


def test_token_not_valid_yet_is_401_saying_so(gateway: SidecarProcess) -> None:
    now = int(time.time())
    claims = {"iss": "ringside", "sub": "app", "customer": "c", "iat": now, "exp": now + 600,
              "nbf": now + 300}  # fmt: skip
    assert_401(chat(gateway, jwt.encode(claims, SECRET, "HS256")), "not valid yet", "nbf")


def test_token_issued_in_the_future_is_401_not_a_year_long_pass(gateway: SidecarProcess) -> None:
    later = int(time.time()) + 365 * 86400
    claims = {"iss": "ringside", "sub": "app", "customer": "c", "iat": later, "exp": later + 600}
    assert_401(chat(gateway, jwt.encode(claims, SECRET, "HS256")), "issued in the future")
    soon = int(time.time()) + 5  # within the clock skew allowed between replicas
    claims = {"iss": "ringside", "sub": "app", "customer": "c", "iat": soon, "exp": soon + 600}
    assert chat(gateway, jwt.encode(claims, SECRET, "HS256")).status == 200

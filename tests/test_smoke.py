import openai

from tests.upstreams.openai_fake import FakeOpenAI


def test_openai_sdk_gets_the_upstream_answer(sidecar, fake_openai: FakeOpenAI) -> None:
    client = openai.OpenAI(base_url=sidecar.base_url, api_key="unused-in-open-mode")
    raw = client.chat.completions.with_raw_response.create(
        model="fc:openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello from the fake upstream."
    assert completion.usage is not None and completion.usage.total_tokens == 18
    assert raw.headers["X-Ringside-Model-Used"] == "fc:openai/gpt-4o-mini"
    assert fake_openai.models_called() == ["gpt-4o-mini"]

"""Drives a running `moeshard serve` with the official `openai` Python package.

Usage: python3 tests/openai_client.py BASE_URL API_KEY MODEL
(run by tests/serve.rs; exits non-zero on the first failed check, and fails if `openai` is missing).
"""

import sys

import openai
from openai import OpenAI


def main() -> None:
    base_url, api_key, model = sys.argv[1], sys.argv[2], sys.argv[3]
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)
    checks = 0

    # Models.
    ids = [m.id for m in client.models.list().data]
    assert model in ids, ids
    checks += 1

    messages = [{"role": "user", "content": "Say something about experts."}]

    # Non-streamed chat with usage.
    full = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, seed=1
    )
    choice = full.choices[0]
    assert full.object == "chat.completion", full
    assert choice.message.role == "assistant", choice
    assert isinstance(choice.message.content, str), choice
    assert choice.finish_reason in ("stop", "length"), choice
    assert full.usage.prompt_tokens > 0, full.usage
    assert 0 < full.usage.completion_tokens <= 12, full.usage
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    checks += 1

    # Streamed chat: same text, finish reason on the last choice chunk, then a usage chunk.
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=12,
        temperature=0,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, roles = "", None, None, []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.usage is not None:
            assert chunk.choices == [], chunk
            usage = chunk.usage
            continue
        delta = chunk.choices[0].delta
        if delta.role:
            roles.append(delta.role)
        text += delta.content or ""
        if chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert roles == ["assistant"], roles
    assert text == choice.message.content, (text, choice.message.content)
    assert finish == choice.finish_reason, (finish, choice.finish_reason)
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens, usage
    checks += 1

    # Streamed chat without include_usage has no usage chunk.
    chunks = list(
        client.chat.completions.create(
            model=model, messages=messages, max_tokens=3, temperature=0, stream=True
        )
    )
    assert all(c.usage is None for c in chunks), chunks
    assert chunks[-1].choices[0].finish_reason in ("stop", "length"), chunks[-1]
    checks += 1

    # Completions, non-streamed and streamed.
    comp = client.completions.create(
        model=model, prompt="The quick brown fox", max_tokens=10, temperature=0
    )
    assert comp.object == "text_completion", comp
    assert comp.usage.completion_tokens <= 10, comp.usage
    streamed = ""
    for chunk in client.completions.create(
        model=model, prompt="The quick brown fox", max_tokens=10, temperature=0, stream=True
    ):
        streamed += chunk.choices[0].text if chunk.choices else ""
    assert streamed == comp.choices[0].text, (streamed, comp.choices[0].text)
    checks += 1

    # A stop string ends the output and is not included.
    long = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=24, temperature=0,
        extra_body={"ignore_eos": True},
    ).choices[0].text
    if len(long) >= 6:
        stop = long[3:5]
        cut = client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=24, temperature=0, stop=[stop],
            extra_body={"ignore_eos": True},
        ).choices[0]
        assert cut.finish_reason == "stop", cut
        assert cut.text == long[: long.index(stop)], (cut.text, long, stop)
        checks += 1

    # Errors surface as the client's typed exceptions.
    try:
        client.chat.completions.create(model=model, messages=messages, n=2)
        raise AssertionError("n=2 was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and "n" in str(e), e
    try:
        client.chat.completions.create(model="no-such-model", messages=messages)
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404, e
    try:
        OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401, e
    checks += 1

    print(f"openai {openai.__version__}: {checks} checks passed")


if __name__ == "__main__":
    main()

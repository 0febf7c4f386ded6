"""The official `openai` package against a nomoat gateway.

Usage: python3 openai_client.py BASE_URL MODEL

Checks models.list(), a non-streaming and a streaming chat completion that
name Paris, a text completion with a stop string and a seed, and the errors
for an unknown model and for max_tokens beyond the context. Prints one JSON
line of what it saw and exits 0, or raises.
"""

import json
import sys

import openai

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url, api_key="not-needed", max_retries=0, timeout=300)

    ids = [m.id for m in client.models.list()]
    assert model in ids, ids

    r = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=48)
    answer = r.choices[0].message.content
    assert "Paris" in answer, answer
    assert r.choices[0].finish_reason == "stop", r.choices[0].finish_reason
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0, r.usage
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    stream = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=48, stream=True, seed=7
    )
    pieces = []
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        if chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        finish = chunk.choices[0].finish_reason or finish
    streamed = "".join(pieces)
    assert len(pieces) > 1, pieces
    assert "Paris" in streamed, streamed
    assert streamed == answer, (streamed, answer)
    assert finish == "stop", finish

    c = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0.5, seed=3, stop=["."]
    )
    assert "." not in c.choices[0].text, c.choices[0].text

    try:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404
        assert "no-such-model" in str(e), str(e)

    try:
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=10**6)
        raise AssertionError("max_tokens beyond the context was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400
        assert e.code == "context_length_exceeded", e.code

    print(json.dumps({"models": ids, "answer": answer, "streamed_chunks": len(pieces), "completion": c.choices[0].text}))


if __name__ == "__main__":
    main()

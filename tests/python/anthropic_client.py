"""The official `anthropic` package against a nomoat gateway.

Usage: python3 anthropic_client.py BASE_URL MODEL

Checks a non-streaming and a streaming message that name Paris (greedy,
through extra_body: newer clients no longer take temperature as an
argument), the raw stream's event types, a stop sequence, a system
prompt, an assistant prefill, count_tokens, and the errors for a bad
request and an unknown model. Prints one JSON line of what it saw and
exits 0, or raises.
"""

import json
import sys

import anthropic

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0}


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    client = anthropic.Anthropic(base_url=base_url, api_key="not-needed", max_retries=0, timeout=300)
    seen = {}

    r = client.messages.create(model=model, max_tokens=48, messages=QUESTION, extra_body=GREEDY)
    assert r.type == "message" and r.role == "assistant", r
    assert r.id.startswith("msg_"), r.id
    answer = r.content[0].text
    assert "Paris" in answer, answer
    assert r.stop_reason == "end_turn", r.stop_reason
    assert r.stop_sequence is None, r.stop_sequence
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0, r.usage
    seen["answer"] = answer
    seen["usage"] = {"input": r.usage.input_tokens, "output": r.usage.output_tokens}

    # The helper stream: text pieces and a final message equal to the above.
    with client.messages.stream(model=model, max_tokens=48, messages=QUESTION, extra_body=GREEDY) as s:
        pieces = list(s.text_stream)
        final = s.get_final_message()
    assert len(pieces) > 1, pieces
    assert "".join(pieces) == answer, (pieces, answer)
    assert final.content[0].text == answer, final
    assert final.stop_reason == "end_turn", final.stop_reason
    assert final.usage.output_tokens == r.usage.output_tokens, final.usage
    assert final.usage.input_tokens == r.usage.input_tokens, final.usage
    seen["streamed_pieces"] = len(pieces)

    # The raw stream: Anthropic's event types in order.
    events = [
        e.type
        for e in client.messages.create(
            model=model, max_tokens=8, messages=QUESTION, stream=True, extra_body=GREEDY
        )
    ]
    assert events[0] == "message_start", events
    assert events[1] == "content_block_start", events
    assert "content_block_delta" in events, events
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"], events
    seen["events"] = sorted(set(events))

    # A stop sequence ends the text before it and is reported.
    r = client.messages.create(
        model=model, max_tokens=48, messages=QUESTION, stop_sequences=["Paris"], extra_body=GREEDY
    )
    assert r.stop_reason == "stop_sequence", r.stop_reason
    assert r.stop_sequence == "Paris", r.stop_sequence
    assert "Paris" not in r.content[0].text, r.content
    assert answer.startswith(r.content[0].text), (r.content[0].text, answer)
    seen["before_stop"] = r.content[0].text

    # max_tokens reached.
    r = client.messages.create(model=model, max_tokens=3, messages=QUESTION, extra_body=GREEDY)
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 3, r

    # A system prompt and an assistant prefill.
    r = client.messages.create(
        model=model,
        max_tokens=16,
        system="You answer in one word.",
        messages=QUESTION + [{"role": "assistant", "content": "The capital is"}],
        extra_body=GREEDY,
    )
    seen["prefilled"] = r.content[0].text

    # count_tokens agrees with the usage the answer reported.
    n = client.messages.count_tokens(model=model, messages=QUESTION)
    assert n.input_tokens == seen["usage"]["input"], (n, seen["usage"])

    try:
        client.messages.create(
            model=model, max_tokens=8, messages=QUESTION, extra_body={"temperature": 1.5}
        )
        raise AssertionError("temperature 1.5 was accepted")
    except anthropic.BadRequestError as e:
        assert e.status_code == 400
        assert e.body["type"] == "error", e.body
        assert e.body["error"]["type"] == "invalid_request_error", e.body
        seen["bad_request"] = e.body["error"]["message"]

    try:
        client.messages.create(model=model, max_tokens=10**6, messages=QUESTION)
        raise AssertionError("max_tokens beyond the context was accepted")
    except anthropic.BadRequestError as e:
        assert e.status_code == 400 and "context" in e.body["error"]["message"], e.body

    try:
        client.messages.create(model="no-such-model", max_tokens=8, messages=QUESTION)
        raise AssertionError("an unknown model was accepted")
    except anthropic.NotFoundError as e:
        assert e.status_code == 404
        assert e.body["error"]["type"] == "not_found_error", e.body
        assert "no-such-model" in e.body["error"]["message"], e.body

    print(json.dumps(seen))


if __name__ == "__main__":
    main()

"""Plays clients of a gateway that has an API key and listens on loopback.

Usage: api_guard.py HOST PORT MODEL KEY. Prints one JSON object with what
each client got.
"""

import http.client
import json
import sys

import anthropic
import openai

host, port, model, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
base = f"http://{host}:{port}/v1"
seen = {}

# The right key: the official client answers.
good = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)
r = good.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=12,
    temperature=0,
)
seen["answer"] = r.choices[0].message.content
seen["models"] = [m.id for m in good.models.list().data]

# A wrong key: OpenAI's AuthenticationError, with OpenAI's error body.
bad = openai.OpenAI(base_url=base, api_key="sk-wrong-0000000000", max_retries=0)
try:
    bad.models.list()
    seen["wrong_key"] = "accepted"
except openai.AuthenticationError as e:
    seen["wrong_key"] = {"status": e.status_code, "body": e.body}

# Anthropic's client sends its key as x-api-key, and gets Anthropic's errors.
good = anthropic.Anthropic(base_url=f"http://{host}:{port}", api_key=key, max_retries=0, timeout=120)
r = good.messages.create(
    model=model,
    max_tokens=12,
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    extra_body={"temperature": 0},
)
seen["anthropic_answer"] = r.content[0].text
bad = anthropic.Anthropic(base_url=f"http://{host}:{port}", api_key="sk-wrong-0000000000", max_retries=0)
try:
    bad.messages.count_tokens(model=model, messages=[{"role": "user", "content": "hi"}])
    seen["anthropic_wrong_key"] = "accepted"
except anthropic.AuthenticationError as e:
    seen["anthropic_wrong_key"] = {"status": e.status_code, "body": e.body}


def raw(method, path, headers, body=None):
    c = http.client.HTTPConnection(host, port, timeout=30)
    c.request(method, path, body=body, headers=headers)
    r = c.getresponse()
    data = r.read()
    try:
        data = json.loads(data)
    except ValueError:
        data = data.decode(errors="replace")
    return {"status": r.status, "body": data}


own = f"{host}:{port}"
seen["no_key"] = raw("GET", "/v1/models", {"Host": own})
seen["anthropic_no_key"] = raw(
    "POST",
    "/v1/messages",
    {"Host": own, "Content-Type": "application/json"},
    json.dumps({"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}),
)
seen["rebound_host"] = raw(
    "GET", "/v1/models", {"Host": f"evil.example:{port}", "Authorization": f"Bearer {key}"}
)
seen["foreign_origin"] = raw(
    "POST",
    "/v1/chat/completions",
    {
        "Host": own,
        "Origin": "http://evil.example",
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
    },
    json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
)
seen["own_origin_dashboard"] = raw(
    "GET", "/api/swarm", {"Host": own, "Origin": f"http://localhost:{port}"}
)["status"]
print(json.dumps(seen))

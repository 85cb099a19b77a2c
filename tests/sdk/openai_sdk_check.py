"""Drives gptbalance with the official OpenAI Python SDK.

Usage: openai_sdk_check.py BASE_URL TOKEN
Exits non-zero (with a traceback) on the first call that does not behave.
"""
import sys

from openai import OpenAI

base_url, token = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=20)

chat = client.chat.completions.create(
    model="gpt-4o-mini",
    messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    temperature=0.2,
)
assert chat.choices[0].message.content == "hello from sdk", chat
assert chat.usage.total_tokens == 18, chat.usage

completion = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi", max_tokens=5)
assert completion.choices[0].text == "hi", completion

emb = client.embeddings.create(model="text-embedding-3-small", input=["hello", "world"])
assert len(emb.data) == 2 and emb.usage.prompt_tokens == 2, emb

chunks = list(
    client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "stream please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == "Hello there", text
assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 5, chunks[-1]

# Without include_usage the SDK sees no usage chunk (gptbalance asked for it itself).
chunks = list(client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True))
assert all(c.usage is None for c in chunks), chunks
assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there"

models = client.models.list()
assert [m.id for m in models.data] == ["gpt-4o"], models
assert client.models.retrieve("gpt-4o").owned_by == "sdk"

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise SystemExit("expected a 404")
except Exception as e:  # openai.NotFoundError
    assert getattr(e, "status_code", None) == 404, e
    assert e.body["code"] == "model_not_found", e.body

print("sdk ok")

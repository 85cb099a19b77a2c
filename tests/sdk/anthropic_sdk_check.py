"""Drives gptbalance with the official Anthropic Python SDK.

Usage: anthropic_sdk_check.py BASE_URL TOKEN
The SDK sends the token as `x-api-key`. Exits non-zero (with a traceback)
on the first call that does not behave.
"""
import sys

import anthropic
from anthropic import Anthropic

base_url, token = sys.argv[1], sys.argv[2]
client = Anthropic(base_url=base_url, api_key=token, max_retries=0, timeout=20)

message = client.messages.create(
    model="claude-sonnet-4-5",
    max_tokens=64,
    messages=[{"role": "user", "content": "hi"}],
)
assert message.content[0].text == "hello from the messages api", message
assert message.usage.input_tokens == 10 and message.usage.output_tokens == 6, message.usage
assert message.usage.cache_read_input_tokens == 4, message.usage

with client.messages.stream(
    model="claude-sonnet-4-5",
    max_tokens=64,
    messages=[{"role": "user", "content": "stream please"}],
) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
assert text == "Hello there", text
assert final.usage.output_tokens == 5 and final.usage.input_tokens == 10, final.usage

# Raw events: every event the upstream sent reaches the SDK (which keeps
# `ping` to itself).
kinds = [
    e.type
    for e in client.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=64,
        messages=[{"role": "user", "content": "again"}],
        stream=True,
    )
]
assert kinds == [
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
], kinds

# A model no anthropic client serves: the SDK raises its own NotFoundError,
# parsed from Anthropic's error shape.
try:
    client.messages.create(model="gpt-4o", max_tokens=8, messages=[{"role": "user", "content": "x"}])
except anthropic.NotFoundError as e:
    assert e.body["error"]["type"] == "not_found_error", e.body
    assert "no `anthropic` client serves model `gpt-4o`" in e.body["error"]["message"], e.body
else:
    raise AssertionError("expected a 404")

# A wrong token: AuthenticationError.
bad = Anthropic(base_url=base_url, api_key="wrong", max_retries=0, timeout=20)
try:
    bad.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=[{"role": "user", "content": "x"}])
except anthropic.AuthenticationError as e:
    assert e.body["error"]["type"] == "authentication_error", e.body
else:
    raise AssertionError("expected a 401")

print("ok")

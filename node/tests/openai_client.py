"""Drives a running `tandem serve` with the official `openai` package (run by tests/serve.rs).

Usage: openai_client.py BASE_URL MODEL
"""

import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="not-needed", max_retries=0, timeout=300)


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}")


models = client.models.list()
check([m.id for m in models.data] == [model], f"models.list names {model}")

completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0)
check(completion.object == "text_completion", "completion object")
text = completion.choices[0].text
check("Paris" in text, f"completion text mentions Paris: {text!r}")
check(completion.usage.completion_tokens == 4 and completion.choices[0].finish_reason == "length", "completion usage and finish")

pieces = []
usage = None
for chunk in client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True}
):
    if chunk.choices:
        pieces.append(chunk.choices[0].text)
    if chunk.usage:
        usage = chunk.usage
check("".join(pieces) == text, f"streamed completion equals the plain one: {''.join(pieces)!r}")
check(usage is not None and usage.completion_tokens == 4, "usage arrives at the end of the stream")

messages = [{"role": "user", "content": "What is the capital of France?"}]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
answer = chat.choices[0].message.content
check(chat.choices[0].message.role == "assistant" and answer, f"chat answer: {answer!r}")

streamed = []
for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        streamed.append(chunk.choices[0].delta.content)
check("".join(streamed) == answer, "streamed chat equals the plain one")

stopped = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stop=["."])
check("." not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop", f"stop string: {stopped.choices[0].text!r}")

try:
    client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    check(False, "an unknown model is refused")
except openai.NotFoundError as e:
    check(e.status_code == 404 and "no-such-model" in str(e), "an unknown model raises NotFoundError")

try:
    client.completions.create(model=model, prompt="hi", max_tokens=100000)
    check(False, "a request over the context is refused")
except openai.BadRequestError as e:
    check(e.status_code == 400, "a request over the context raises BadRequestError")

print("all openai client checks passed")

"""Drives a Floodgate gateway with the official OpenAI Python SDK, as an application would.

Usage: openai_sdk_check.py --base-url http://127.0.0.1:PORT/v1 --model gpt-4o-mini [--model smart]

For every model: lists the models, completes a chat, streams a chat (with usage), and checks
that an unknown model raises the SDK's NotFoundError. The gateway must sit in front of the mock
providers, which answer "mock answer to: " + the first 40 characters of the last user message.
Prints one line per check and exits non-zero on the first failure.
"""

import argparse
import sys

import openai

PROMPT = "Please greet the OpenAI Python SDK, which is talking through Floodgate."
EXPECTED = "mock answer to: " + PROMPT[:40]


class CheckFailed(Exception):
    pass


def check(condition, what):
    if not condition:
        raise CheckFailed(what)


def messages():
    return [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": PROMPT},
    ]


def whole(client, model):
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages())
    provider = raw.headers.get("x-floodgate-provider")
    reply = raw.parse()
    check(reply.object == "chat.completion", f"object is {reply.object!r}")
    check(len(reply.choices) == 1, f"{len(reply.choices)} choices")
    content = reply.choices[0].message.content
    check(content == EXPECTED, f"content {content!r}, expected {EXPECTED!r}")
    check(reply.choices[0].message.role == "assistant", "role is not assistant")
    check(reply.choices[0].finish_reason == "stop", f"finish_reason {reply.choices[0].finish_reason!r}")
    check(reply.usage is not None and reply.usage.total_tokens > 0, f"usage {reply.usage!r}")
    print(f"ok   {model}: chat via {provider}: {content!r}, {reply.usage.total_tokens} tokens")


def streamed(client, model):
    parts, finish, usage, chunks = [], None, None, 0
    stream = client.chat.completions.create(
        model=model, messages=messages(), stream=True, stream_options={"include_usage": True}
    )
    for chunk in stream:
        chunks += 1
        check(chunk.object == "chat.completion.chunk", f"chunk object {chunk.object!r}")
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
            finish = choice.finish_reason or finish
    content = "".join(parts)
    check(content == EXPECTED, f"streamed content {content!r}, expected {EXPECTED!r}")
    check(finish == "stop", f"streamed finish_reason {finish!r}")
    check(usage is not None and usage.completion_tokens > 0, f"streamed usage {usage!r}")
    print(f"ok   {model}: streamed chat in {chunks} chunks: {content!r}")


def unknown_model(client):
    try:
        client.chat.completions.create(model="no-such-model", messages=messages())
    except openai.NotFoundError as e:
        check(isinstance(e.body, dict) and e.body.get("message"), f"error body {e.body!r}")
        print(f"ok   unknown model: NotFoundError ({e.body.get('code')})")
        return
    raise CheckFailed("an unknown model did not raise NotFoundError")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="the gateway's URL ending in /v1")
    parser.add_argument("--model", action="append", required=True, help="model or alias (repeatable)")
    parser.add_argument("--api-key", default="floodgate-sdk-check", help="sent as the bearer token")
    args = parser.parse_args()

    print(f"openai {openai.__version__} against {args.base_url}")
    # No retries: a failure must show, not be papered over.
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=20.0)
    try:
        listed = {m.id for m in client.models.list()}
        for model in args.model:
            check(model in listed, f"{model!r} not in /v1/models: {sorted(listed)}")
            whole(client, model)
            streamed(client, model)
        unknown_model(client)
    except (CheckFailed, openai.OpenAIError) as e:
        print(f"FAIL {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

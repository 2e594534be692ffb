"""Drives a Floodgate gateway with the official OpenAI Python SDK, as an application would.

Usage: openai_sdk_check.py --base-url http://127.0.0.1:PORT/v1 [--model gpt-4o-mini ...]
           [--embedding-model text-embedding-3-small=1536 ...] [--refused-embedding-model smart]

For every chat model (--model): lists the models, completes a chat, streams a chat (with
usage), and checks that an unknown model raises the SDK's NotFoundError. The gateway must sit in
front of the mock providers, which answer "mock answer to: " + the first 40 characters of the
last user message.

For every embedding model (--embedding-model MODEL[=DIMENSIONS]): embeds a batch as floats, as
base64 (decoded here), with the SDK's default encoding (base64 on the wire, decoded by the SDK)
and shortened with `dimensions`, and checks one unit-length vector per input, in order, of the
expected length, the same whatever the encoding; an unknown model raises NotFoundError. Each
--refused-embedding-model (served by a provider without embeddings) must raise BadRequestError.

Prints one line per check and exits non-zero on the first failure.
"""

import argparse
import base64
import math
import struct
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


EMBED_INPUTS = ["Floodgate embeds this line.", "And this one, through the OpenAI SDK.", "x"]
SHORT_DIMENSIONS = 64


def vectors_of(reply, model, dimensions):
    check(reply.object == "list", f"embeddings object {reply.object!r}")
    check(reply.model == model, f"embeddings model {reply.model!r}, expected {model!r}")
    check(len(reply.data) == len(EMBED_INPUTS), f"{len(reply.data)} embeddings for {len(EMBED_INPUTS)} inputs")
    check([d.index for d in reply.data] == list(range(len(EMBED_INPUTS))), "embeddings out of order")
    check(reply.usage.prompt_tokens > 0 and reply.usage.total_tokens == reply.usage.prompt_tokens,
          f"embeddings usage {reply.usage!r}")
    vectors = []
    for item in reply.data:
        vector = item.embedding
        if isinstance(vector, str):  # encoding_format="base64" given explicitly: the SDK leaves it
            raw = base64.b64decode(vector)
            check(len(raw) % 4 == 0, "base64 embedding is not whole float32s")
            vector = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        if dimensions is not None:
            check(len(vector) == dimensions, f"{len(vector)} dimensions, expected {dimensions}")
        norm = math.sqrt(sum(v * v for v in vector))
        check(abs(norm - 1.0) < 1e-3, f"embedding norm {norm}")
        vectors.append(vector)
    check(len({len(v) for v in vectors}) == 1, "embeddings of different lengths")
    return vectors


def same_vectors(a, b, what):
    close = all(abs(x - y) < 1e-6 for va, vb in zip(a, b) for x, y in zip(va, vb))
    check(len(a) == len(b) and close, f"{what} differ from the float embeddings")


def embeddings(client, spec):
    model, _, dims = spec.partition("=")
    dimensions = int(dims) if dims else None
    floats = vectors_of(
        client.embeddings.create(model=model, input=EMBED_INPUTS, encoding_format="float"), model, dimensions
    )
    packed = vectors_of(
        client.embeddings.create(model=model, input=EMBED_INPUTS, encoding_format="base64"), model, dimensions
    )
    same_vectors(floats, packed, "base64 embeddings")
    # No encoding_format: the SDK asks for base64 and decodes it itself.
    default = vectors_of(client.embeddings.create(model=model, input=EMBED_INPUTS), model, dimensions)
    same_vectors(floats, default, "the SDK's default embeddings")
    short = vectors_of(
        client.embeddings.create(model=model, input=EMBED_INPUTS, dimensions=SHORT_DIMENSIONS),
        model,
        SHORT_DIMENSIONS,
    )
    print(
        f"ok   {model}: {len(floats)} embeddings of {len(floats[0])} dimensions as float, base64 and "
        f"the SDK default; {len(short[0])} with dimensions={SHORT_DIMENSIONS}"
    )


def refused_embeddings(client, model):
    try:
        client.embeddings.create(model=model, input=EMBED_INPUTS)
    except openai.BadRequestError as e:
        check(isinstance(e.body, dict) and e.body.get("message"), f"error body {e.body!r}")
        print(f"ok   {model}: embeddings refused with BadRequestError ({e.body.get('code')})")
        return
    raise CheckFailed(f"embeddings with {model!r} did not raise BadRequestError")


def unknown_embedding_model(client):
    try:
        client.embeddings.create(model="no-such-embedding-model", input=EMBED_INPUTS)
    except openai.NotFoundError as e:
        print(f"ok   unknown embedding model: NotFoundError ({e.body.get('code')})")
        return
    raise CheckFailed("an unknown embedding model did not raise NotFoundError")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="the gateway's URL ending in /v1")
    parser.add_argument("--model", action="append", default=[], help="chat model or alias (repeatable)")
    parser.add_argument(
        "--embedding-model", action="append", default=[], help="MODEL[=DIMENSIONS] to embed with (repeatable)"
    )
    parser.add_argument(
        "--refused-embedding-model", action="append", default=[], help="model whose embeddings must be refused"
    )
    parser.add_argument("--api-key", default="floodgate-sdk-check", help="sent as the bearer token")
    args = parser.parse_args()
    if not args.model and not args.embedding_model:
        parser.error("give at least one --model or --embedding-model")

    print(f"openai {openai.__version__} against {args.base_url}")
    # No retries: a failure must show, not be papered over.
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=20.0)
    try:
        listed = {m.id for m in client.models.list()}
        for model in args.model:
            check(model in listed, f"{model!r} not in /v1/models: {sorted(listed)}")
            whole(client, model)
            streamed(client, model)
        if args.model:
            unknown_model(client)
        for spec in args.embedding_model:
            model = spec.partition("=")[0]
            check(model in listed, f"{model!r} not in /v1/models: {sorted(listed)}")
            embeddings(client, spec)
        for model in args.refused_embedding_model:
            refused_embeddings(client, model)
        if args.embedding_model:
            unknown_embedding_model(client)
    except (CheckFailed, openai.OpenAIError) as e:
        print(f"FAIL {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

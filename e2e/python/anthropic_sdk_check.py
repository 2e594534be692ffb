"""Drives a Floodgate gateway with the official Anthropic Python SDK, as an application would.

Usage: anthropic_sdk_check.py --base-url http://127.0.0.1:PORT --model claude-sonnet-4 [--model gpt-4o-mini]
       [--reports-stop-sequence claude-sonnet-4]

For every model: counts the prompt's tokens, sends a message, streams a message (checking the
final usage), sends a message and streams one with a cached system prompt (`cache_control`)
and a stop sequence the answer contains (the answer must end before it; `stop_reason` must be
`stop_sequence` with the sequence for the models named by --reports-stop-sequence, whose
upstream says which sequence matched, and `end_turn` for the others, whose upstream cannot
tell), and sends `anthropic-beta` headers (a portable beta works everywhere; an unknown one is
refused with a 400 naming it unless the model's upstream is Anthropic's). At the end checks
that an unknown model raises the SDK's NotFoundError. The gateway must sit in front of the mock
providers, which answer "mock answer to: " + the first 40 characters of the last user message
and honour stop sequences. Prints one line per check and exits non-zero on the first failure.
"""

import argparse
import sys

import anthropic

PROMPT = "Please greet the Anthropic Python SDK, which is talking through Floodgate."
EXPECTED = "mock answer to: " + PROMPT[:40]
SYSTEM = "Answer in one line."
MAX_TOKENS = 200
# A word of the mock's answer: the answer must end just before it.
STOP = "Python"
STOPPED = EXPECTED[: EXPECTED.index(STOP)]
CACHED_SYSTEM = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
UNKNOWN_BETA = "no-such-beta-2099-01-01"


class CheckFailed(Exception):
    pass


def check(condition, what):
    if not condition:
        raise CheckFailed(what)


def messages():
    return [{"role": "user", "content": PROMPT}]


def count(client, model):
    counted = client.messages.count_tokens(model=model, system=SYSTEM, messages=messages())
    check(counted.input_tokens > 0, f"count_tokens {counted.input_tokens}")
    print(f"ok   {model}: count_tokens estimates {counted.input_tokens} input tokens")


def whole(client, model):
    raw = client.messages.with_raw_response.create(
        model=model, max_tokens=MAX_TOKENS, system=SYSTEM, messages=messages()
    )
    provider = raw.headers.get("x-floodgate-provider")
    check(provider, "no x-floodgate-provider header")
    reply = raw.parse()
    check(reply.type == "message", f"type is {reply.type!r}")
    check(reply.role == "assistant", f"role is {reply.role!r}")
    check(reply.id.startswith("msg_"), f"id {reply.id!r}")
    check(reply.model == model, f"model {reply.model!r}, expected {model!r}")
    check(len(reply.content) == 1 and reply.content[0].type == "text", f"content {reply.content!r}")
    text = reply.content[0].text
    check(text == EXPECTED, f"text {text!r}, expected {EXPECTED!r}")
    check(reply.stop_reason == "end_turn", f"stop_reason {reply.stop_reason!r}")
    usage = reply.usage
    check(usage.input_tokens > 0 and usage.output_tokens > 0, f"usage {usage!r}")
    print(f"ok   {model}: message via {provider}: {text!r}, {usage.output_tokens} output tokens")


def streamed(client, model):
    parts = []
    with client.messages.stream(
        model=model, max_tokens=MAX_TOKENS, system=SYSTEM, messages=messages()
    ) as stream:
        for text in stream.text_stream:
            parts.append(text)
        final = stream.get_final_message()
    text = "".join(parts)
    check(text == EXPECTED, f"streamed text {text!r}, expected {EXPECTED!r}")
    check(final.content[0].text == EXPECTED, f"final message content {final.content!r}")
    check(final.stop_reason == "end_turn", f"streamed stop_reason {final.stop_reason!r}")
    check(final.model == model, f"streamed model {final.model!r}")
    usage = final.usage
    check(usage.output_tokens > 0 and usage.input_tokens > 0, f"streamed usage {usage!r}")
    print(f"ok   {model}: streamed message in {len(parts)} deltas, {usage.output_tokens} output tokens")


def expected_stop(model, reported):
    """stop_reason and stop_sequence the gateway must report for a stopped answer."""
    return ("stop_sequence", STOP) if model in reported else ("end_turn", None)


def stopped(client, model, reported):
    reason, sequence = expected_stop(model, reported)
    reply = client.messages.create(
        model=model, max_tokens=MAX_TOKENS, system=CACHED_SYSTEM, messages=messages(),
        stop_sequences=[STOP],
    )
    text = reply.content[0].text if reply.content else ""
    check(text == STOPPED, f"stopped text {text!r}, expected {STOPPED!r}")
    check(reply.stop_reason == reason, f"stop_reason {reply.stop_reason!r}, expected {reason!r}")
    check(reply.stop_sequence == sequence, f"stop_sequence {reply.stop_sequence!r}, expected {sequence!r}")
    with client.messages.stream(
        model=model, max_tokens=MAX_TOKENS, system=CACHED_SYSTEM, messages=messages(),
        stop_sequences=[STOP],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    check(text == STOPPED, f"streamed stopped text {text!r}, expected {STOPPED!r}")
    check(final.stop_reason == reason, f"streamed stop_reason {final.stop_reason!r}, expected {reason!r}")
    check(final.stop_sequence == sequence, f"streamed stop_sequence {final.stop_sequence!r}")
    print(f"ok   {model}: cached system prompt, stop sequence: {reason} {sequence!r}, streamed too")


def betas(client, model, anthropic_upstream):
    reply = client.beta.messages.create(
        model=model, max_tokens=MAX_TOKENS, messages=messages(), betas=["prompt-caching-2024-07-31"]
    )
    check(reply.content[0].text == EXPECTED, f"beta reply {reply.content!r}")
    if anthropic_upstream:
        client.beta.messages.create(
            model=model, max_tokens=MAX_TOKENS, messages=messages(), betas=[UNKNOWN_BETA]
        )
        print(f"ok   {model}: betas forwarded to Anthropic")
        return
    try:
        client.beta.messages.create(
            model=model, max_tokens=MAX_TOKENS, messages=messages(), betas=[UNKNOWN_BETA]
        )
    except anthropic.BadRequestError as e:
        error = e.body.get("error", {}) if isinstance(e.body, dict) else {}
        check(error.get("type") == "invalid_request_error", f"error body {e.body!r}")
        check(UNKNOWN_BETA in error.get("message", ""), f"refusal does not name the beta: {e.body!r}")
        print(f"ok   {model}: portable beta accepted, unknown beta refused by name")
        return
    raise CheckFailed(f"{model}: an unknown beta was not refused")


def unknown_model(client):
    try:
        client.messages.create(model="no-such-model", max_tokens=MAX_TOKENS, messages=messages())
    except anthropic.NotFoundError as e:
        error = e.body.get("error", {}) if isinstance(e.body, dict) else {}
        check(error.get("type") == "not_found_error", f"error body {e.body!r}")
        check(error.get("message"), f"error body without a message: {e.body!r}")
        print(f"ok   unknown model: NotFoundError ({error.get('type')})")
        return
    raise CheckFailed("an unknown model did not raise NotFoundError")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="the gateway's URL, without /v1")
    parser.add_argument("--model", action="append", required=True, help="model or alias (repeatable)")
    parser.add_argument("--api-key", default="floodgate-sdk-check", help="sent as x-api-key")
    parser.add_argument(
        "--reports-stop-sequence", action="append", default=[],
        help="a model whose upstream says which stop sequence matched (repeatable)",
    )
    args = parser.parse_args()

    print(f"anthropic {anthropic.__version__} against {args.base_url}")
    # No retries: a failure must show, not be papered over.
    client = anthropic.Anthropic(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=20.0)
    try:
        for model in args.model:
            count(client, model)
            whole(client, model)
            streamed(client, model)
            stopped(client, model, args.reports_stop_sequence)
            betas(client, model, model in args.reports_stop_sequence)
        unknown_model(client)
    except (CheckFailed, anthropic.AnthropicError) as e:
        print(f"FAIL {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Drives Floodgate's Batch API with the official OpenAI Python SDK, as an application would.

Usage: openai_batch_check.py --base-url http://127.0.0.1:PORT/v1 --api-key KEY --model MODEL
           [--lines N] [--cancel-model SLOW_MODEL]

Uploads a JSONL file of N chat requests (`client.files.create`, purpose `batch`), creates a
batch (`client.batches.create`), polls it (`client.batches.retrieve`) until it ends, downloads
its output file (`client.files.content`) and checks one answer per line, by custom_id. With
--cancel-model, then creates a batch of that (slow) model and cancels it at once
(`client.batches.cancel`), polling it until it ends. Prints one JSON line: {"status",
"completed", "failed", "custom_ids", "request_ids", "cancel"}; exits non-zero on the first
failed check.
"""

import argparse
import io
import json
import sys
import time

import openai


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--lines", type=int, default=6)
    parser.add_argument("--cancel-model")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)

    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": args.model, "messages": [{"role": "user", "content": f"question {i}"}]},
        }
        for i in range(args.lines)
    ]
    data = "".join(json.dumps(l) + "\n" for l in lines).encode()
    uploaded = client.files.create(file=("batch.jsonl", io.BytesIO(data)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(data), uploaded

    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "in_progress", batch
    assert batch.request_counts.total == args.lines, batch
    deadline = time.time() + 60
    while batch.status in ("validating", "in_progress", "finalizing", "cancelling"):
        assert time.time() < deadline, f"batch still {batch.status}"
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == args.lines, batch
    assert batch.output_file_id, batch

    output = client.files.content(batch.output_file_id).text
    results = [json.loads(l) for l in output.splitlines() if l.strip()]
    custom_ids = sorted(r["custom_id"] for r in results)
    assert custom_ids == sorted(l["custom_id"] for l in lines), custom_ids
    for r in results:
        body = r["response"]["body"]
        assert r["response"]["status_code"] == 200, r
        i = r["custom_id"].split("-")[1]
        text = body["choices"][0]["message"]["content"]
        assert f"question {i}" in text, (r["custom_id"], text)
    cancel = None
    if args.cancel_model:
        cancel = cancelled(client, args.cancel_model)
    print(json.dumps({
        "cancel": cancel,
        "status": batch.status,
        "batch_id": batch.id,
        "output_file_id": batch.output_file_id,
        "completed": batch.request_counts.completed,
        "failed": batch.request_counts.failed,
        "custom_ids": custom_ids,
        "request_ids": [r["response"]["request_id"] for r in results],
    }))


def cancelled(client, model):
    """A batch of three `model` lines, cancelled as soon as it is created: its statuses."""
    lines = [
        {
            "custom_id": f"slow-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"slow {i}"}]},
        }
        for i in range(3)
    ]
    data = "".join(json.dumps(l) + "\n" for l in lines).encode()
    uploaded = client.files.create(file=("slow.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    asked = client.batches.cancel(batch.id)
    assert asked.id == batch.id and asked.status in ("cancelling", "cancelled"), asked
    deadline = time.time() + 60
    ended = asked
    while ended.status == "cancelling":
        assert time.time() < deadline, "batch still cancelling"
        time.sleep(0.2)
        ended = client.batches.retrieve(batch.id)
    assert ended.cancelled_at, ended
    return {"asked": asked.status, "ended": ended.status, "total": ended.request_counts.total}


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - the test reads the reason
        print(f"FAILED: {e!r}", file=sys.stderr)
        sys.exit(1)

#!/usr/bin/env python3
"""The seed scenario's workload (e2e/bench/seed.sh): JSON lines for `tierload --prompts`.

How it is built (deterministic: random.Random(SEED)):

- Prompts come from a fixed universe per class, generated from phrase templates and 400 topics
  (40 subjects x 10 contexts; no downloaded data set): simple (one short question), medium (a
  request of a few sentences, 100-400 characters), complex (multi-step or design wording) and
  code (a fenced snippet or SQL). Each prompt has two other wordings of the same question.
- The class of each request is drawn from MIX (40% simple, as the seed says).
- Which prompt of the class: a Zipf-like draw (rank r with weight 1 / r^ZIPF_S, s = 0.8) over
  the class's prompts, so a few questions are asked very often and most rarely: the exact
  cache's repeats. With these settings about 41% of a tier's requests repeat an earlier one
  word for word (repeats and duplicates together), which is the seed's assumption (30% cache,
  then 15% of the rest deduplicated: 40.5%): the bench measures whether the gateway captures
  the repetition there is, not how much repetition real traffic has.
- A draw is worded as a paraphrase with probability PARAPHRASE: the same meaning in other
  words, a miss for the exact cache (and what a semantic cache would answer).
- With probability BURST a request is followed at once by 1-3 copies of itself (a retrying
  client, a page rendered twice): concurrent duplicates, joined by dedup.
- TEMPLATE of the requests are canned questions the CachePolicy's templates answer (greetings,
  opening hours).

Each tier draws its own sequence (a tenant per tier; the cache is scoped per tenant).

Usage: seed_workload.py OUT.jsonl TIER=COUNT...
"""

import json
import random
import sys

SEED = 13
MIX = {"simple": 0.40, "medium": 0.30, "complex": 0.15, "code": 0.15}
ZIPF_S = 0.8
PARAPHRASE = 0.20
BURST = 0.06
TEMPLATE = 0.03
MODEL = "smart"

SUBJECTS = [
    "invoices", "refunds", "passwords", "two-factor login", "shipping", "returns", "the API",
    "rate limits", "webhooks", "billing cycles", "team seats", "SSO", "data export",
    "the mobile app", "notifications", "dark mode", "time zones", "CSV imports", "audit logs",
    "API keys", "usage reports", "trial plans", "discount codes", "the status page",
    "GDPR requests", "account deletion", "invoice PDFs", "currency settings", "tax IDs",
    "support tickets", "the dashboard", "search filters", "saved views", "integrations",
    "Slack alerts", "email digests", "payment methods", "plan upgrades", "plan downgrades",
    "usage limits",
]
CONTEXTS = ["in the web app", "in the mobile app", "for admins", "for new users", "on the API",
            "for teams", "on invoices", "in Europe", "in the US", "after an upgrade"]
TOPICS = [f"{s} {c}" for s in SUBJECTS for c in CONTEXTS]
SIMPLE = [
    ("How do I reset {t}?", "What's the way to reset {t}?", "Reset {t} - how?"),
    ("Where can I find {t}?", "Where are {t} located?", "How do I get to {t}?"),
    ("Is {t} free?", "Do {t} cost extra?", "Are {t} included for free?"),
    ("What is {t}?", "Can you explain {t} briefly?", "{t}: what are they?"),
    ("Can I turn off {t}?", "How to disable {t}?", "Is there a way to switch off {t}?"),
]
MEDIUM = [
    ("Write a short, friendly email to a customer who asked about {t}, explaining the "
     "usual steps and where to find more help in our documentation.",
     "Draft a brief and friendly reply to a customer asking about {t}: outline the usual "
     "steps and point them to the documentation for more help.",
     "Please compose a friendly short email answering a customer's question on {t}, with "
     "the common steps and a pointer to our docs."),
    ("Summarise in three bullet points what a new user should know about {t} before their "
     "first week with the product.",
     "Give a new user three bullet points on {t} they should know during their first week "
     "with the product.",
     "In three bullets, what should someone new to the product know about {t} in week one?"),
]
COMPLEX = [
    ("First compare two ways to handle {t} for a multi-tenant product, then weigh the "
     "trade-offs for a team of five, and finally recommend a design with reasons.",
     "Compare two approaches to {t} in a multi-tenant product, weigh their trade-offs for a "
     "five-person team, then finally recommend one design and explain why.",
     "Step by step: contrast two designs for {t} in a multi-tenant system, consider the "
     "trade-offs for a small team, and end with a recommendation."),
]
CODE = [
    ("Why does this fail?\n```python\ndef {f}(items):\n    return items[0].{f}()\n```",
     "What is wrong with this code?\n```python\ndef {f}(items):\n    return items[0].{f}()\n```",
     "This raises an error, why?\n```python\ndef {f}(items):\n    return items[0].{f}()\n```"),
    ("Write a SQL query that counts {t} per account for the last 30 days.",
     "Give me a SQL query counting {t} by account over the past 30 days.",
     "SQL: number of {t} per account in the last 30 days?"),
]
TEMPLATES = ["Hello!", "hi", "What are your business hours?", "what are your opening hours?"]


def universe():
    """Prompts per class: a list of (canonical, paraphrases)."""
    out = {}
    for cls, forms in (("simple", SIMPLE), ("medium", MEDIUM), ("complex", COMPLEX), ("code", CODE)):
        prompts = []
        for t in TOPICS:
            for form in forms:
                f = t.replace(" ", "_").replace("-", "_").lower()
                words = [w.format(t=t, f=f) for w in form]
                words = [w[0].upper() + w[1:] for w in words]
                prompts.append((words[0], words[1:]))
        out[cls] = prompts
    return out


def zipf_weights(n):
    return [1.0 / (r ** ZIPF_S) for r in range(1, n + 1)]


def tier_sequence(rng, prompts, count):
    order = {c: rng.sample(ps, len(ps)) for c, ps in prompts.items()}
    weights = {c: zipf_weights(len(ps)) for c, ps in order.items()}
    classes, mix = list(MIX), [MIX[c] for c in MIX]
    seq = []
    while len(seq) < count:
        if rng.random() < TEMPLATE:
            seq.append(rng.choice(TEMPLATES))
            continue
        cls = rng.choices(classes, mix)[0]
        canonical, paraphrases = rng.choices(order[cls], weights[cls])[0]
        text = rng.choice(paraphrases) if rng.random() < PARAPHRASE else canonical
        seq.append(text)
        if rng.random() < BURST:
            seq.extend([text] * rng.randint(1, 3))
    return seq[:count]


def main():
    out, specs = sys.argv[1], sys.argv[2:]
    rng = random.Random(SEED)
    prompts = universe()
    with open(out, "w") as f:
        for spec in specs:
            tier, count = spec.split("=")
            for text in tier_sequence(rng, prompts, int(count)):
                line = {"tier": tier, "model": MODEL,
                        "messages": [{"role": "user", "content": text}]}
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()

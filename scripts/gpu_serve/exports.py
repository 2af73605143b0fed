"""SGLang's per-request export (``--export-metrics-to-file``), read by the harness and by the summary.

One JSON object a line per finished request, with SGLang's own wall-clock timestamps (``request_received_ts``,
``api_server_dispatch_finish_ts``, ``request_finished_ts``, ...). Several tokenizer workers may interleave a line;
such a line is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path


def request_records(export_dir: Path, window: list[float] | None = None) -> list[dict]:
    """Every exported request, by receipt time; with ``window``, those received within it (one harness run)."""
    records = []
    for f in sorted(export_dir.glob("*.log")):
        for line in f.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    records = [r for r in records if "request_received_ts" in r]  # none without --enable-metrics
    records.sort(key=lambda r: r["request_received_ts"])
    if window:
        return [r for r in records if window[0] <= r["request_received_ts"] <= window[1]]
    return records


def measured_records(records: list[dict], requested: int | None) -> list[dict]:
    """A run's records (by receipt) without the load generator's warm-up.

    SGLang's ``bench_serving`` sends ``--warmup-requests`` requests (default 1) and waits for them before its
    ``requested`` measured ones, and its results leave them out; in a run's window they are the first
    ``len(records) - requested`` receipts, 1.4-2.5 s ahead of the measured ones (660b520's runs). Counted in, they
    moved a seed burst's timeline and ``arrivals_s`` by that lead. Records that do not look so (no count, or a first
    one still running when the measured ones began) are returned as they are."""
    extra = len(records) - (requested or 0)
    if not requested or extra <= 0:
        return records
    warmup, measured = records[:extra], records[extra:]
    if any(r.get("request_finished_ts", float("inf")) > measured[0]["request_received_ts"] for r in warmup):
        return records
    return measured


def arrival_span(records: list[dict]) -> dict[str, float]:
    """``arrivals_s``: first to last receipt; ``drain_s``: last receipt to last finish (empty without records).

    SGLang's load generator fixes the intervals by its seed, yet its own event loop stretches them while it is busy
    reading streams, so two servers can get the same requests over spans seconds apart; tokens over the run's
    duration then measure the client, and ``drain_s`` is what the server added after the last arrival. The receipt
    itself is stamped by the server (``received_time``, taken by SGLang 0.5.16's HTTP handler on the loop that, with
    one tokenizer worker, also runs the tokenizer manager's preprocessing), so a server whose loop is busier
    stretches its own span too: a longer ``arrivals_s`` is not proof that the client was the cause."""
    if not records:
        return {}
    last = records[-1]["request_received_ts"]
    return {"arrivals_s": round(last - records[0]["request_received_ts"], 2),
            "drain_s": round(max(r.get("request_finished_ts", last) for r in records) - last, 2)}


def last_finisher(records: list[dict]) -> dict[str, float]:
    """A paced run's drain (:func:`arrival_span`) ends with the request that finished last: ``last_first_token_s``
    (its receipt to its first chunk, which SGLang stamps on a streamed request's first chunk) and ``last_decode_s``
    (that chunk to its finish). With every request of one length (the harness's Poisson loads: 128 tokens,
    ``ignore_eos``) the drain is mostly that one request's decode, so two servers' tok/s over the same arrivals
    differ by how fast each decoded its last requests. Empty without records or where SGLang did not export the
    first chunk's time."""
    if not records:
        return {}
    final = max(records, key=lambda r: r.get("request_finished_ts", 0.0))
    if "response_sent_to_client_ts" not in final or "request_finished_ts" not in final:
        return {}
    return {"last_first_token_s": round(final["response_sent_to_client_ts"] - final["request_received_ts"], 3),
            "last_decode_s": round(final["request_finished_ts"] - final["response_sent_to_client_ts"], 3)}

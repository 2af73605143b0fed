"""Per-request stage breakdown from SGLang 0.5.16's own request timing.

Input: the files SGLang writes with `--enable-metrics --export-metrics-to-file --export-metrics-to-file-dir DIR`
(DIR/sglang-request-metrics-YYYYmmdd_HH.log, one JSON object per finished request, written by
sglang/srt/observability/request_metrics_exporter.py). Without --enable-metrics the records carry no stage
timestamps (only e2e_latency): the tokenizer manager adds them only `if self.enable_metrics`.

A record is {"request_parameters": "<GenerateReqInput fields as a JSON string>", **meta_info}; the timing keys of
meta_info (all wall-clock seconds since the epoch, converted from each process's perf_counter):

  request_received_ts            HTTP handler entered (OpenAI serving_base.handle_request: received_time)
  api_server_dispatch_finish_ts  tokenizer manager sent the tokenized request to the scheduler
  forward_entry_time             scheduler put the request in a prefill batch (first chunk)
  queue_time                     seconds in the scheduler's waiting queue (forward_entry - wait_queue_entry)
  prefill_finished_time          scheduler processed the last prefill chunk's result (first token sampled)
  request_finished_ts            tokenizer manager saw the finished output
  response_sent_to_client_ts     just before the response went back to the HTTP layer
  e2e_latency                    request_finished - request_received (seconds)
  decode_throughput              (completion_tokens - 1) / (request_finished - first output seen), tok/s

Stages (seconds) per request:

  preprocess  = api_server_dispatch_finish_ts - request_received_ts   chat template, tokenize, image load +
                HF processor (SGLang 0.5.16 runs the fast image processor on cuda:base_gpu_id), send
  intake      = (forward_entry_time - queue_time) - api_server_dispatch_finish_ts   ZMQ + scheduler receive
                (Req creation, mm hashing / pad_input_ids); includes time the scheduler loop was busy
  queue       = queue_time
  prefill     = prefill_finished_time - forward_entry_time   the VISION ENCODER runs in here (SGLang encodes the
                images inside the extend forward: general_mm_embed_routine), plus the LM prefill, plus waits
                between chunks of a chunked prefill
  decode      = request_finished_ts - prefill_finished_time   decode steps + detokenizer + tokenizer manager
  respond     = response_sent_to_client_ts - request_finished_ts
  ttft_server = prefill_finished_time - request_received_ts

SGLang 0.5.16 has no per-request encoder time in a unified (non-EPD) server: EncoderReqTimeStats and the
sglang:encoder_* histograms exist only on an `--encoder-only` EPD encode server. The encoder's share comes from
Prometheus (`--prom-before/--prom-after`, two scrapes of /metrics around the run): the plugin's
mm_coalescer_batch_seconds (tower forwards, dispatch -> results), mm_coalescer_prefill_wait_seconds (time the
scheduler blocked inside a prefill waiting for encoder results) and, with SGLANG_ENABLE_METRICS_DEVICE_TIMER=1,
sglang:forward_execution_seconds_total{category="extend"|"decode"} (GPU time of forwards; extend includes the
encoder when the plugin is off).

Optional `--server-log`: lines from `--enable-request-time-stats-logging`
("ReqTimeStats(rid=..., input_len=..., cached_input_len=..., output_len=..., attempts=..., type=unified):
queue_duration=1.23ms, forward_duration=45.67ms, entry_time=1765000000.123") are joined by rid
(forward_duration = forward_entry -> completion on the scheduler).

usage: python breakdown.py DIR_OR_FILES... [--json OUT] [--server-log LOG] [--prom-before F --prom-after F]
       [--skip-first N]
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
from collections.abc import Iterable
from typing import Any

STAGES = ("preprocess", "intake", "queue", "prefill", "decode", "respond")
EXTRA = ("ttft_server", "e2e", "stage_sum")

_REQ_TIME_STATS = re.compile(
    r"ReqTimeStats\(rid=(?P<rid>[^,]+),.*?input_len=(?P<input_len>\d+), cached_input_len=(?P<cached>\d+), "
    r"output_len=(?P<output_len>\d+).*?\):\s*(?P<body>.*)$")
_KV_MS = re.compile(r"(\w+)=([-0-9.]+)ms")


def metric_files(paths: Iterable[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            out.extend(sorted(glob.glob(os.path.join(p, "sglang-request-metrics-*.log"))))
        else:
            out.append(p)
    return out


def read_records(files: Iterable[str]) -> list[dict]:
    recs = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError:
                    print(f"[breakdown] {f}:{n}: not JSON, skipped", file=sys.stderr)
    return recs


def _num(rec: dict, key: str) -> float | None:
    v = rec.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
        return float(v)
    return None


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def request_params(rec: dict) -> dict:
    p = rec.get("request_parameters")
    if isinstance(p, dict):
        return p
    if isinstance(p, str):
        try:
            v = json.loads(p)
            return v if isinstance(v, dict) else {}
        except json.JSONDecodeError:
            return {}
    return {}


def is_aborted(rec: dict) -> bool:
    fr = rec.get("finish_reason")
    return isinstance(fr, dict) and fr.get("type") == "abort"


def stages(rec: dict) -> dict[str, Any]:
    """Stage durations (seconds) of one exported record; None where a timestamp is missing."""
    recv = _num(rec, "request_received_ts")
    disp = _num(rec, "api_server_dispatch_finish_ts")
    fwd = _num(rec, "forward_entry_time")
    pre_done = _num(rec, "prefill_finished_time")
    fin = _num(rec, "request_finished_ts")
    sent = _num(rec, "response_sent_to_client_ts")
    q = rec.get("queue_time")
    q = float(q) if isinstance(q, (int, float)) and not isinstance(q, bool) and fwd is not None and q >= 0 else None
    wait_entry = fwd - q if fwd is not None and q is not None else None
    out: dict[str, Any] = {
        "preprocess": _diff(disp, recv),
        "intake": _diff(wait_entry, disp),
        "queue": q,
        "prefill": _diff(pre_done, fwd),
        "decode": _diff(fin, pre_done),
        "respond": _diff(sent, fin),
        "ttft_server": _diff(pre_done, recv),
        "e2e": float(rec["e2e_latency"]) if isinstance(rec.get("e2e_latency"), (int, float)) else _diff(fin, recv),
    }
    parts = [out[s] for s in STAGES if s != "respond"]
    out["stage_sum"] = sum(parts) if all(p is not None for p in parts) else None
    return out


def request_row(rec: dict) -> dict[str, Any]:
    params = request_params(rec)
    row: dict[str, Any] = {
        "rid": rec.get("id") or params.get("rid"),
        "prompt_tokens": rec.get("prompt_tokens"),
        "image_tokens": rec.get("image_tokens"),
        "video_tokens": rec.get("video_tokens"),
        "completion_tokens": rec.get("completion_tokens"),
        "cached_tokens": rec.get("cached_tokens"),
        "num_retractions": rec.get("num_retractions"),
        "finish_reason": (rec.get("finish_reason") or {}).get("type")
        if isinstance(rec.get("finish_reason"), dict) else rec.get("finish_reason"),
        "aborted": is_aborted(rec),
        "request_received_ts": _num(rec, "request_received_ts"),
    }
    row.update(stages(rec))
    return row


def parse_server_log(path: str) -> dict[str, dict]:
    """rid -> {queue_duration, forward_duration (seconds), entry_time, input_len, ...} from ReqTimeStats lines."""
    out: dict[str, dict] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            m = _REQ_TIME_STATS.search(line.rstrip("\n"))
            if not m:
                continue
            d: dict[str, Any] = {"input_len": int(m["input_len"]), "cached_input_len": int(m["cached"]),
                                 "output_len": int(m["output_len"])}
            for k, v in _KV_MS.findall(m["body"]):
                d[k] = float(v) / 1e3
            em = re.search(r"entry_time=([0-9.]+)", m["body"])
            if em:
                d["entry_time"] = float(em.group(1))
            out[m["rid"].strip()] = d
    return out


# ---------------------------------------------------------------------------------------------------------
# Prometheus text (two scrapes of /metrics): encoder-side and GPU-time totals for the run
# ---------------------------------------------------------------------------------------------------------
_PROM_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
PROM_KEEP = (
    "mm_coalescer_batch_seconds_sum", "mm_coalescer_batch_seconds_count", "mm_coalescer_forwards_total",
    "mm_coalescer_units_total", "mm_coalescer_prefill_wait_seconds_sum", "mm_coalescer_prefill_wait_seconds_count",
    "mm_coalescer_queue_wait_seconds_sum", "mm_coalescer_queue_wait_seconds_count",
    "mm_coalescer_prefill_items_total", "sglang:forward_execution_seconds_total",
    "sglang:per_stage_req_latency_seconds_sum", "sglang:per_stage_req_latency_seconds_count",
    "sglang:queue_time_seconds_sum", "sglang:queue_time_seconds_count", "sglang:time_to_first_token_seconds_sum",
    "sglang:time_to_first_token_seconds_count", "sglang:e2e_request_latency_seconds_sum",
    "sglang:e2e_request_latency_seconds_count", "sglang:num_requests_total",
)
_DROP_LABELS = {"model_name", "engine_type", "tp_rank", "pp_rank", "dp_rank", "moe_ep_rank", "coalescer"}


def parse_prom(text: str) -> dict[str, float]:
    """name{kept labels} -> value, for the series in PROM_KEEP (labels that only identify the server dropped,
    series that then coincide summed)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _PROM_LINE.match(line)
        if not m or m["name"] not in PROM_KEEP:
            continue
        labels = []
        for part in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m["labels"] or ""):
            if part[0] not in _DROP_LABELS:
                labels.append(f"{part[0]}={part[1]}")
        key = m["name"] + ("{" + ",".join(sorted(labels)) + "}" if labels else "")
        try:
            out[key] = out.get(key, 0.0) + float(m["value"])
        except ValueError:
            continue
    return out


def prom_delta(before: dict[str, float] | None, after: dict[str, float]) -> dict[str, float]:
    before = before or {}
    return {k: v - before.get(k, 0.0) for k, v in sorted(after.items())}


def encoder_summary(delta: dict[str, float], wall_s: float | None) -> dict[str, Any]:
    g = delta.get
    out: dict[str, Any] = {}
    if "mm_coalescer_batch_seconds_sum" in delta:
        n = g("mm_coalescer_batch_seconds_count", 0.0)
        out["encoder_busy_s"] = g("mm_coalescer_batch_seconds_sum")
        out["encoder_batches"] = n
        out["encoder_mean_batch_s"] = g("mm_coalescer_batch_seconds_sum") / n if n else None
        out["encoder_units"] = g("mm_coalescer_units_total")
        if wall_s:
            out["encoder_busy_fraction"] = g("mm_coalescer_batch_seconds_sum") / wall_s
    if "mm_coalescer_prefill_wait_seconds_sum" in delta:
        out["prefill_blocked_on_encoder_s"] = g("mm_coalescer_prefill_wait_seconds_sum")
    fwd = {k: v for k, v in delta.items() if k.startswith("sglang:forward_execution_seconds_total")}
    if fwd:
        out["gpu_forward_s"] = fwd
    stage = {k.split("stage=")[1].rstrip("}").split(",")[0]: v for k, v in delta.items()
             if k.startswith("sglang:per_stage_req_latency_seconds_sum") and "stage=" in k}
    if stage:
        out["per_stage_latency_sum_s"] = stage
    return out


# ---------------------------------------------------------------------------------------------------------
def percentile(xs: list[float], p: float) -> float:
    """Linear-interpolation percentile (numpy's default), p in [0, 100]."""
    s = sorted(xs)
    if not s:
        return math.nan
    k = (len(s) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(rows: list[dict]) -> dict[str, dict]:
    out = {}
    for st in STAGES + EXTRA:
        xs = [r[st] for r in rows if r.get(st) is not None and not r["aborted"]]
        if not xs:
            out[st] = {"n": 0}
            continue
        out[st] = {"n": len(xs), "mean": sum(xs) / len(xs), "p50": percentile(xs, 50), "p90": percentile(xs, 90),
                   "p99": percentile(xs, 99), "min": min(xs), "max": max(xs)}
    e2e = out["e2e"].get("mean")
    for st in STAGES:
        if e2e and out[st].get("n"):
            out[st]["share_of_mean_e2e"] = out[st]["mean"] / e2e
    return out


def breakdown(records: list[dict], skip_first: int = 0, server_log: dict[str, dict] | None = None) -> dict:
    recs = sorted(records, key=lambda r: _num(r, "request_received_ts") or 0.0)[skip_first:]
    rows = [request_row(r) for r in recs]
    if server_log:
        for r in rows:
            extra = server_log.get(str(r["rid"]))
            if extra:
                r["sched_queue_duration"] = extra.get("queue_duration")
                r["sched_forward_duration"] = extra.get("forward_duration")
    missing = sum(1 for r in rows if r["prefill"] is None)
    t0 = min((r["request_received_ts"] for r in rows if r["request_received_ts"]), default=None)
    t1 = max((r["request_received_ts"] + r["e2e"] for r in rows if r["request_received_ts"] and r["e2e"]),
             default=None)
    return {
        "n_requests": len(rows),
        "n_aborted": sum(1 for r in rows if r["aborted"]),
        "n_without_stage_timestamps": missing,
        "wall_s": (t1 - t0) if t0 is not None and t1 is not None else None,
        "summary": summarize(rows),
        "requests": rows,
    }


def format_table(result: dict) -> str:
    s = result["summary"]
    lines = [f"requests: {result['n_requests']} (aborted {result['n_aborted']}, without stage timestamps "
             f"{result['n_without_stage_timestamps']}), wall {result['wall_s'] or float('nan'):.2f} s",
             f"{'stage':<12}{'n':>6}{'mean ms':>11}{'p50 ms':>11}{'p90 ms':>11}{'p99 ms':>11}{'% e2e':>8}"]
    for st in STAGES + EXTRA:
        d = s[st]
        if not d.get("n"):
            lines.append(f"{st:<12}{0:>6}{'-':>11}{'-':>11}{'-':>11}{'-':>11}{'-':>8}")
            continue
        share = d.get("share_of_mean_e2e")
        lines.append(f"{st:<12}{d['n']:>6}{d['mean'] * 1e3:>11.1f}{d['p50'] * 1e3:>11.1f}{d['p90'] * 1e3:>11.1f}"
                     f"{d['p99'] * 1e3:>11.1f}{(f'{share * 100:.1f}' if share is not None else '-'):>8}")
    if result.get("encoder"):
        lines.append("encoder / GPU (Prometheus delta): " + json.dumps(result["encoder"], default=float))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="--export-metrics-to-file-dir directory or its .log files")
    ap.add_argument("--json", help="write the full result (per-request rows + summary) here")
    ap.add_argument("--server-log", help="server log with --enable-request-time-stats-logging lines")
    ap.add_argument("--prom-before", help="/metrics text scraped before the run")
    ap.add_argument("--prom-after", help="/metrics text scraped after the run")
    ap.add_argument("--skip-first", type=int, default=0, help="drop the first N requests (by arrival): warm-up")
    a = ap.parse_args(argv)
    files = metric_files(a.inputs)
    if not files:
        print("[breakdown] no sglang-request-metrics-*.log found", file=sys.stderr)
        return 1
    result = breakdown(read_records(files), a.skip_first,
                       parse_server_log(a.server_log) if a.server_log else None)
    result["files"] = files
    if a.prom_after:
        before = parse_prom(open(a.prom_before).read()) if a.prom_before else None
        delta = prom_delta(before, parse_prom(open(a.prom_after).read()))
        result["prometheus_delta"] = delta
        result["encoder"] = encoder_summary(delta, result["wall_s"])
    print(format_table(result))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0 if result["n_requests"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Tests for breakdown.py with records shaped like SGLang 0.5.16's FileRequestMetricsExporter output.

The sample follows the code: request_metrics_exporter._format_output_data ({"request_parameters": json string,
**meta_info}), tokenizer_manager._handle_batch_output (id, finish_reason, prompt_tokens, weight_version,
num_retractions, SchedulerReqTimeStats.convert_to_output_meta_info, reasoning/completion/cached tokens,
image_tokens, e2e_latency, APIServerReqTimeStats.convert_to_output_meta_info) and the response_sent_to_client_ts
set just before write_record.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import breakdown as bd

T0 = 1765000000.0


def record(rid: str, t: float, *, preprocess=0.040, intake=0.010, queue=0.120, prefill=0.350, decode=0.200,
           respond=0.0005, timestamps=True, abort=False) -> dict:
    recv = T0 + t
    disp = recv + preprocess
    wait_entry = disp + intake
    fwd = wait_entry + queue
    pre_done = fwd + prefill
    fin = pre_done + decode
    params = {"text": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n"
                      "<|im_start|>assistant\n",
              "sampling_params": {"temperature": 0.0, "max_new_tokens": 10}, "rid": rid, "return_logprob": False,
              "logprob_start_len": -1, "top_logprobs_num": 0, "stream": False, "log_metrics": True,
              "modalities": ["image"], "received_time": 81234.5 + t, "bootstrap_room": None}
    rec = {
        "request_parameters": json.dumps(params),
        "id": rid,
        "finish_reason": {"type": "abort", "message": "x"} if abort else {"type": "length", "length": 10},
        "prompt_tokens": 1790,
        "weight_version": "default",
        "num_retractions": 0,
    }
    if timestamps:
        rec.update({"forward_entry_time": fwd, "prefill_finished_time": pre_done, "queue_time": queue})
    rec.update({"reasoning_tokens": 0, "completion_tokens": 10, "cached_tokens": 0, "image_tokens": 1734,
                "e2e_latency": fin - recv})
    if timestamps:
        rec.update({"request_received_ts": recv, "api_server_dispatch_finish_ts": disp,
                    "request_finished_ts": fin, "decode_throughput": 9 / decode})
    rec["response_sent_to_client_ts"] = fin + respond
    return rec


def write_log(tmp_path: Path, recs: list[dict]) -> Path:
    d = tmp_path / "metrics"
    d.mkdir()
    (d / "sglang-request-metrics-20261202_10.log").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


def test_stages_of_one_record():
    st = bd.stages(record("a", 0.0))
    assert st["preprocess"] == pytest.approx(0.040)
    assert st["intake"] == pytest.approx(0.010)
    assert st["queue"] == pytest.approx(0.120)
    assert st["prefill"] == pytest.approx(0.350)
    assert st["decode"] == pytest.approx(0.200)
    assert st["respond"] == pytest.approx(0.0005, abs=1e-6)
    assert st["ttft_server"] == pytest.approx(0.040 + 0.010 + 0.120 + 0.350)
    assert st["e2e"] == pytest.approx(0.720)
    assert st["stage_sum"] == pytest.approx(st["e2e"])


def test_record_without_enable_metrics_has_no_stages():
    st = bd.stages(record("a", 0.0, timestamps=False))
    assert st["prefill"] is None and st["queue"] is None and st["stage_sum"] is None
    assert st["e2e"] == pytest.approx(0.720)


def test_request_row_reads_counts_and_params():
    row = bd.request_row(record("r1", 0.0))
    assert row["rid"] == "r1" and row["image_tokens"] == 1734 and row["completion_tokens"] == 10
    assert row["finish_reason"] == "length" and not row["aborted"]
    assert bd.request_params(record("r1", 0.0))["modalities"] == ["image"]


def test_file_parse_summary_and_cli(tmp_path, capsys):
    recs = [record(f"r{i}", i * 0.01, queue=0.1 * i, prefill=0.3 + 0.01 * i) for i in range(5)]
    recs.append(record("bad", 0.2, abort=True))
    d = write_log(tmp_path, recs)
    with open(next(d.iterdir()), "a") as fh:
        fh.write("not json\n\n")
    out = tmp_path / "bd.json"
    assert bd.main([str(d), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_requests"] == 6 and res["n_aborted"] == 1
    q = res["summary"]["queue"]
    assert q["n"] == 5  # aborted one excluded
    assert q["p50"] == pytest.approx(0.2) and q["mean"] == pytest.approx(0.2)
    assert res["summary"]["prefill"]["p50"] == pytest.approx(0.32)
    assert res["summary"]["prefill"]["share_of_mean_e2e"] == pytest.approx(0.32 / res["summary"]["e2e"]["mean"])
    printed = capsys.readouterr().out
    assert "prefill" in printed and "queue" in printed and "requests: 6" in printed


def test_skip_first_drops_earliest_arrivals():
    recs = [record(f"r{i}", i * 1.0) for i in range(4)]
    res = bd.breakdown(list(reversed(recs)), skip_first=2)
    assert [r["rid"] for r in res["requests"]] == ["r2", "r3"]


def test_server_log_join():
    log_line = ("[2026-12-02 10:00:01] ReqTimeStats(rid=r0, input_len=1790, cached_input_len=0, output_len=10, "
                "attempts=1, type=unified): queue_duration=120.00ms, forward_duration=550.00ms, "
                "entry_time=1765000000.050\n")
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as fh:
        fh.write("noise\n" + log_line)
    parsed = bd.parse_server_log(fh.name)
    assert parsed["r0"]["queue_duration"] == pytest.approx(0.12)
    assert parsed["r0"]["forward_duration"] == pytest.approx(0.55)
    assert parsed["r0"]["entry_time"] == pytest.approx(1765000000.05)
    res = bd.breakdown([record("r0", 0.0)], server_log=parsed)
    assert res["requests"][0]["sched_forward_duration"] == pytest.approx(0.55)


PROM_BEFORE = """# HELP mm_coalescer_batch_seconds Dispatch to results ready, per batch
mm_coalescer_batch_seconds_sum{coalescer="qwen2_5_vl"} 1.0
mm_coalescer_batch_seconds_count{coalescer="qwen2_5_vl"} 10.0
mm_coalescer_units_total{coalescer="qwen2_5_vl"} 70.0
sglang:forward_execution_seconds_total{category="extend",model_name="m",tp_rank="0"} 2.0
sglang:per_stage_req_latency_seconds_sum{engine_type="unified",model_name="m",stage="prefill_forward",tp_rank="0"} 3.0
"""
PROM_AFTER = """mm_coalescer_batch_seconds_sum{coalescer="qwen2_5_vl"} 8.1
mm_coalescer_batch_seconds_count{coalescer="qwen2_5_vl"} 99.0
mm_coalescer_units_total{coalescer="qwen2_5_vl"} 723.0
mm_coalescer_prefill_wait_seconds_sum{coalescer="qwen2_5_vl"} 0.5
sglang:forward_execution_seconds_total{category="extend",model_name="m",tp_rank="0"} 9.5
sglang:forward_execution_seconds_total{category="decode",model_name="m",tp_rank="0"} 1.5
sglang:per_stage_req_latency_seconds_sum{engine_type="unified",model_name="m",stage="prefill_forward",tp_rank="0"} 40.0
sglang:per_stage_req_latency_seconds_bucket{stage="prefill_forward",le="0.1"} 4.0
"""


def test_prometheus_delta_and_encoder_summary():
    delta = bd.prom_delta(bd.parse_prom(PROM_BEFORE), bd.parse_prom(PROM_AFTER))
    enc = bd.encoder_summary(delta, wall_s=12.8)
    assert enc["encoder_busy_s"] == pytest.approx(7.1)
    assert enc["encoder_batches"] == pytest.approx(89)
    assert enc["encoder_units"] == pytest.approx(653)
    assert enc["encoder_busy_fraction"] == pytest.approx(7.1 / 12.8)
    assert enc["prefill_blocked_on_encoder_s"] == pytest.approx(0.5)
    assert enc["gpu_forward_s"]["sglang:forward_execution_seconds_total{category=extend}"] == pytest.approx(7.5)
    assert enc["per_stage_latency_sum_s"]["prefill_forward"] == pytest.approx(37.0)
    assert not any("_bucket" in k for k in delta)


def test_percentile_matches_linear_interpolation():
    assert bd.percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert bd.percentile([5], 99) == 5
    assert math.isnan(bd.percentile([], 50))

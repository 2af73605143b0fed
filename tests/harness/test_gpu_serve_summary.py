"""The real-server harness's pure parts (scripts/gpu_serve): what summarize.py reports from a run's files.

The harness itself needs a GPU; what it writes is checked here with files shaped like a real run's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "gpu_serve"))
import exports
import summarize


def bench(ttft_ms: float, tok_s: float, window=None) -> dict:
    return {"median_ttft_ms": ttft_ms, "mean_ttft_ms": ttft_ms * 1.1, "p99_ttft_ms": ttft_ms * 1.3,
            "total_throughput": tok_s, "duration": 15.0, "median_itl_ms": 20.0, "p99_itl_ms": 40.0,
            "request_rate": 5.0, "window": window}


def paced(ttft_ms: float, tok_s: float, arrivals_s: float) -> dict:
    """A Poisson run whose requests SGLang exported: its arrival span beside the bench numbers."""
    return {**bench(ttft_ms, tok_s), "arrivals_s": arrivals_s}


def result() -> dict:
    runs = {"seed0-off": bench(10_000, 1000), "seed0-on": bench(8_000, 1250),
            "seed1-on": bench(9_000, 1100), "seed1-off": bench(10_000, 1000),
            "seedwarm0-on": bench(1, 1),  # a warm-up is never a measured repetition
            "seed0-off+x": bench(6_000, 1500), "seed0-on+x": bench(6_600, 1400),
            "lone-off": bench(250, 10), "lone-on": bench(200, 10),
            "poisson0.5-off": bench(300, 500), "poisson0.5-on": bench(240, 510)}
    return {"family": "fam", "variants": {"off": [], "on": [], "off+x": ["--flag"], "on+x": ["--flag"]},
            "runs": runs, "capacity_req_s": 10.0,
            "correctness": {"requests": 20, "identical": 20, "all_identical": True, "servers": ["off", "on"]}}


def test_seed_ratios_are_medians_over_repetitions_with_their_spread():
    seed = summarize.family_summary(result())["seed"]
    assert seed["runs"] == 2
    assert seed["median_ttft_ratio"] == pytest.approx(0.85)  # median of 0.8 and 0.9
    assert seed["median_ttft_ratio_spread"] == [0.8, 0.9]
    assert seed["throughput_ratio"] == pytest.approx(1.175)
    assert seed["off"]["median_ttft_ms"] == [10_000, 10_000]


def test_servers_with_the_same_extra_flags_are_compared_with_each_other_and_the_flags_alone_with_off():
    fam = summarize.family_summary(result())
    pair = fam["with_sglang_flags"]["x"]
    assert pair["flags"] == ["--flag"]
    assert pair["seed"]["median_ttft_ratio"] == pytest.approx(1.1)
    assert pair["sglang_flags_alone"]["seed"]["median_ttft_ratio"] == pytest.approx(0.6)
    assert fam["lone"]["ttft_ratio"] == pytest.approx(0.8)
    assert fam["poisson"]["0.5"]["ttft_p50_ratio"] == pytest.approx(0.8)
    assert fam["outputs_identical"] is True


def _metrics(path: Path, before: dict[str, float], after: dict[str, float]) -> None:
    def text(values):
        return "\n".join(f"{k} {v}" for k, v in values.items())
    path.write_text(f"# before\n{text(before)}\n# after\n{text(after)}\n")


def test_the_time_breakdown_adds_up_to_ttft_from_sglangs_own_timing(tmp_path):
    res = {"family": "fam", "variants": {"off": []}, "runs": {"seed0-off": bench(1, 1, window=[100.0, 200.0])}}
    stage = 'sglang:per_stage_req_latency_seconds_sum{stage="%s",tp_rank="0"}'
    _metrics(tmp_path / "metrics-seed0-off.txt",
             {"sglang:time_to_first_token_seconds_sum": 5.0, "sglang:time_to_first_token_seconds_count": 1},
             {"sglang:time_to_first_token_seconds_sum": 25.0, "sglang:time_to_first_token_seconds_count": 3,
              "sglang:queue_time_seconds_sum": 2.0, stage % "request_process": 0.2, stage % "prefill_forward": 3.0,
              stage % "chunked_prefill": 1.0, "sglang:e2e_request_latency_seconds_sum": 30.0})
    exports = tmp_path / "requests-off"
    exports.mkdir()
    records = [{"request_received_ts": t, "api_server_dispatch_finish_ts": t + 4.0, "prompt_tokens": 1914}
               for t in (50.0, 150.0, 151.0)]  # the first lies outside the run's window
    (exports / "sglang-request-metrics.log").write_text("\n".join(map(json.dumps, records)) + "\nnot json\n")
    row = summarize.stage_breakdown(tmp_path, res)["off"]
    assert row["requests"] == 2 and row["ttft"] == pytest.approx(10.0)
    assert row["preprocess"] == pytest.approx(4.0)
    assert row["queue"] == pytest.approx(1.0) and row["prefill_forward"] == pytest.approx(2.0)
    parts = ("preprocess", "handover_and_delivery", "queue", "scheduler_request_process", "prefill_forward")
    assert sum(row[p] for p in parts) == pytest.approx(row["ttft"])
    assert row["decode"] == pytest.approx(5.0)
    assert "cpu_s" not in row  # runs before serve.py recorded it
    res["runs"]["seed0-off"]["cpu_s"] = {"off": {"sglang::schedul": 12.5, "python3": 30.1}, "on": {"python3": 4.0}}
    assert summarize.stage_breakdown(tmp_path, res)["off"]["cpu_s"] == {"sglang::schedul": 12.5, "python3": 30.1}


def test_a_lever_variant_is_compared_with_off_and_a_plugin_setting_also_with_on():
    res = result()
    res["runs"].update({"seed0-on+defer": bench(4_000, 1000), "seed1-on+defer": bench(5_000, 1000),
                        "seed0-off+graph": bench(9_000, 1000), "lone-on+defer": bench(100, 10),
                        "poisson0.5-on+defer": bench(360, 500)})
    res["variants"].update({"on+defer": [], "off+graph": []})
    res["variant_changes"] = {"off": {}, "on": {}, "off+x": {}, "on+x": {},
                              "on+defer": {"config": {"sglang": {"defer_prefill_ms": 20}}, "env": {}},
                              "off+graph": {"config": {}, "env": {"SGLANG_VIT_ENABLE_CUDA_GRAPH": "1"}}}
    levers = summarize.family_summary(res)["levers"]
    assert set(levers) == {"on+defer", "off+graph", "on+x"}  # off+x: with on+x under with_sglang_flags
    assert levers["on+x"]["vs_off"]["seed"]["median_ttft_ratio"] == pytest.approx(0.66)  # plugin + flags vs off
    defer = levers["on+defer"]
    assert defer["changes"]["config"] == {"sglang": {"defer_prefill_ms": 20}}
    assert defer["vs_off"]["seed"]["median_ttft_ratio"] == pytest.approx(0.45)  # 0.4 and 0.5 over 10,000
    assert defer["vs_on"]["seed"]["median_ttft_ratio"] == pytest.approx((0.5 + 5 / 9) / 2, abs=1e-4)  # 4 places
    assert defer["vs_on"]["lone"]["ttft_ratio"] == pytest.approx(0.5)
    assert defer["vs_on"]["poisson"]["0.5"]["ttft_p50_ratio"] == pytest.approx(1.5)
    graph = levers["off+graph"]
    assert graph["vs_off"]["seed"]["runs"] == 1 and "vs_on" not in graph
    assert graph["changes"]["env"] == {"SGLANG_VIT_ENABLE_CUDA_GRAPH": "1"}


def test_harness_runs_of_one_family_accumulate_repetitions_and_keep_their_commits():
    first = {**result(), "commit": "aaa"}
    later = {"family": "fam", "variants": {"off": [], "on": []}, "commit": "bbb",
             "runs": {"seed2-off": bench(10_000, 1000), "seed2-on": bench(7_000, 1300),
                      "seedwarm0-on": bench(2, 2)},  # a warm-up tag may repeat across runs
             "correctness": {"requests": 20, "identical": 19, "all_identical": False}}
    merged = summarize.merge_runs([first, later])
    fam = summarize.family_summary(merged)
    assert fam["seed"]["runs"] == 3
    assert fam["seed"]["median_ttft_ratio"] == pytest.approx(0.8)  # median of 0.8, 0.9, 0.7
    assert fam["lone"]["ttft_ratio"] == pytest.approx(0.8)  # measured only by the first run
    assert fam["outputs_identical"] is False  # the later check replaces the earlier one
    assert fam["commit"] == "aaa,bbb"
    assert [s["commit"] for s in fam["sources"]] == ["aaa", "bbb"]
    assert fam["sources"][1]["runs"] == ["seed2-off", "seed2-on"]


def test_a_lever_measured_in_two_harness_runs_also_reports_each_runs_own_ratios():
    first = {**result(), "commit": "aaa", "variants": {"off": [], "on": [], "on+g": []},
             "variant_changes": {"off": {}, "on": {}, "on+g": {"config": {}, "env": {}}}}
    first["runs"]["seed0-on+g"] = bench(12_000, 1000)  # before a fix: 1.5x of on (8,000)
    later = {"family": "fam", "commit": "bbb", "variants": first["variants"],
             "variant_changes": first["variant_changes"],
             "runs": {"seed2-off": bench(10_000, 1000), "seed2-on": bench(8_000, 1000),
                      "seed2-on+g": bench(6_000, 1000)}}  # after: 0.75x
    fam = summarize.family_summary(summarize.merge_runs([first, later]), harness_runs=[first, later])
    lever = fam["levers"]["on+g"]
    assert lever["vs_on"]["seed"]["runs"] == 2
    by_run = lever["by_run"]
    assert [r["commit"] for r in by_run] == ["aaa", "bbb"]
    assert by_run[0]["vs_on"]["seed"]["median_ttft_ratio"] == pytest.approx(1.5)
    assert by_run[1]["vs_on"]["seed"]["median_ttft_ratio"] == pytest.approx(0.75)
    assert by_run[1]["vs_off"]["seed"]["runs"] == 1


def test_a_seed_repetition_claimed_by_two_harness_runs_is_refused():
    with pytest.raises(SystemExit, match="seed0-off"):
        summarize.merge_runs([result(), {"family": "fam", "runs": {"seed0-off": bench(1, 1)}}])


def test_a_poisson_load_measured_again_replaces_the_earlier_pair_and_says_so():
    later = {"family": "fam", "commit": "new", "capacity_req_s": 12.0,
             "runs": {"poisson0.5-off": bench(300, 500), "poisson0.5-on": bench(150, 520)}}
    merged = summarize.merge_runs([{**result(), "commit": "old"}, later])
    fam = summarize.family_summary(merged)
    assert fam["poisson"]["0.5"]["ttft_p50_ratio"] == pytest.approx(0.5)
    assert fam["poisson"]["capacity_req_s"] == 12.0
    assert fam["sources"][1]["replaced"] == ["poisson0.5-off", "poisson0.5-on"]
    assert fam["seed"]["runs"] == 2  # the earlier run's repetitions stay


def test_a_workload_measured_again_replaces_every_server_of_the_earlier_run_so_pairs_never_mix_runs():
    later = {"family": "fam", "commit": "new", "variants": {"off": [], "on": [], "on+lazy": []},
             "runs": {"lone-off": bench(100, 10), "lone-on": bench(95, 10), "lone-on+lazy": bench(90, 10)}}
    merged = summarize.merge_runs([{**result(), "commit": "old"}, later])
    fam = summarize.family_summary(merged)
    assert fam["lone"]["ttft_ratio"] == pytest.approx(0.95)  # the new pair, never the old on beside the new off
    assert fam["sources"][1]["replaced"] == ["lone-off", "lone-on"]
    assert fam["seed"]["runs"] == 2


def test_a_later_run_without_plain_on_keeps_the_familys_pair_and_its_lever_is_reported_per_run():
    first = {**result(), "commit": "old"}
    later = {"family": "fam", "commit": "new", "variants": {"off": [], "on+lazy": []},
             "variant_changes": {"on+lazy": {"config": {"sglang": {"early_encode_min_waiting": 1}}, "env": {}}},
             "runs": {"lone-off": bench(100, 10), "lone-on+lazy": bench(90, 10)}}
    merged = summarize.merge_runs([first, later])
    assert merged["runs"]["lone-off"]["commit"] == "old"  # the later lone-off would pair with nothing of its run
    fam = summarize.family_summary(merged, harness_runs=[first, later])
    assert fam["lone"]["ttft_ratio"] == pytest.approx(0.8)  # still the first run's off/on pair
    assert fam["sources"][1]["kept_apart"] == ["lone-off", "lone-on+lazy"]
    lever = fam["levers"]["on+lazy"]
    assert lever["vs_off"]["lone"] is None  # not merged: no cross-run pair
    assert lever["by_run"] == [{"commit": "new", "runs": ["lone-on+lazy"],
                                **summarize._lever(summarize._located(later), "on+lazy", later["variants"])}]
    assert lever["by_run"][0]["vs_off"]["lone"]["ttft_ratio"] == pytest.approx(0.9)


def test_a_lever_whose_runs_a_later_plain_pair_replaced_keeps_its_comparison_per_run():
    first = {**result(), "commit": "a", "variants": {**result()["variants"], "on+d": []},
             "variant_changes": {"on+d": {"config": {"sglang": {"defer_prefill_ms": 2000}}, "env": {}}}}
    first["runs"]["lone-on+d"] = bench(150, 10)
    later = {"family": "fam", "commit": "b", "variants": {"off": [], "on": []},
             "runs": {"lone-off": bench(260, 10), "lone-on": bench(250, 10)}}
    fam = summarize.family_summary(summarize.merge_runs([first, later]), harness_runs=[first, later])
    lever = fam["levers"]["on+d"]
    assert lever["vs_off"]["lone"] is None  # its pair went with the first run's lone-off
    assert lever["by_run"][0]["commit"] == "a" and lever["by_run"][0]["runs"] == ["lone-on+d"]
    assert lever["by_run"][0]["vs_off"]["lone"]["ttft_ratio"] == pytest.approx(0.6)


def test_the_capacity_stays_the_one_the_merged_poisson_loads_were_paced_at():
    first = {**result(), "commit": "a"}  # Poisson 50 % paced at 10 req/s
    capacity_only = {"family": "fam", "commit": "b", "capacity_req_s": 6.8, "variants": {"off": [], "on": []},
                     "runs": {"seed5-off": bench(10_000, 1000), "seed5-on": bench(9_000, 1000)}}
    assert summarize.merge_runs([first, capacity_only])["capacity_req_s"] == 10.0
    paced = {"family": "fam", "commit": "c", "capacity_req_s": 12.0, "variants": {"off": [], "on": []},
             "runs": {"poisson0.8-off": bench(300, 500), "poisson0.8-on": bench(290, 500)}}
    assert summarize.merge_runs([first, capacity_only, paced])["capacity_req_s"] == 12.0


def test_a_crash_of_a_server_with_sglang_flags_is_reported_beside_the_flags_comparison():
    crashed = {"family": "fam", "commit": "c", "variants": {"off": [], "off+x": ["--flag"], "on+x": ["--flag"]},
               "variant_changes": {"off": {}, "off+x": {}, "on+x": {}},
               "runs": {"seed0-off": bench(10_000, 1000), "seed0-on+x": bench(7_000, 1400)},
               "failed_runs": {"warm-off+x": "no result after 150 s; RuntimeError: tensors on two devices"}}
    fam = summarize.family_summary(summarize.merge_runs([crashed]), harness_runs=[crashed])
    pair = fam["with_sglang_flags"]["x"]
    assert pair["failed"] == {"warm-off+x (c)": "no result after 150 s; RuntimeError: tensors on two devices"}
    assert pair["seed"] is None  # off+x served nothing to compare with
    assert fam["levers"]["on+x"]["vs_off"]["seed"]["median_ttft_ratio"] == pytest.approx(0.7)  # flags + plugin


def test_the_first_token_timeline_shows_first_chunks_held_until_the_tokenizer_manager_is_done(tmp_path):
    """Two requests scheduled at 1.5 s and 2.5 s, the tokenizer manager done at 3 s: both first chunks went out
    after it, so both waited for the tokenizer manager; a third, scheduled after it, does not count."""
    res = {"family": "fam", "variants": {"on": []},
           "runs": {"seed7-on": {**bench(1, 1, window=[90.0, 200.0]), "requested": 3}}}
    exports = tmp_path / "requests-on"
    exports.mkdir()
    records = [{"id": rid, "request_received_ts": 100.0 + i, "api_server_dispatch_finish_ts": 101.0 + i,
                "response_sent_to_client_ts": sent, "prompt_tokens": 1914}
               for i, (rid, sent) in enumerate([("a", 103.1), ("b", 103.2), ("c", 104.0)])]
    # the load generator's warm-up, done before the burst: not the timeline's origin, not one of its requests
    records.insert(0, {"id": "w", "request_received_ts": 97.5, "api_server_dispatch_finish_ts": 97.6,
                       "response_sent_to_client_ts": 97.8, "request_finished_ts": 98.0, "prompt_tokens": 1914})
    (exports / "sglang-request-metrics.log").write_text("\n".join(map(json.dumps, records)) + "\n")
    stats = "[t] ReqTimeStats(rid={}, input_len=1, output_len=1, type=unified): queue_duration={}ms, " \
            "forward_duration=1.00ms, entry_time={}"
    (tmp_path / "server-on.log").write_text("\n".join([stats.format("w", 0.0, 97.6),
                                                       stats.format("a", 500.0, 101.0), stats.format("b", 0.0, 102.5),
                                                       stats.format("c", 0.0, 103.5), "unrelated line"]))
    timeline = summarize.first_token_timeline(tmp_path, res, "seed7")["on"]
    assert timeline["requests"] == 3 and timeline["tokenizer_done"] == pytest.approx(3.0)
    assert timeline["scheduled"] == pytest.approx([1.5, 2.5, 3.5])
    assert timeline["first_sent"][1] == pytest.approx(3.2)
    assert timeline["sent_after_tokenizer_done"] == 1.0


def test_a_plugin_setting_on_top_of_sglang_flags_is_also_compared_with_plugin_off_under_those_flags():
    res = result()
    res["runs"].update({"seed0-on+x+defer": bench(3_000, 2000), "lone-on+x+defer": bench(150, 10)})
    res["variants"]["on+x+defer"] = ["--flag"]
    res["variant_changes"] = {"on+x+defer": {"config": {"sglang": {"defer_prefill_ms": 2000}}, "env": {}}}
    lever = summarize.family_summary(res)["levers"]["on+x+defer"]
    assert lever["vs_off+x"]["seed"]["median_ttft_ratio"] == pytest.approx(0.5)  # 3,000 against off+x's 6,000
    assert lever["vs_off"]["seed"]["median_ttft_ratio"] == pytest.approx(0.3)
    assert lever["vs_off+x"]["lone"] is None  # off+x ran no lone request: nothing to pair with
    plain = summarize._lever(res["runs"], "on+defer", {**res["variants"], "on+defer": []})
    assert set(plain) == {"vs_off", "vs_on"}  # no SGLang flags under it: no third comparison


def test_the_plugin_with_sglang_flags_is_compared_with_a_plugin_off_server_that_has_those_flags_and_backports():
    run = {"family": "fam", "commit": "d",
           "variants": {"off": [], "off+x+backport": ["--flag"], "on+x": ["--flag"], "on+x+defer": ["--flag"]},
           "variant_changes": {"off": {}, "off+x+backport": {"config": {}, "env": {}, "sglang_backports": True},
                               "on+x": {"config": {}, "env": {}},
                               "on+x+defer": {"config": {"sglang": {"defer_prefill_ms": 2000}}, "env": {}}},
           "runs": {"seed0-off": bench(10_000, 1000), "seed0-off+x+backport": bench(7_000, 1300),
                    "seed0-on+x": bench(6_300, 1400), "seed0-on+x+defer": bench(5_600, 1450)}}
    levers = summarize.family_summary(summarize.merge_runs([run]), harness_runs=[run])["levers"]
    assert levers["on+x"]["vs_off+x+backport"]["seed"]["median_ttft_ratio"] == pytest.approx(0.9)  # plugin's part
    assert levers["on+x+defer"]["vs_off+x+backport"]["seed"]["median_ttft_ratio"] == pytest.approx(0.8)
    alone = levers["off+x+backport"]  # the flags (with the backport) without the plugin, against plain off
    assert alone["vs_off"]["seed"]["median_ttft_ratio"] == pytest.approx(0.7) and "vs_on" not in alone
    assert alone["changes"]["sglang_backports"] is True


def test_a_free_encoder_server_is_a_floor_against_plain_off_never_the_twin_a_plugin_server_is_judged_against():
    run = {"family": "fam", "commit": "d",
           "variants": {"off": [], "off+x+freeenc": ["--flag"], "on+x": ["--flag"]},
           "variant_changes": {"off": {}, "off+x+freeenc": {"config": {}, "env": {}, "free_encoder": True},
                               "on+x": {"config": {}, "env": {}}},
           "runs": {"seed0-off": bench(10_000, 1000), "seed0-off+x+freeenc": bench(6_500, 1500),
                    "seed0-on+x": bench(6_300, 1400)}}
    levers = summarize.family_summary(summarize.merge_runs([run]), harness_runs=[run])["levers"]
    assert levers["off+x+freeenc"]["vs_off"]["seed"]["median_ttft_ratio"] == pytest.approx(0.65)
    assert levers["off+x+freeenc"]["changes"]["free_encoder"] is True
    assert "vs_off+x+freeenc" not in levers["on+x"]


def test_summarize_knows_a_floor_by_its_name_exactly_when_serve_patches_its_encoder_free():
    """summarize reads stored results by server name (``+freeenc``); serve.py frees the encoder by the variant's patch
    (and records ``free_encoder``): the two must name the same servers, or a floor would be judged as a twin."""
    import serve

    assert {v for v in serve.VARIANTS if summarize._floor(v)} == {
        v for v, spec in serve.VARIANTS.items() if "free_encoder" in spec.patches}
    assert all(not serve.VARIANTS[v].plugin for v in serve.VARIANTS if summarize._floor(v))


def test_a_lone_requests_free_encoder_floor_comes_from_the_lone_runs_own_files(tmp_path):
    res = {"family": "fam", "commit": "abc", "variants": {"off": [], "on": []},
           "runs": {"lone-off": bench(200, 10, window=[100.0, 110.0]),
                    "lone-on": bench(190, 10, window=[110.0, 120.0])}}
    (tmp_path / "results.json").write_text(json.dumps(res))
    ttft = "sglang:time_to_first_token_seconds_"
    _metrics(tmp_path / "metrics-lone-off.txt", {}, {f"{ttft}sum": 2.0, f"{ttft}count": 10})
    _metrics(tmp_path / "metrics-lone-on.txt", {"mm_coalescer_batch_seconds_sum": 1.0},
             {f"{ttft}sum": 1.9, f"{ttft}count": 10, "mm_coalescer_batch_seconds_sum": 1.5,
              "mm_coalescer_forwards_total": 10})
    share = summarize.lone_encoder_share(tmp_path)
    assert share["commit"] == "abc"
    assert share["ttft_off_s"] == pytest.approx(0.2) and share["encoder_s_per_request"] == pytest.approx(0.05)
    assert share["free_encoder_ttft_ratio"] == pytest.approx(0.75)  # (0.2 - 0.05) / 0.2
    assert share["encoder_cut_needed_for_0.90x"] == pytest.approx(0.4)  # 0.02 of the encoder's 0.05 s
    assert "encoder_stream_s_per_request" not in share  # that run exported no CUDA-event timing
    _metrics(tmp_path / "metrics-lone-on.txt", {"mm_coalescer_batch_seconds_sum": 1.0,
                                                "mm_coalescer_batch_gpu_seconds_sum": 0.5},
             {f"{ttft}sum": 1.9, f"{ttft}count": 10, "mm_coalescer_batch_seconds_sum": 1.5,
              "mm_coalescer_batch_gpu_seconds_sum": 0.8, "mm_coalescer_forwards_total": 10})
    share = summarize.lone_encoder_share(tmp_path)
    assert share["encoder_stream_s_per_request"] == pytest.approx(0.03)  # 0.3 s of stream time over 10
    assert share["free_encoder_ttft_ratio"] == pytest.approx(0.75)  # the floor keeps the host-side time
    _metrics(tmp_path / "metrics-lone-on.txt", {}, {f"{ttft}sum": 1.9, f"{ttft}count": 10,
                                                    "mm_coalescer_forwards_total": 0})
    assert summarize.lone_encoder_share(tmp_path) is None  # no forward: no encoder time to divide by
    (tmp_path / "metrics-lone-on.txt").unlink()
    assert summarize.lone_encoder_share(tmp_path) is None  # no plugin server measured


def test_a_poisson_prefill_blocked_for_most_of_a_forward_shows_the_encode_had_no_head_start(tmp_path):
    res = {"family": "fam", "commit": "abc", "variants": {"off": [], "on": []},
           "runs": {"poisson0.5-off": bench(200, 10), "poisson0.5-on": bench(230, 10)}}
    (tmp_path / "results.json").write_text(json.dumps(res))
    ttft = "sglang:time_to_first_token_seconds_"
    prefill = 'sglang:per_stage_req_latency_seconds_sum{stage="prefill_forward",tp_rank="0"}'
    _metrics(tmp_path / "metrics-poisson0.5-off.txt", {}, {f"{ttft}sum": 2.0, f"{ttft}count": 10, prefill: 1.0})
    _metrics(tmp_path / "metrics-poisson0.5-on.txt", {"mm_coalescer_prefill_wait_seconds_sum": 1.0,
                                                      "mm_coalescer_prefill_wait_seconds_count": 5},
             {f"{ttft}sum": 2.3, f"{ttft}count": 10, prefill: 1.3, "mm_coalescer_forwards_total": 12,
              "mm_coalescer_units_total": 18, "mm_coalescer_batch_seconds_sum": 0.4,
              "mm_coalescer_batch_seconds_count": 10, "mm_coalescer_prefill_wait_seconds_sum": 1.36,
              "mm_coalescer_prefill_wait_seconds_count": 15})
    wait = summarize.poisson_encoder_wait(tmp_path)
    assert wait["commit"] == "abc" and set(wait["loads"]) == {"poisson0.5"}
    on = wait["loads"]["poisson0.5"]["on"]
    assert on["coalescer"]["prefill_blocked_ms_per_prefill"] == pytest.approx(36.0)  # 0.36 s over 10 prefills
    assert on["coalescer"]["forward_ms"] == pytest.approx(40.0)  # 0.4 s over 10 forwards
    assert on["coalescer"]["blocked_share_of_forward"] == pytest.approx(0.9)
    assert on["prefill_forward_minus_off_ms"] == pytest.approx(30.0)  # 130 ms a request against 100
    assert "coalescer" not in wait["loads"]["poisson0.5"]["off"]
    assert "launch_ms" not in on["coalescer"]  # a run from before the plugin exported its launch time
    with (tmp_path / "metrics-poisson0.5-on.txt").open("a") as f:
        f.write("mm_coalescer_batch_launch_seconds_sum 0.35\n")
    launched = summarize.poisson_encoder_wait(tmp_path)["loads"]["poisson0.5"]["on"]["coalescer"]
    assert launched["launch_ms"] == pytest.approx(35.0)  # most of the 40 ms forward: paced by its launches


def _poisson_run(run: Path, variants: dict | None, off: str, on: str) -> None:
    """One harness run's unpacked files for a 50 % Poisson load: its results (``results.json`` as in the archive,
    ``results-fam.json`` as beside it) and both servers' metrics, the plugin server's prefill 10 ms a request
    longer."""
    ttft = "sglang:time_to_first_token_seconds_"
    prefill = 'sglang:per_stage_req_latency_seconds_sum{stage="prefill_forward",tp_rank="0"}'
    run.mkdir()
    res = {"family": "fam", "commit": run.name,
           "runs": {f"poisson0.5-{off}": bench(200, 10), f"poisson0.5-{on}": bench(180, 10)},
           **({"variants": variants} if variants is not None else {})}
    for name in ("results.json", "results-fam.json"):
        (run / name).write_text(json.dumps(res))
    _metrics(run / f"metrics-poisson0.5-{off}.txt", {}, {f"{ttft}sum": 2.0, f"{ttft}count": 10, prefill: 1.0})
    _metrics(run / f"metrics-poisson0.5-{on}.txt", {}, {f"{ttft}sum": 1.8, f"{ttft}count": 10, prefill: 1.1})


def test_a_poisson_run_on_extra_sglang_flags_is_read_against_plugin_off_on_them_beside_that_setups_ratios(
        tmp_path, monkeypatch):
    """Gemma3 on ``sdpa``: ``on+mmsdpa``'s prefill is compared with ``off+mmsdpa``'s (there is no plain off in that
    run), and the run's wait goes under ``shipped_config_with_flags``, not over the family's own run on the
    harness's default kernel."""
    sdpa = ["--mm-attention-backend", "sdpa"]
    _poisson_run(tmp_path / "plain", {"off": [], "on": []}, "off", "on")
    _poisson_run(tmp_path / "sdpa", {"off+mmsdpa": sdpa, "on+mmsdpa": sdpa}, "off+mmsdpa", "on+mmsdpa")
    wait = summarize.poisson_encoder_wait(tmp_path / "sdpa")
    assert wait["flags"] == sdpa
    assert wait["loads"]["poisson0.5"]["on+mmsdpa"]["prefill_forward_minus_off_ms"] == pytest.approx(10.0)
    assert "prefill_forward_minus_off_ms" not in wait["loads"]["poisson0.5"]["off+mmsdpa"]
    assert summarize.poisson_encoder_wait(tmp_path / "plain")["flags"] == []

    out = tmp_path / "summary.json"
    monkeypatch.setattr(sys, "argv", ["summarize.py", str(tmp_path / "plain" / "results-fam.json"),
                                      str(tmp_path / "sdpa" / "results-fam.json"), "--out", str(out),
                                      "--poisson", f"fam={tmp_path / 'plain'}",
                                      "--poisson", f"fam={tmp_path / 'sdpa'}"])
    monkeypatch.setattr(summarize, "plot", lambda summary, path: False)
    summarize.main()
    fam = json.loads(out.read_text())["families"]["fam"]
    assert fam["poisson_encoder_wait"]["commit"] == "plain"
    assert fam["shipped_config_with_flags"][" ".join(sdpa)]["poisson_encoder_wait"]["commit"] == "sdpa"


def test_a_poisson_encoder_wait_compares_only_servers_on_the_same_flags_and_one_run_fills_each_place(
        tmp_path, monkeypatch):
    """A plugin server on ``sdpa`` beside a plain plugin-off one is another kernel, not the plugin's cost: no delta,
    and not filed as the ``sdpa`` setup. A run from before ``variants`` was recorded is plain off and on. Two runs
    for one family and flag set would overwrite each other in the summary: refused."""
    sdpa = ["--mm-attention-backend", "sdpa"]
    _poisson_run(tmp_path / "mixed", {"off": [], "on+mmsdpa": sdpa}, "off", "on+mmsdpa")
    mixed = summarize.poisson_encoder_wait(tmp_path / "mixed")
    assert mixed["flags"] == [] and "prefill_forward_minus_off_ms" not in mixed["loads"]["poisson0.5"]["on+mmsdpa"]
    _poisson_run(tmp_path / "old", None, "off", "on")
    old = summarize.poisson_encoder_wait(tmp_path / "old")
    assert old["loads"]["poisson0.5"]["on"]["prefill_forward_minus_off_ms"] == pytest.approx(10.0)
    monkeypatch.setattr(sys, "argv", ["summarize.py", str(tmp_path / "old" / "results-fam.json"), "--out",
                                      str(tmp_path / "summary.json"), "--poisson", f"fam={tmp_path / 'old'}",
                                      "--poisson", f"fam={tmp_path / 'mixed'}"])
    monkeypatch.setattr(summarize, "plot", lambda summary, path: False)
    with pytest.raises(SystemExit, match="already has a Poisson encoder wait"):
        summarize.main()


def test_a_plugin_setting_is_judged_against_on_in_each_harness_run_even_after_a_later_run_replaced_its_pairs():
    first = result()
    first.update(commit="a")
    first["variants"]["on+defer"] = []
    first["variant_changes"] = {"on+defer": {"config": {"sglang": {"defer_prefill_ms": 2000}}, "env": {}}}
    first["runs"].update({"seed0-on+defer": bench(7_200, 1500), "seed1-on+defer": bench(8_100, 1320),
                          "lone-on+defer": bench(198, 10), "poisson0.5-on+defer": bench(300, 520)})
    later = {"family": "fam", "commit": "b", "variants": {"off": [], "on": []},
             "runs": {"poisson0.5-off": bench(300, 500), "poisson0.5-on": bench(290, 500)}}
    merged = summarize.merge_runs([first, later])
    assert "poisson0.5-on+defer" not in merged["runs"]  # replaced with the rest of the first run's Poisson pairs
    fam = summarize.family_summary(merged, harness_runs=[first, later])
    verdict = fam["levers"]["on+defer"]["verdict_vs_on"]
    assert verdict["better"] == {"seed TTFT median, 2 rep. (a)": 0.9, "seed throughput (a)": 1.2}
    assert verdict["worse"] == {"Poisson 0.5 TTFT p50 (a)": 1.25}  # 300 against the first run's 240, not 290
    assert verdict["even"]["lone TTFT (a)"] == pytest.approx(0.99)  # within the 5 % tolerance
    assert verdict["wins_everywhere_measured"] is False
    assert "verdict_vs_on" not in summarize.family_summary(merged)["levers"]["on+defer"]  # needs the runs


def test_a_plugin_setting_is_a_default_candidate_only_when_it_wins_everywhere_in_every_family():
    def fam(**wins):
        return {"levers": {v: {"verdict_vs_on": {"wins_everywhere_measured": w}} for v, w in wins.items()}}

    candidates = summarize.default_candidates({"a": fam(x=True, y=True), "b": fam(x=False), "c": {}})
    assert candidates == {"x": {"families": {"a": True, "b": False}, "wins_everywhere_measured": False},
                          "y": {"families": {"a": True}, "wins_everywhere_measured": True}}


def test_a_setting_on_sglang_flags_is_judged_against_plugin_on_with_those_flags_and_a_crash_counts_against_it():
    run = {"family": "fam", "commit": "c",
           "variants": {"off": [], "on": [], "on+x": ["--flag"], "on+x+defer": ["--flag"], "on+crash": []},
           "variant_changes": {"off": {"config": {}, "env": {}}, "on": {"config": {}, "env": {}},
                               "on+x": {"config": {}, "env": {}},
                               "on+x+defer": {"config": {"sglang": {"defer_prefill_ms": 2000}}, "env": {}},
                               "on+crash": {"config": {"sglang": {"preprocess_thread": True}}, "env": {}}},
           "runs": {"seed0-on": bench(8_000, 1000), "seed0-on+x": bench(5_000, 1500),
                    "seed0-on+x+defer": bench(4_000, 1500), "lone-on": bench(200, 10), "lone-on+crash": bench(182, 10),
                    "seed0-on+crash": bench(7_000, 1200)},
           "failed_runs": {"seed1-on+crash": "scheduler aborted"}}
    flags = summarize.lever_verdict([run], "on+x+defer")
    assert flags["better"] == {"seed TTFT median, 1 rep. vs on+x (c)": 0.8}  # 4,000 / on+x's 5,000, not on's 8,000
    assert flags["even"] == {"seed throughput vs on+x (c)": 1.0}
    crash = summarize.lever_verdict([run], "on+crash")
    assert crash["failed"] == ["seed1-on+crash (c)"] and crash["better"]["seed TTFT median, 1 rep. (c)"] == 0.875
    assert crash["even"] == {"lone TTFT (c)": 0.91}  # a lone run of 8 requests moves 10 %
    assert crash["wins_everywhere_measured"] is False  # better where it ran, but it crashed once


def test_poisson_arrival_span_and_drain_come_from_sglangs_own_receipt_and_finish_times(tmp_path):
    """The same seeded requests reached the two servers over 18 and 22 s (the load generator's loop stretched the
    second): tok/s over the run then measures the client; the drain after the last arrival is the server's."""
    res = {"family": "fam", "commit": "abc", "variants": {"off": [], "on": []},
           "runs": {"poisson0.8-off": bench(200, 3, window=[100.0, 130.0]),
                    "poisson0.8-on": bench(190, 3, window=[200.0, 230.0])}}
    (tmp_path / "results.json").write_text(json.dumps(res))
    ttft = "sglang:time_to_first_token_seconds_"
    for variant, start, span, drain in (("off", 101.0, 18.0, 4.7), ("on", 201.0, 22.0, 3.8)):
        _metrics(tmp_path / f"metrics-poisson0.8-{variant}.txt", {}, {f"{ttft}sum": 0.6, f"{ttft}count": 3})
        (tmp_path / f"requests-{variant}").mkdir()
        received = [start, start + span / 2, start + span]
        finished = [start + 1.0, start + span + drain, start + span + 2.0]  # the middle one finishes last
        lines = [json.dumps({"request_received_ts": r, "api_server_dispatch_finish_ts": r + 0.05,
                             "request_finished_ts": f}) for r, f in zip(received, finished, strict=True)]
        lines.append(json.dumps({"request_received_ts": start + 40.0, "api_server_dispatch_finish_ts": start + 40.1,
                                 "request_finished_ts": start + 41.0}))  # the next run's: outside the window
        (tmp_path / f"requests-{variant}" / "m.log").write_text("\n".join(lines) + "\n")
    loads = summarize.poisson_encoder_wait(tmp_path)["loads"]["poisson0.8"]
    assert (loads["off"]["arrivals_s"], loads["off"]["drain_s"]) == (pytest.approx(18.0), pytest.approx(4.7))
    assert (loads["on"]["arrivals_s"], loads["on"]["drain_s"]) == (pytest.approx(22.0), pytest.approx(3.8))


def test_a_poisson_tok_s_ratio_between_runs_whose_arrivals_took_apart_is_not_judged():
    """The load generator sent the same requests to the setting's server over 22.1 s against 18.5: its lower tok/s
    is the client's pace, not the server's. At equal arrivals (the other load) tok/s is judged as before."""
    run = {"family": "fam", "commit": "d", "variants": {"off": [], "on": [], "on+lazy": []},
           "variant_changes": {"on+lazy": {"config": {"sglang": {"early_encode_min_waiting": 1}}, "env": {}}},
           "runs": {"poisson0.8-on": paced(348, 800, 18.5), "poisson0.8-on+lazy": paced(256, 720, 22.1),
                    "poisson0.5-on": paced(222, 440, 22.2), "poisson0.5-on+lazy": paced(202, 400, 21.6)}}
    verdict = summarize.lever_verdict([run], "on+lazy")
    assert "Poisson 0.8 tok/s (d)" not in verdict["worse"]
    assert verdict["not_judged"] == {"Poisson 0.8 tok/s (d)": "arrivals over 22.1 s against 18.5 s: tok/s "
                                                              "would compare the spans"}
    assert verdict["worse"] == {"Poisson 0.5 tok/s (d)": 0.9091}  # 400 / 440, arrivals 2.7 % apart: judged
    assert verdict["better"]["Poisson 0.8 TTFT p50 (d)"] == pytest.approx(256 / 348, abs=1e-4)


def test_a_study_run_with_flags_on_every_server_is_refused_from_the_merge():
    study = {"family": "fam", "commit": "s", "extra_flags": ["--sleep-on-idle"], "variants": {"off": [], "on": []},
             "runs": {"lone-off": bench(240, 10), "lone-on": bench(230, 10)}}
    with pytest.raises(SystemExit, match="--sleep-on-idle"):
        summarize.merge_runs([result(), study])
    assert summarize.merge_runs([{**result(), "extra_flags": []}])["family"] == "fam"


def test_a_floor_with_sglang_flags_is_read_against_the_server_with_those_flags_even_without_plain_off():
    """9ca7bdd's next Gemma3 command runs off+mmsdpa, on+mmsdpa and off+mmsdpa+freeenc: no plain off. The floor is
    what removing the encoder saves off+mmsdpa; against plain off it would also credit the faster kernel."""
    run = {"family": "fam", "commit": "c",
           "variants": {"off+x": ["--flag"], "on+x": ["--flag"], "off+x+freeenc": ["--flag"]},
           "variant_changes": {"off+x": {}, "on+x": {},
                               "off+x+freeenc": {"config": {}, "env": {}, "free_encoder": True}},
           "runs": {"seed0-off+x": bench(8_000, 1000), "seed0-on+x": bench(6_000, 1300),
                    "seed0-off+x+freeenc": bench(4_000, 2000)}}
    fam = summarize.family_summary(run)
    floor = fam["levers"]["off+x+freeenc"]
    assert floor["vs_off+x"]["seed"]["median_ttft_ratio"] == pytest.approx(0.5)
    assert floor["vs_off"]["seed"] is None
    assert fam["with_sglang_flags"]["x"]["seed"]["median_ttft_ratio"] == pytest.approx(0.75)


def test_a_later_run_on_another_gpu_with_a_smaller_kv_pool_replaces_its_pairs_and_says_where_each_was_measured():
    h200 = {**result(), "commit": "old", "gpu": "NVIDIA H200"}
    h100 = {"family": "fam", "commit": "new", "gpu": "NVIDIA H100 80GB HBM3", "max_total_tokens": 100000,
            "variants": {"off": [], "on": []}, "capacity_req_s": 5.4,
            "runs": {"poisson0.5-off": bench(270, 400), "poisson0.5-on": bench(220, 410),
                     "poisson0.8-off": bench(360, 600), "poisson0.8-on": bench(285, 610)}}
    merged = summarize.merge_runs([h200, h100])
    assert merged["sources"][1] == {"commit": "new", "gpu": "NVIDIA H100 80GB HBM3", "max_total_tokens": 100000,
                                    "runs": ["poisson0.5-off", "poisson0.5-on", "poisson0.8-off", "poisson0.8-on"],
                                    "replaced": ["poisson0.5-off", "poisson0.5-on"]}
    fam = summarize.family_summary(merged)
    assert fam["poisson"]["0.5"]["ttft_p50_ratio"] == pytest.approx(220 / 270, abs=1e-4)
    assert fam["poisson"]["0.5"]["measured"] == ["new on NVIDIA H100 80GB HBM3, KV pool 100000 tokens"]
    assert fam["seed"]["measured"] == ["old on NVIDIA H200"]  # the workloads it did not measure stay the H200's
    assert fam["lone"]["measured"] == ["old on NVIDIA H200"]
    assert merged["capacity_req_s"] == 5.4  # what its merged loads were paced at


def test_a_levers_comparisons_in_each_harness_run_say_where_that_run_was_measured():
    first = {**result(), "commit": "a", "gpu": "NVIDIA H200",
             "variants": {"off": [], "on": [], "off+twin": []}, "variant_changes": {"off+twin": {}}}
    first["runs"]["lone-off+twin"] = bench(252, 10)
    second = {"family": "fam", "commit": "b", "gpu": "NVIDIA H100 80GB HBM3", "variants": {"off": [], "off+twin": []},
              "variant_changes": {"off+twin": {}},
              "runs": {"lone-off": bench(318, 10), "lone-off+twin": bench(320, 10)}}
    fam = summarize.family_summary(summarize.merge_runs([first, second]), harness_runs=[first, second])
    by_run = fam["levers"]["off+twin"]["by_run"]
    assert [run["vs_off"]["lone"]["measured"] for run in by_run] == [["a on NVIDIA H200"],
                                                                    ["b on NVIDIA H100 80GB HBM3"]]


SHIPPED_NOW = {"name": "c", "sglang": {"preprocess_thread": True, "graphs": []}}
SHIPPED_AT = {"old": {"name": "c", "sglang": {"preprocess_thread": False, "graphs": []}}, "new": SHIPPED_NOW}
PRETHREAD = {"config": {"sglang": {"preprocess_thread": True}}, "env": {}}


def shipped_at(commit: str, name: str) -> dict | None:
    """The config file's values at a commit, as git would give them (``summarize.config_values_at``)."""
    return SHIPPED_AT.get(commit)


def test_the_shipped_config_counts_a_lever_that_became_the_default_and_never_a_server_with_flags_or_env():
    old = {"commit": "old", "variants": {"off": [], "on": [], "on+pre": []},
           "variant_changes": {"off": {"config": {}, "env": {}}, "on": {"config": {}, "env": {}}, "on+pre": PRETHREAD}}
    new = {"commit": "new", "variants": {"off": [], "on+x": ["--flag"], "on+env": [], "on": []},
           "variant_changes": {"on": {"config": {}, "env": {}}, "on+x": {"config": {}, "env": {}},
                               "on+env": {"config": {}, "env": {"E": "1"}}}}
    unknown = {"commit": "gone", "variants": {"off": [], "on": []}}  # git cannot show its config

    def shipped(result):
        return summarize.shipped_server(result, "c", SHIPPED_NOW, shipped_at)

    assert shipped(old) == "on+pre"  # plain on then lacked preprocess_thread
    assert shipped(new) == "on"  # a server with SGLang flags or environment of its own is not the shipped setup
    assert shipped({**new, "variant_changes": {}}) == "on"  # runs before variant_changes: plain on only
    assert shipped(unknown) is None
    both = {"commit": "new", "variants": {"off": [], "on+pre": [], "on": []},
            "variant_changes": {"on": {"config": {}, "env": {}}, "on+pre": PRETHREAD}}
    assert shipped(both) == "on"  # one server a run, plain on first: that run's off never counts twice


def test_the_shipped_config_summary_gives_each_runs_ratio_against_off_and_their_median():
    old = {"commit": "old", "gpu": "G", "variants": {"off": [], "on": [], "on+pre": []},
           "variant_changes": {"on+pre": PRETHREAD},
           "runs": {"seed0-off": bench(10_000, 1000), "seed0-on": bench(9_000, 1100),
                    "seed0-on+pre": bench(5_000, 1600),
                    "lone-off": bench(200, 10), "lone-on+pre": bench(120, 10),
                    "poisson0.5-off": bench(200, 500), "poisson0.5-on+pre": bench(150, 500)}}
    new = {"commit": "new", "gpu": "G", "max_total_tokens": 100_000, "variants": {"off": [], "on": []},
           "runs": {"seed1-off": bench(10_000, 1000), "seed1-on": bench(6_000, 1500),
                    "seed2-off": bench(10_000, 1000), "seed2-on": bench(7_000, 1400),
                    "lone-off": bench(200, 10), "lone-on": bench(110, 10),
                    "poisson0.5-off": bench(200, 500),
                    "poisson0.5-on": {**bench(170, 490), "median_itl_ms": 30.0}}}
    out = summarize.shipped_config_summary([old, new], "c", SHIPPED_NOW, shipped_at)
    assert out["servers"] == ["on+pre (old)", "on (new)"]
    assert out["seed"]["repetitions"] == 3  # seed0-on (plain on at "old") is not the shipped config
    assert out["seed"]["median_ttft_ratio"] == {"median": 0.6, "each": [0.5, 0.6, 0.7]}
    assert out["seed"]["throughput_ratio"]["each"] == [1.6, 1.5, 1.4]
    assert out["lone"]["ttft_ratio"] == {"median": 0.575, "each": [0.6, 0.55]}
    assert out["poisson"]["0.5"]["runs"] == 2
    assert out["poisson"]["0.5"]["ttft_p50_ratio"] == {"median": 0.8, "each": [0.75, 0.85]}
    assert out["poisson"]["0.5"]["tok_s_ratio"]["each"] == [1.0, 0.98]
    assert out["poisson"]["0.5"]["itl_p50_ratio"]["each"] == [1.0, 1.5]  # a decode step's median: 30 against 20 ms
    assert out["poisson_measured"] == ["old on G", "new on G, KV pool 100000 tokens"]
    assert summarize.shipped_config_summary([new], "c", {"other": 1}, shipped_at) \
        is None


def test_the_shipped_config_at_a_commit_is_read_from_git_and_a_missing_commit_reads_nothing():
    import subprocess

    known = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "10164bb^{commit}"], cwd=summarize.REPO,
                           capture_output=True)
    if known.returncode != 0:
        pytest.skip("this checkout has no git history to read (a source archive or a shallow clone)")
    at = summarize.config_values_at("10164bb", "qwen3_vl")  # mm_scheduler/configs: the values, not the comments
    assert at["name"] == "qwen3_vl" and at["sglang"]["preprocess_thread"] is False
    assert summarize.config_values_at("0000000", "qwen3_vl") is None
    assert summarize.config_values_at("", "qwen3_vl") is None  # `git show :path` would read today's file


def test_a_run_that_recorded_its_servers_configs_is_judged_by_them_without_git():
    def no_git(commit, name):
        raise AssertionError("a recorded config needs no git")

    run = {"commit": "new", "variants": {"off": [], "on": [], "on+pre": [], "on+patched": []},
           "variant_changes": {"on": {"config": {}, "env": {}}, "on+pre": PRETHREAD,
                               "on+patched": {"config": {}, "env": {}, "sglang_backports": True}},
           "configs": {"on": SHIPPED_AT["old"], "on+pre": SHIPPED_NOW, "on+patched": SHIPPED_NOW}}
    # on+patched ran SGLang fixes of a later release: not the shipped setup whatever its config
    assert summarize.shipped_server(run, "c", SHIPPED_NOW, no_git) == "on+pre"


def test_a_shipped_server_without_plugin_off_beside_it_is_not_listed():
    alone = {"commit": "new", "variants": {"on": []}, "runs": {"lone-on": bench(100, 10)}}
    paired = {"commit": "new", "variants": {"off": [], "on": []},
              "runs": {"lone-off": bench(200, 10), "lone-on": bench(100, 10)}}
    out = summarize.shipped_config_summary([alone, paired], "c", SHIPPED_NOW, lambda commit, name: SHIPPED_NOW)
    assert out["servers"] == ["on (new)"] and out["lone"]["runs"] == 1
    assert summarize.shipped_config_summary([alone], "c", SHIPPED_NOW, lambda commit, name: SHIPPED_NOW) is None


def test_issue_17s_targets_are_judged_on_the_shipped_configs_medians_and_say_what_no_run_measured():
    shipped = {"seed": {"median_ttft_ratio": {"median": 0.55, "each": [0.5, 0.6]},
                        "throughput_ratio": {"median": 1.2, "each": [1.3, 1.1]}},
               "poisson": {"0.5": {"ttft_p50_ratio": {"median": 0.83, "each": [0.75, 0.83, 0.9]},
                                   "itl_p99_ratio": {"median": 0.9, "each": [0.9]},
                                   "tok_s_ratio": {"median": 1.0, "each": [1.0]}}},
               "lone": {"ttft_ratio": {"median": 0.6, "each": [0.6]}}}
    check = summarize.target_check(shipped)
    assert check["targets"]["seed TTFT median <= 0.60x"] == {"median": 0.55, "met": True, "runs": 2, "runs_met": 2}
    assert check["targets"]["seed throughput >= 1.15x"]["runs_met"] == 1
    assert check["targets"]["Poisson 0.5 TTFT p50 <= 0.80x"] == {"median": 0.83, "met": False, "runs": 3,
                                                                 "runs_met": 1}
    assert check["targets"]["Poisson 0.5 tok/s >= 1.0x"]["met"] is True  # at the bound
    assert check["unmeasured"] == ["Poisson 0.8 TTFT p50 <= 0.80x", "Poisson 0.8 ITL p99 <= 1.05x",
                                   "Poisson 0.8 tok/s >= 1.0x"]
    assert check["all_met"] is False
    nothing = summarize.target_check(None)
    assert nothing["targets"] == {} and len(nothing["unmeasured"]) == len(summarize.TARGETS)


def test_the_shipped_configs_tok_s_leaves_out_runs_whose_arrivals_took_apart_and_the_target_says_not_judged():
    """660b520's Qwen2.5-VL run: at 80 % load the plugin server got the same requests over 21.8 s against 18.2 s,
    and its tok/s read 0.85x: the median leaves it out, as lever_verdict does, and the target is not judged (nor
    met) until a run with even arrivals measures it. TTFT and ITL still count."""
    def run(commit, on_80_arrivals):
        return {"commit": commit, "gpu": "G", "variants": {"off": [], "on": []},
                "runs": {"poisson0.5-off": paced(200, 500, 18.0), "poisson0.5-on": paced(160, 510, 18.3),
                         "poisson0.8-off": paced(260, 860, 18.2),
                         "poisson0.8-on": paced(140, 730, on_80_arrivals)}}

    apart = summarize.shipped_config_summary([run("a", 21.8)], "c", SHIPPED_NOW, lambda commit, name: SHIPPED_NOW)
    load = apart["poisson"]["0.8"]
    assert "tok_s_ratio" not in load and load["ttft_p50_ratio"]["each"] == [0.5385]
    assert load["tok_s_not_judged"] == ["0.8488 (a): arrivals over 21.8 s against 18.2 s: tok/s would compare the "
                                        "spans"]
    assert apart["poisson"]["0.5"]["tok_s_ratio"]["each"] == [1.02]  # 1.7 % apart: judged
    check = summarize.target_check(apart)
    assert "Poisson 0.8 tok/s >= 1.0x" not in check["targets"] and "Poisson 0.8 tok/s >= 1.0x" not in \
        check["unmeasured"]
    assert check["not_judged"] == {"Poisson 0.8 tok/s >= 1.0x": load["tok_s_not_judged"]}
    assert check["targets"]["Poisson 0.8 TTFT p50 <= 0.80x"]["met"] is True
    assert check["all_met"] is False  # a target not judged is not met

    judged = run("b", 18.4)
    judged["runs"]["poisson0.8-on"]["total_throughput"] = 900
    both = summarize.shipped_config_summary([run("a", 21.8), judged], "c", SHIPPED_NOW,
                                            lambda commit, name: SHIPPED_NOW)
    assert both["poisson"]["0.8"]["tok_s_ratio"] == {"median": 1.0465, "each": [1.0465]}  # b's run alone
    assert both["poisson"]["0.8"]["runs"] == 2 and len(both["poisson"]["0.8"]["tok_s_not_judged"]) == 1
    check = summarize.target_check(both)
    assert check["targets"]["Poisson 0.8 tok/s >= 1.0x"] == {"median": 1.0465, "met": True, "runs": 1,
                                                             "runs_met": 1}
    assert check["not_judged"] == {}


def _pool_rebuilt(primed: bool) -> dict:
    """A two-server Poisson run before f63d249: 80 requests at 50 % (the pool held 65), 128 at 80 % (it held 104) and
    30 at 25 % (it held 32), off first at 50 % and on first at 80 %, as serve.pairs alternates them; or the same run
    with the requests built before the runs (``poisson_primed``)."""
    def poisson(n, start, ttft_ms):
        return {**bench(ttft_ms, 500), "requested": n, "window": [start, start + 20], "arrivals_s": 18.2}

    return {"commit": "660b520", "gpu": "G", "variants": {"off": [], "on": []}, **({"poisson_primed": True} if primed
                                                                                   else {}),
            "runs": {"poisson0.5-off": poisson(80, 100, 190), "poisson0.5-on": poisson(80, 140, 160),
                     "poisson0.8-on": poisson(128, 170, 140), "poisson0.8-off": poisson(128, 216, 261),
                     "poisson0.25-off": poisson(30, 240, 150), "poisson0.25-on": poisson(30, 260, 140)}}


def test_a_server_whose_run_rebuilt_a_too_small_pool_drew_its_own_arrival_schedule():
    """SGLang's load generator draws the dataset and then the arrival gaps from one seeded generator: the run that
    rebuilt the pool got another schedule than the run that reused it (660b520: 21.8 s against 18.2 at 80 %)."""
    rebuilt = _pool_rebuilt(primed=False)
    assert summarize.own_schedule(rebuilt, "0.5") == "off"  # the first run at that load
    assert summarize.own_schedule(rebuilt, "0.8") == "on"
    assert summarize.own_schedule(rebuilt, "0.25") is None  # 30 requests of a 32-request pool: reused
    one_more = {**rebuilt["runs"]["poisson0.25-on"], "requested": 33}
    assert summarize.own_schedule({**rebuilt, "runs": {**rebuilt["runs"], "poisson0.25-on": one_more}}, "0.25") \
        == "off"  # the first run at that load rebuilt it, whichever asked
    assert summarize.schedules_differ(rebuilt, "0.8", "off", "on").startswith("on's run rebuilt the load's 104")
    assert summarize.schedules_differ(rebuilt, "0.8", "off", "on+x") is None  # neither drew its own
    assert summarize.own_schedule(_pool_rebuilt(primed=True), "0.8") is None


def test_a_pair_with_two_arrival_schedules_is_left_out_of_the_shipped_config_and_not_judged_as_a_lever():
    rebuilt = _pool_rebuilt(primed=False)
    shipped = summarize.shipped_config_summary([rebuilt], "c", SHIPPED_NOW, lambda commit, name: SHIPPED_NOW)
    assert shipped["poisson"]["0.8"]["runs_left_out"] == [
        "660b520: on's run rebuilt the load's 104-request pool and drew its own arrival schedule"]
    assert "ttft_p50_ratio" not in shipped["poisson"]["0.8"]
    assert shipped["poisson"]["0.25"]["ttft_p50_ratio"]["each"] == [0.9333]  # its pool held the run: judged
    check = summarize.target_check(shipped)
    assert set(check["not_judged"]) == {f"Poisson {load} {what}" for load in ("0.5", "0.8")
                                        for what in ("TTFT p50 <= 0.80x", "ITL p99 <= 1.05x", "tok/s >= 1.0x")}
    assert check["all_met"] is False
    primed = summarize.shipped_config_summary([_pool_rebuilt(primed=True)], "c", SHIPPED_NOW,
                                              lambda commit, name: SHIPPED_NOW)
    assert primed["poisson"]["0.8"]["ttft_p50_ratio"]["each"] == [0.5364]
    assert "runs_left_out" not in primed["poisson"]["0.8"]

    lever = {**rebuilt, "variants": {"on": [], "on+x": []}, "variant_changes": {"on+x": PRETHREAD},
             "runs": {tag.replace("-off", "-on+x"): run for tag, run in rebuilt["runs"].items()}}
    verdict = summarize.lever_verdict([lever], "on+x")
    assert verdict["not_judged"]["Poisson 0.8 (660b520)"].startswith("on's run rebuilt")
    assert not any("Poisson 0.8" in what for side in ("better", "worse", "even") for what in verdict[side])


def test_the_summary_of_the_runs_on_record_is_written_and_printed(tmp_path, monkeypatch, capsys):
    """``make real-server-summary``'s script end to end over the 660b520 runs, whose Poisson pairs are all left out
    (a load with no ratio left once printed a KeyError after the JSON was written). The shipped configs are taken as
    they were at 660b520, so a later change to them does not leave those runs without a shipped-config server."""
    runs = sorted((summarize.REPO / "benchmarks" / "results" / "real_server").glob("*660b520*/results-*.json"))
    assert len(runs) == 4
    monkeypatch.setattr(summarize, "shipped_config", lambda name: summarize.config_values_at("660b520", name))
    out = tmp_path / "summary.json"
    monkeypatch.setattr(sys, "argv", ["summarize.py", *map(str, runs), "--out", str(out)])
    summarize.main()
    qwen = json.loads(out.read_text())["families"]["qwen2_5_vl_7b"]
    assert qwen["issue17_targets"]["targets"]["seed TTFT median <= 0.60x"]["median"] == 0.7743
    assert "Poisson 0.8 TTFT p50 <= 0.80x" in qwen["issue17_targets"]["not_judged"]
    assert "left out" in capsys.readouterr().out


def _record(received: float, finished: float) -> dict:
    return {"request_received_ts": received, "request_finished_ts": finished}


def test_the_load_generators_warm_up_is_left_out_of_a_runs_records_only_when_it_finished_before_them():
    """SGLang's bench_serving waits for its warm-up request before sending the measured ones: in a run's window it is
    the first receipt, over a second ahead; with it a seed burst seemed to arrive over 3.6 s instead of 1.1."""
    warm_up, burst = _record(100.0, 100.4), [_record(102.5 + i / 10, 110.0) for i in range(3)]
    assert exports.measured_records([warm_up, *burst], 3) == burst
    assert exports.arrival_span(exports.measured_records([warm_up, *burst], 3))["arrivals_s"] == pytest.approx(0.2)
    assert exports.measured_records([warm_up, *burst], None) == [warm_up, *burst]  # no count: nothing known
    assert exports.measured_records(burst, 3) == burst  # no warm-up among them
    overlapping = _record(100.0, 103.0)  # still running when the first measured one came: not a warm-up
    assert exports.measured_records([overlapping, *burst], 3) == [overlapping, *burst]


def decoding(itl_p50_ms: float, ttft_ms: float = 200, tok_s: float = 500) -> dict:
    return {**bench(ttft_ms, tok_s), "median_itl_ms": itl_p50_ms}


def test_the_decode_state_counts_slow_decodes_with_the_plugin_off_and_on_and_tests_the_difference():
    first = {"commit": "a", "runs": {"poisson0.5-off": decoding(20), "poisson0.5-on": decoding(21),
                                     "poisson0.8-off": decoding(40), "poisson0.8-on": decoding(20),
                                     "poisson0.8-off+x": decoding(19), "seed0-on": decoding(90),  # not Poisson
                                     "warm-on": decoding(90)}}
    second = {"commit": "b", "runs": {"poisson0.8-off": decoding(20), "poisson0.8-on+y": decoding(30)}}
    state = summarize.decode_state([first, second])
    assert state["itl_p50_median_ms"] == 20.0 and state["slow_above_ms"] == 27.0  # 1.35 x the median
    assert state["plugin_off"] == {"loads": 4, "slow": 1, "slow_loads": ["poisson0.8-off (a)"]}
    assert state["plugin_on"] == {"loads": 3, "slow": 1, "slow_loads": ["poisson0.8-on+y (b)"]}
    assert state["fisher_p"] == 1.0
    assert summarize.decode_state([{"commit": "c", "runs": {"poisson0.5-off": decoding(20)}}]) is None


def test_fishers_exact_test_matches_known_values():
    assert summarize.fisher_exact(3, 1, 1, 3) == pytest.approx(0.4857, abs=1e-4)  # the tea-tasting table
    assert summarize.fisher_exact(10, 0, 0, 10) == pytest.approx(1.0825e-05, rel=1e-3)
    assert summarize.fisher_exact(5, 5, 5, 5) == 1.0


def test_the_shipped_configs_normal_decode_ratios_leave_out_runs_in_which_either_server_decoded_slowly():
    runs = [{"commit": "new", "gpu": "G", "variants": {"off": [], "on": []},
             "runs": {"poisson0.8-off": decoding(off_itl, 300), "poisson0.8-on": decoding(on_itl, ttft)}}
            for off_itl, on_itl, ttft in ((20, 21, 210), (20, 34, 240), (35, 20, 150), (19, 20, 180))]
    out = summarize.shipped_config_summary(runs, "c", SHIPPED_NOW, lambda commit, name: SHIPPED_NOW,
                                           slow_above_ms=27.0)
    load = out["poisson"]["0.8"]
    assert load["runs"] == 4 and load["ttft_p50_ratio"]["each"] == [0.7, 0.8, 0.5, 0.6]
    assert load["normal_decode"]["runs"] == 2
    assert load["normal_decode"]["ttft_p50_ratio"] == {"median": 0.65, "each": [0.7, 0.6]}
    without = summarize.shipped_config_summary(runs, "c", SHIPPED_NOW, lambda commit, name: SHIPPED_NOW)
    assert "normal_decode" not in without["poisson"]["0.8"]


def test_the_shipped_config_with_flags_both_servers_ran_compares_against_the_plugin_off_server_with_those_flags(
        monkeypatch):
    sdpa = ["--mm-attention-backend", "sdpa"]
    run = {"commit": "new", "gpu": "G",
           "variants": {"off": [], "on+x": sdpa, "off+x": sdpa, "off+x+freeenc": sdpa, "on+y": ["--other"]},
           "variant_changes": {"on+x": {"config": {}, "env": {}}, "on+y": {"config": {}, "env": {}}},
           "configs": {"on+x": SHIPPED_NOW, "on+y": SHIPPED_NOW},
           "runs": {"lone-off": bench(700, 10), "lone-off+x": bench(500, 10), "lone-on+x": bench(400, 10),
                    "lone-off+x+freeenc": bench(300, 10), "lone-on+y": bench(100, 10),
                    "seed0-off+x": bench(20_000, 1000), "seed0-on+x": bench(12_000, 1400),
                    "poisson0.5-off+x": bench(300, 500), "poisson0.5-on+x": bench(240, 505)}}
    assert summarize.plugin_off_with(run, sdpa) == "off+x"  # never the free-encoder floor
    assert summarize.plugin_off_with(run, []) == "off"
    assert summarize.plugin_off_with(run, ["--other"]) is None
    with_env = {**run, "variants": {"on": [], "off+e": [], "off+z": sdpa},
                "variant_changes": {"off+e": {"config": {}, "env": {"E": "1"}},
                                    "off+z": {"config": {}, "env": {"E": "1"}}}}
    assert summarize.plugin_off_with(with_env, []) is None  # without plain off, never a server with an env of its own
    assert summarize.plugin_off_with(with_env, sdpa) is None
    assert summarize.shared_flag_sets([run]) == [sdpa]  # on+y has no plugin-off twin
    assert summarize.shipped_config_summary([run], "c", SHIPPED_NOW, shipped_at) is None  # no flag-less plugin server
    out = summarize.shipped_config_summary([run], "c", SHIPPED_NOW, shipped_at, flags=sdpa)
    assert out["servers"] == ["on+x (new)"]
    assert out["lone"]["ttft_ratio"]["each"] == [0.8]  # against off+x (500 ms), not off or the floor
    assert out["seed"]["median_ttft_ratio"]["each"] == [0.6]
    assert out["poisson"]["0.5"]["ttft_p50_ratio"]["each"] == [0.8]
    monkeypatch.setattr(summarize, "shipped_config", lambda name: SHIPPED_NOW)
    run["family"] = "gemma3_12b"
    fam = summarize.family_summary(summarize.merge_runs([run]), harness_runs=[run])
    with_sdpa = fam["shipped_config_with_flags"]["--mm-attention-backend sdpa"]
    assert with_sdpa["lone"] == out["lone"] and with_sdpa["issue17_targets"]["targets"]["lone TTFT <= 0.90x"]["met"]
    assert fam["issue17_targets"]["unmeasured"]  # the flag-less targets stay unmeasured


def _exported(received: float, first_chunk: float, finished: float) -> dict:
    return {"request_received_ts": received, "api_server_dispatch_finish_ts": received + 0.01,
            "response_sent_to_client_ts": first_chunk, "request_finished_ts": finished}


def test_the_drain_ends_with_the_request_that_finished_last_its_first_token_and_its_decode():
    """The last arrival got its first token quickly but the one before it decoded for longer: the drain is the
    latter's end, so its first token and decode are what the summary reports."""
    records = [_exported(10.0, 10.2, 12.0), _exported(17.0, 17.3, 19.9), _exported(18.0, 18.1, 19.5)]
    assert exports.arrival_span(records) == {"arrivals_s": 8.0, "drain_s": 1.9}
    assert exports.last_finisher(records) == {"last_first_token_s": 0.3, "last_decode_s": 2.6}
    no_chunk_time = [{k: v for k, v in r.items() if k != "response_sent_to_client_ts"} for r in records]
    assert exports.last_finisher(no_chunk_time) == {}  # an export without the first chunk's time
    assert exports.last_finisher([]) == {}


def test_a_run_recorded_before_the_harness_kept_the_last_finisher_gets_it_from_its_archive(tmp_path):
    import copy
    import tarfile

    export = tmp_path / "fam" / "requests-on+x"
    export.mkdir(parents=True)
    lines = [_exported(100.0, 100.2, 101.0), _exported(104.0, 104.15, 106.4),  # the run's
             _exported(300.0, 300.1, 301.0)]  # a later run's, outside the window
    (export / "m.log").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    archive = tmp_path / "gpu-serve-fam.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(tmp_path / "fam", arcname="fam")
    # Recorded before serve.py kept `requested` and the drain: a value that differs from the records' is kept, and
    # nothing but the last finisher is added.
    recorded = {**bench(200, 3, window=[99.0, 110.0]), "arrivals_s": 4.5}
    result = {"runs": {"poisson0.8-on+x": dict(recorded), "seed0-on+x": bench(200, 3, window=[99.0, 110.0])}}
    seed_before = copy.deepcopy(result["runs"]["seed0-on+x"])
    filled = summarize.with_last_finishers(result, archive)["runs"]
    assert filled["poisson0.8-on+x"] == {**recorded, "last_first_token_s": pytest.approx(0.15),
                                         "last_decode_s": pytest.approx(2.25)}
    assert filled["seed0-on+x"] == seed_before  # Poisson runs only
    untouched = {"runs": {"poisson0.5-on": bench(200, 3, window=[1.0, 2.0])}}
    before = copy.deepcopy(untouched)
    assert summarize.with_last_finishers(untouched, tmp_path / "missing.tar.xz") == before
    other_server = {"runs": {"poisson0.5-on": bench(200, 3, window=[99.0, 110.0])}}  # no requests-on in the archive
    assert summarize.with_last_finishers(copy.deepcopy(other_server), archive) == other_server


def test_the_shipped_config_says_how_often_its_last_finisher_got_its_first_token_sooner_and_decoded_faster():
    def tail(ttft_ms: float, tok_s: float, first_token_s: float, decode_s: float) -> dict:
        return {**paced(ttft_ms, tok_s, 18.0), "drain_s": first_token_s + decode_s,
                "last_first_token_s": first_token_s, "last_decode_s": decode_s}

    runs = []
    for commit, on_decode in (("a", 2.4), ("b", 2.1), ("c", 2.5)):  # off decodes its last request in 2.2 s
        runs.append({"commit": commit, "variants": {"off": [], "on": []}, "configs": {"on": SHIPPED_NOW},
                     "runs": {"poisson0.8-off": tail(200, 1000, 0.2, 2.2),
                              "poisson0.8-on": tail(140, 990 if on_decode > 2.2 else 1004, 0.14, on_decode)}})
    out = summarize.shipped_config_summary(runs, "c", SHIPPED_NOW, shipped_at)
    load = out["poisson"]["0.8"]
    assert load["last_first_token_ratio"] == {"median": 0.7, "each": [0.7, 0.7, 0.7]}
    assert load["last_decode_ratio"]["each"] == [1.0909, 0.9545, 1.1364]
    assert load["tok_s_ratio"]["each"] == [0.99, 1.004, 0.99]
    assert out["last_finisher"] == {"first_token_sooner": {"loads": 3, "plugin_on": 3, "sign_test_p": 0.25},
                                    "decode_faster": {"loads": 3, "plugin_on": 1, "sign_test_p": 1.0}}
    tied = {"0.5": {"last_first_token_ratio": {"each": [0.7, 1.0, float("nan")]},
                    "last_decode_ratio": {"each": [1.0, 1.0]}}}
    assert summarize.last_finisher_signs(tied) == {"first_token_sooner": {"loads": 1, "plugin_on": 1,
                                                                          "sign_test_p": 1.0}}  # ties left out
    older = [{**run, "runs": {tag: bench(200, 1000) for tag in run["runs"]}} for run in runs]  # nothing recorded
    assert "last_first_token_ratio" not in summarize.shipped_config_summary(older, "c", SHIPPED_NOW,
                                                                          shipped_at)["poisson"]["0.8"]


@pytest.mark.parametrize(("wins", "n", "p"), [(12, 12, 2 / 4096), (6, 12, 1.0), (0, 5, 0.0625), (5, 12, 0.7744)])
def test_the_sign_test_gives_the_two_sided_chance_of_a_split_at_least_this_uneven(wins, n, p):
    assert summarize.sign_test(wins, n) == pytest.approx(p, abs=1e-4)

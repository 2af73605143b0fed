"""The serving benchmark runs end to end on CPU (tiny towers, tiny LM), and its LM's KV cache is exact.

The GPU run is one command on a device that this CI never has; these tests keep the script from
rotting and prove that the decode path (KV cache, slot moves, GQA attention) computes what a full
recomputation does, so the timed steps are real attention rather than something cheaper.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks.serving_bench import LOADS, MODES, TINY_LM, DecoderLM

REPO = Path(__file__).parents[2]
REQUIRED = {"mode": str, "load": float, "ttft_p50_ms": float, "ttft_p99_ms": float, "itl_p50_ms": float,
            "itl_p99_ms": float, "tok_s": float}


def test_smoke_run_writes_the_issue_schema_and_every_mode_completes_every_request(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.serving_bench", "--smoke", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=REPO, check=True, timeout=300, capture_output=True)
    report = json.loads((tmp_path / "serving_bench_smoke.json").read_text())
    assert set(report) == {"device", "llm_shape", "rows"}
    assert isinstance(report["device"], str) and isinstance(report["llm_shape"], str)
    rows = report["rows"]
    assert {(r["mode"], r["load"]) for r in rows} == {(m, load) for m in MODES for load in LOADS}
    for row in rows:
        for key, kind in REQUIRED.items():
            assert isinstance(row[key], kind), (key, row[key])
        assert row["requests"] == row["trace_requests"] > 0
        assert row["completed"] == row["requests"], row
        assert row["ttft_p50_ms"] > 0 and row["itl_p50_ms"] > 0
        assert row["output_tokens"] >= 2 * row["requests"]  # every request generated all of its (>= 2) tokens
    for mode in ("plugin", "plugin-tuned"):
        plugin_rows = [r for r in rows if r["mode"] == mode]
        assert sum(r["service_taken_early"] for r in plugin_rows) > 0, "no result came from early encoding"
    meta = json.loads((tmp_path / "serving_bench_smoke_meta.json").read_text())
    assert meta["inline_capacity_req_s"] > 0


def _full_logits(llm: DecoderLM, embeds: torch.Tensor, slot: int) -> torch.Tensor:
    return llm.logits(llm.prefill([slot], embeds, [embeds.shape[0]]))[0]


def test_decode_over_the_kv_cache_matches_recomputing_the_whole_sequence():
    torch.manual_seed(0)
    with torch.inference_mode():
        llm = DecoderLM(TINY_LM, torch.device("cpu"), torch.float32, max_slots=3, max_len=64, seed=1)
        prompts = [llm.embed[torch.randint(0, TINY_LM.vocab, (n,))] for n in (5, 9)]
        seqs = [p.clone() for p in prompts]
        hidden = llm.prefill([0, 1], torch.cat(prompts), [5, 9])
        tokens = llm.sample(hidden).tolist()
        lengths = [5, 9]
        for step in range(4):
            if step == 2:  # request 0 finishes: request 1 moves from slot 1 into slot 0, as the loop compacts
                llm.move_slot(1, 0, lengths[1])
                seqs, tokens, lengths = seqs[1:], tokens[1:], lengths[1:]
            seqs = [torch.cat([s, llm.embed[t][None]]) for s, t in zip(seqs, tokens, strict=True)]
            logits = llm.logits(llm.decode(tokens, lengths))
            for i, seq in enumerate(seqs):
                torch.testing.assert_close(logits[i], _full_logits(llm, seq, slot=2), atol=1e-4, rtol=1e-4)
            tokens = logits.argmax(-1).tolist()
            lengths = [n + 1 for n in lengths]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_graph_replay_matches_the_eager_step_on_cuda():
    from benchmarks.serving_bench import DecodeGraphs

    with torch.inference_mode():
        llm = DecoderLM(TINY_LM, torch.device("cuda", torch.cuda.current_device()), torch.bfloat16,
                        max_slots=8, max_len=256, seed=1)
    graphs = DecodeGraphs(llm, span_step=128)
    assert graphs.check() < 0.02


def test_plugin_path_returns_the_direct_encoding_and_readiness_follows_the_early_encode():
    """Through the real EncoderService: the benchmark's adapter gives the same rows as the direct call, and
    the tuned mode's readiness signal (None / True) tracks early submission, completion and release."""
    import time

    from mm_scheduler_sglang.service import EncoderService

    from benchmarks.harness import MediaMix
    from benchmarks.serving_bench import Req, RequestSpec, ServedTower
    from mm_scheduler import CoalescerConfig
    from mm_scheduler.towers import build_tower

    raw = build_tower("qwen2_5_vl", "cpu", tiny=True)
    tower = ServedTower(raw, TINY_LM.hidden)
    mix = MediaMix("qwen2_5_vl", raw, tiny=True)
    req = Req("r-test", RequestSpec((mix.images[0][0], mix.videos[0]), 8, 2), arrival=0.0)
    service = EncoderService(tower, CoalescerConfig(budget_bytes=1 << 26, name="serving-test"), lockstep=False)
    service.start()
    try:
        assert [tower.ready(item) for item in req.items] == [None, None]
        service.on_arrival(req.rid, req.items)
        deadline = time.monotonic() + 60
        while not all(tower.ready(item) for item in req.items):
            assert time.monotonic() < deadline, "early encodes never completed"
            time.sleep(0.01)
        with torch.inference_mode():
            early = service.encode(req.items, tower.encode_direct)
            direct = tower.encode_direct(req.items)
        assert early.shape == (req.prompt_len - 8, TINY_LM.hidden)
        torch.testing.assert_close(early, direct)
        assert service.stats()["taken_early"] == 2
        service.release(req.rid, aborted=False)
        tower.forget(req.items)
        assert [tower.ready(item) for item in req.items] == [None, None]
    finally:
        service.close()

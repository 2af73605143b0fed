"""The YAML's ``sglang:`` section: plugin settings validated by the plugin, ignored by the core."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import pytest
from mm_scheduler_sglang import settings

from mm_scheduler import load_config

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_sets_the_plugin_section_and_the_core_still_loads(path, monkeypatch):
    monkeypatch.delenv(settings.ENV_MAX_HELD_MB, raising=False)
    chosen = settings.resolve(False, str(path))
    # Graphs, and encoding left to an idle prefill: measured to win on these families only.
    graphs = {"qwen2_5_vl.yaml": [4096, 8192, 16384, 28672], "gemma4.yaml": [2520, 5040, 7560],
              "gemma3.yaml": [4096, 8192, 16384, 32768]}
    lazy = {"qwen2_5_vl.yaml", "gemma4.yaml"}
    prethread = {"qwen3_vl.yaml"}  # measured beside plugin-off under Poisson load on this family only
    one_torch_thread = {"qwen2_5_vl.yaml", "gemma3.yaml", "gemma4.yaml"}  # measured beside plugin-off on these only
    assert chosen["plugin"] == {"llm_stream_priority": "high", "prefill_wait_ms": 2000.0, "defer_prefill_ms": 0.0,
                                "early_encode_min_waiting": 1 if path.name in lazy else 0,
                                "vit_graph_patches": graphs.get(path.name, []),
                                "preprocess_thread": path.name in prethread, "uint8_pixels": True,
                                "fast_mm_token_check": True,
                                "tokenizer_torch_threads": 1 if path.name in one_torch_thread else None}
    config = load_config(path)
    assert config.name == chosen["values"]["name"]
    whole_burst_queue = {"gemma3.yaml", "gemma4.yaml"}  # measured beside plugin-off on these only
    assert config.max_queue_patches == (4_000_000 if path.name in whole_burst_queue else 500_000)


def test_plugin_section_values_reach_the_settings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("budget_bytes: 1048576\nsglang:\n  llm_stream_priority: default\n  prefill_wait_ms: 50\n"
                    "  defer_prefill_ms: 150\n  early_encode_min_waiting: 2\n  vit_graph_patches: [8192, 4096, 8192]\n")
    assert settings.resolve(False, str(path))["plugin"] == {"llm_stream_priority": "default", "prefill_wait_ms": 50.0,
                                                            "defer_prefill_ms": 150.0, "early_encode_min_waiting": 2,
                                                            "vit_graph_patches": [4096, 8192],
                                                            "preprocess_thread": False,
                                                            "uint8_pixels": True, "fast_mm_token_check": True,
                                                            "tokenizer_torch_threads": None}


@pytest.mark.parametrize("body, named", [
    ("sglang:\n  prefill_wait: 5\n", "prefill_wait"),
    ("sglang:\n  llm_stream_priority: low\n", "llm_stream_priority"),
    ("sglang:\n  prefill_wait_ms: 0\n", "prefill_wait_ms"),
    ("sglang:\n  defer_prefill_ms: -1\n", "defer_prefill_ms"),
    ("sglang: [1]\n", "'sglang' must be a mapping, got list"),
    ("sglang:\n  prefill_wait_ms: true\n", "prefill_wait_ms"),
    ("sglang:\n  prefill_wait_ms: soon\n", "prefill_wait_ms"),
    ("sglang:\n  prefill_wait_ms: -5\n", "prefill_wait_ms"),
    ("sglang:\n  defer_prefill_ms: true\n", "defer_prefill_ms"),
    ("sglang:\n  defer_prefill_ms: later\n", "defer_prefill_ms"),
    ("sglang:\n  early_encode_min_waiting: -1\n", "early_encode_min_waiting"),
    ("sglang:\n  early_encode_min_waiting: 1.5\n", "early_encode_min_waiting"),
    ("sglang:\n  early_encode_min_waiting: true\n", "early_encode_min_waiting"),
    ("sglang:\n  vit_graph_patches: 4096\n", "vit_graph_patches"),
    ("sglang:\n  vit_graph_patches: [4098]\n", "vit_graph_patches"),
    ("sglang:\n  vit_graph_patches: [0]\n", "vit_graph_patches"),
    ("sglang:\n  vit_graph_patches: [true]\n", "vit_graph_patches"),
    ("sglang:\n  vit_graph_patches: [4, 8, 12, 16, 20, 24, 28, 32, 36]\n", "at most 8"),
    ("sglang:\n  tokenizer_torch_threads: 0\n", "tokenizer_torch_threads must be a whole number >= 1"),
    ("sglang:\n  tokenizer_torch_threads: 1.5\n", "tokenizer_torch_threads"),
    ("sglang:\n  tokenizer_torch_threads: true\n", "tokenizer_torch_threads"),
    ("sglang:\n  tokenizer_torch_threads: one\n", "tokenizer_torch_threads"),
])
def test_a_bad_plugin_setting_names_the_file_and_the_key(tmp_path, body, named):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ValueError) as info:
        settings.resolve(False, str(path))
    assert str(path) in str(info.value) and named in str(info.value)


@pytest.fixture
def clean_env(monkeypatch):
    for name in (settings.ENV_ENABLE, settings.ENV_CONFIG, settings.ENV_MODE, settings.ENV_MAX_HELD_MB):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_sub_millisecond_waits_and_a_missing_defer_setting_are_accepted(tmp_path, clean_env):
    path = tmp_path / "c.yaml"
    path.write_text("sglang:\n  prefill_wait_ms: 0.5\n")
    assert settings.resolve(False, str(path))["plugin"] == {"llm_stream_priority": "high", "prefill_wait_ms": 0.5,
                                                            "defer_prefill_ms": 0.0, "early_encode_min_waiting": 0,
                                                            "vit_graph_patches": [], "preprocess_thread": False,
                                                            "uint8_pixels": True, "fast_mm_token_check": True,
                                                            "tokenizer_torch_threads": None}


def test_disabled_unless_a_flag_a_config_or_the_environment_enables_it(clean_env):
    assert settings.resolve(False, None) is None
    clean_env.setenv(settings.ENV_ENABLE, "0")
    assert settings.resolve(False, None) is None
    for value in ("1", " Yes ", "TRUE", "on"):
        clean_env.setenv(settings.ENV_ENABLE, value)
        assert settings.resolve(False, None) is not None, value
    clean_env.delenv(settings.ENV_ENABLE)
    assert settings.resolve(True, None) == {"config_path": None, "values": {}, "mode": "auto",
                                            "max_held_bytes": 1024 * 2**20, "plugin": settings.PLUGIN_DEFAULTS}


def test_the_config_file_comes_from_the_flag_else_the_environment(tmp_path, clean_env):
    flagged, env = tmp_path / "flag.yaml", tmp_path / "env.yaml"
    flagged.write_text("name: from-flag\n")
    env.write_text("name: from-env\n")
    clean_env.setenv(settings.ENV_CONFIG, str(env))
    chosen = settings.resolve(False, None)
    assert chosen["config_path"] == str(env) and chosen["values"]["name"] == "from-env"
    assert settings.resolve(False, str(flagged))["values"]["name"] == "from-flag"
    clean_env.setenv(settings.ENV_CONFIG, "")  # empty: no file, and not enabled by it
    assert settings.resolve(False, None) is None


def test_the_mode_comes_from_the_environment_case_insensitively_and_is_checked(clean_env):
    clean_env.setenv(settings.ENV_MODE, " LockStep ")
    assert settings.resolve(True, None)["mode"] == "lockstep"
    clean_env.setenv(settings.ENV_MODE, "sync")
    with pytest.raises(ValueError, match=r"MM_COALESCER_MODE='sync': expected one of \['auto', 'async', 'lockstep'\]"):
        settings.resolve(True, None)


def test_the_held_results_cap_comes_from_the_flag_else_the_environment_in_megabytes(clean_env):
    assert settings.resolve(True, None, 1.5)["max_held_bytes"] == int(1.5 * 2**20)
    clean_env.setenv(settings.ENV_MAX_HELD_MB, "512")
    assert settings.resolve(True, None)["max_held_bytes"] == 512 * 2**20
    assert settings.resolve(True, None, 0.0)["max_held_bytes"] == 0  # the flag wins, and 0 is allowed
    clean_env.setenv(settings.ENV_MAX_HELD_MB, "lots")
    with pytest.raises(ValueError, match="MM_COALESCER_MAX_HELD_MB='lots': expected a number of megabytes"):
        settings.resolve(True, None)
    with pytest.raises(ValueError, match=">= 0 MB"):
        settings.resolve(True, None, -1.0)


def test_the_flags_join_sglangs_parser_with_their_defaults():
    parser = argparse.ArgumentParser()
    settings.add_cli_args(parser)
    assert vars(parser.parse_args([])) == {"enable_mm_coalescer": False, "mm_coalescer_config": None,
                                           "mm_coalescer_max_held_mb": None}
    args = parser.parse_args(["--enable-mm-coalescer", "--mm-coalescer-config", "c.yaml",
                              "--mm-coalescer-max-held-mb", "12.5"])
    assert (args.enable_mm_coalescer, args.mm_coalescer_config, args.mm_coalescer_max_held_mb) == (True, "c.yaml", 12.5)
    text = parser.format_help()
    assert settings.ENV_ENABLE in text and settings.ENV_CONFIG in text and settings.ENV_MAX_HELD_MB in text
    assert "mm-scheduler" in text and "1024" in text


def test_settings_travel_as_one_attribute_of_server_args():
    assert settings.settings_of(SimpleNamespace(**{settings.ATTR: {"mode": "auto"}})) == {"mode": "auto"}
    assert settings.settings_of(SimpleNamespace()) is None


def _prefills(name: str, n: int, wait_s: float | list[float], forward_s: float, queued_s: float = 0.005,
              source: str | list[str] = "early") -> str:
    from mm_scheduler_sglang.service import PREFILL_ITEMS, PREFILL_WAIT
    from prometheus_client import generate_latest

    from mm_scheduler import metrics

    waits = wait_s if isinstance(wait_s, list) else [wait_s] * n
    sources = source if isinstance(source, list) else [source] * n
    for i in range(n):
        metrics.UNITS_PER_FORWARD.labels(name).observe(1)
        metrics.BATCH_SECONDS.labels(name).observe(forward_s)
        metrics.QUEUE_WAIT.labels(name).observe(queued_s)
        PREFILL_WAIT.labels(name).observe(waits[i])
        PREFILL_ITEMS.labels(name, sources[i]).inc()
    return generate_latest().decode()


def _sglang_queue_time(seconds: float, n: int = 10) -> str:
    """SGLang's own ``sglang:queue_time_seconds`` histogram, as its /metrics writes it beside ours."""
    return (f'sglang:queue_time_seconds_bucket{{model_name="m",le="+Inf"}} {n}\n'
            f'sglang:queue_time_seconds_count{{model_name="m"}} {n}\n'
            f'sglang:queue_time_seconds_sum{{model_name="m"}} {seconds * n}\n')


@pytest.mark.parametrize("wait_s, queued_s, source, sglang_queue_s, plugin, proposed", [
    (0.045, 0.005, "early", 0.002, {}, [("sglang.early_encode_min_waiting", 1)]),  # waited out a whole forward
    (0.010, 0.005, "early", 0.002, {}, []),  # a head start: the encode was mostly done when the prefill came
    (0.045, 0.200, "early", 0.002, {}, []),  # the encoder had a backlog: too little capacity, not timing
    (0.045, 0.005, "on_demand", 0.002, {}, []),  # the waits were on encodes the prefill itself asked for
    (0.045, 0.005, "early", 1.500, {}, []),  # requests sat in SGLang's queue: a burst, where the head start wins
    (0.045, 0.005, "early", 0.002, {"early_encode_min_waiting": 2}, []),  # already encoding behind a queue only
])
def test_tune_proposes_encoding_behind_a_queue_only_when_prefills_waited_out_whole_forwards(
        wait_s, queued_s, source, sglang_queue_s, plugin, proposed):
    from mm_scheduler import tune

    name = f"tune-plugin-{wait_s}-{queued_s}-{source}-{sglang_queue_s}-{sorted(plugin)}"
    text = _prefills(name, 10, wait_s, forward_s=0.05, queued_s=queued_s, source=source)
    _, changes = tune.tune(text + _sglang_queue_time(sglang_queue_s), {"sglang": plugin}, name, [settings.tune_rules])
    assert [(c.key, c.value) for c in changes] == proposed


HALF = [0.09] * 5 + [0.001] * 5  # half the prefills blocked, 45.5 ms on average


@pytest.mark.parametrize("waits, sources, queued_s, proposed", [
    (HALF, "early", 0.005, True),  # exactly half blocked is enough
    (0.045, ["early"] * 5 + ["on_demand"] * 5, 0.005, True),  # exactly half the items encoded early is enough
    (0.045, ["early"] * 3 + ["on_demand"] * 7, 0.005, False),
    (0.045, "early", 0.05, False),  # the encoder's queue wait equals a forward: a backlog
])
def test_tunes_encoding_rule_at_its_thresholds(request, waits, sources, queued_s, proposed):
    from mm_scheduler import tune

    name = request.node.name  # one coalescer label per case: the registry is process-wide
    text = _prefills(name, 10, waits, forward_s=0.05, queued_s=queued_s, source=sources)
    _, changes = tune.tune(text, {}, name, [settings.tune_rules])
    assert bool(changes) is proposed


def test_tunes_encoding_rule_says_what_it_saw_and_needs_both_histograms():
    from mm_scheduler import tune

    text = _prefills("tune-why", 10, 0.045, forward_s=0.05)
    _, changes = tune.tune(text, {"sglang": None}, "tune-why", [settings.tune_rules])
    assert [c.why for c in changes] == [
        "100% of 10 prefills blocked more than 5 ms on the encoder, 45 ms on average against 50 ms a forward: "
        "encodes at arrival had no head start; encode at arrival only behind a waiting request"]
    seen = tune.parse(text)["tune-why"]
    for missing in ("batch_seconds", "prefill_wait_seconds"):
        partial = tune.Observed(seen.coalescer, {k: v for k, v in seen.histograms.items() if k != missing},
                                seen.counters, seen.host)
        assert settings.tune_rules({}, partial) == []


def _forwards(name: str, patches: list[int], forward_s: float, launch_s: float) -> str:
    from prometheus_client import generate_latest

    from mm_scheduler import metrics

    for n in patches:
        metrics.PATCHES_PER_FORWARD.labels(name).observe(n)
        metrics.BATCH_SECONDS.labels(name).observe(forward_s)
        metrics.BATCH_LAUNCH_SECONDS.labels(name).observe(launch_s)
    return generate_latest().decode()


# 1a3705d's Qwen3-VL Poisson 50 % forwards (H100): 5 up to 1,024 patches, 18 to 2,048, 21 to 4,096, 4 to 8,192
POISSON_PATCHES = [900] * 5 + [1600] * 18 + [3200] * 21 + [4800] * 4


def test_tune_proposes_graph_buckets_from_the_patches_of_launch_bound_forwards():
    from mm_scheduler import tune

    text = _forwards("tune-graphs", POISSON_PATCHES, forward_s=0.040, launch_s=0.038)
    _, changes = tune.tune(text, {}, "tune-graphs", [settings.tune_rules])
    assert [(c.key, c.value) for c in changes] == [("sglang.vit_graph_patches", [2048, 4096, 8192])]
    assert changes[0].why.startswith(
        "95% of a forward's 40 ms was spent launching it (48 forwards): the tower is launch-bound, and a CUDA graph "
        "replays a forward in one launch; buckets from the patches a forward held (10% up to 1,024, 38% up to 2,048, "
        "44% up to 4,096, 8% up to 8,192).")


@pytest.mark.parametrize("launch_s, plugin, proposed", [
    (0.041, {}, True),  # 91 % of the forward launching: just above LAUNCH_BOUND
    (0.040, {}, False),  # 89 %: Qwen3-VL's Poisson forwards were 71-88 %, and graphs barely shortened them (f4d38f4)
    (0.038, {"vit_graph_patches": [4096]}, False),  # graphs already on: their launches are replays
])
def test_tunes_graph_rule_at_its_thresholds(request, launch_s, plugin, proposed):
    from mm_scheduler import tune

    name = request.node.name
    text = _forwards(name, POISSON_PATCHES, forward_s=0.045, launch_s=launch_s)
    _, changes = tune.tune(text, {"sglang": plugin}, name, [settings.tune_rules])
    assert any(c.key == "sglang.vit_graph_patches" for c in changes) is proposed


def test_tunes_graph_rule_needs_the_launch_and_patch_histograms_and_an_outlier_adds_one_bound_not_its_own():
    from mm_scheduler import tune

    text = _forwards("tune-graphs-one", [100_000] + [1600] * 9, forward_s=0.042, launch_s=0.040)
    seen = tune.parse(text)["tune-graphs-one"]
    assert settings.tune_rules({}, seen)[0].value == [2048, 4096]  # 90 % up to 2,048; the outlier runs in 4,096s
    alone = tune.parse(_forwards("tune-graphs-all", [1600] * 10, forward_s=0.042, launch_s=0.040))["tune-graphs-all"]
    assert settings.tune_rules({}, alone)[0].value == [2048]  # nothing beyond: no bound above
    for missing in ("batch_launch_seconds", "patches_per_forward", "batch_seconds"):
        partial = tune.Observed(seen.coalescer, {k: v for k, v in seen.histograms.items() if k != missing},
                                seen.counters, seen.host)
        assert settings.tune_rules({}, partial) == []


def _tokenizer_run(cpu_before: float, cpu_after: float, requests: float = 101.0) -> str:
    """One run's ``# before`` / ``# after`` scrapes of a plugin server with SGLang's tokenizer-manager counters (the
    numbers of c5d3ab6's Qwen2.5-VL seed burst, H100)."""
    def scrape(units: float, cpu: float, total: float) -> str:
        return (f'mm_coalescer_units_total{{coalescer="tm"}} {units}\n'
                f'sglang:process_cpu_seconds_total{{component="detokenizer"}} {cpu / 1000}\n'
                f'sglang:process_cpu_seconds_total{{component="tokenizer"}} {cpu}\n'
                f'sglang:num_requests_total{{engine_type="unified",model_name="m"}} {total}\n')
    return f"# before\n{scrape(0, cpu_before, 43.0)}# after\n{scrape(600, cpu_after, 43.0 + requests)}"


@pytest.mark.parametrize("cpu_s, plugin, proposed", [
    ((20.0, 102.25), {}, True),  # 82.25 CPU-s for 101 requests: 0.81 a request, torch's default threads (c5d3ab6)
    ((3.18, 6.73), {}, False),  # 0.035 a request: one thread (e534b6b)
    ((20.0, 40.25), {}, True),  # 20.25 / 101: just above the threshold
    ((20.0, 40.0), {}, False),  # 20.0 / 101: just below it
    ((20.0, 102.25), {"tokenizer_torch_threads": 4}, False),  # set already: the operator's choice stands
])
def test_tune_proposes_one_tokenizer_thread_when_the_tokenizer_manager_burned_cpu_a_request(cpu_s, plugin, proposed):
    from mm_scheduler import tune

    _, changes = tune.tune(_tokenizer_run(*cpu_s), {"sglang": plugin}, "tm", [settings.tune_rules])
    found = [c for c in changes if c.key == "sglang.tokenizer_torch_threads"]
    assert [c.value for c in found] == ([1] if proposed else [])


def test_tunes_tokenizer_rule_says_what_it_saw():
    from mm_scheduler import tune

    _, changes = tune.tune(_tokenizer_run(20.0, 102.25), {}, "tm", [settings.tune_rules])
    assert [c.why for c in changes] == [
        "SGLang's tokenizer manager process used 82.2 CPU-s for 101 requests, 0.81 a request: torch's intra-op threads "
        "spinning on each request's features, beside the scheduler's threads; SGLang's own tokenizer workers run torch "
        "on one thread. Measured on Qwen2.5-VL: 0.8-0.9 -> 0.035 CPU-s a request, seed TTFT median 0.64-0.67x"]


def test_tunes_tokenizer_rule_needs_sglangs_cpu_and_request_counters():
    from mm_scheduler import tune

    seen = tune.parse(_tokenizer_run(20.0, 102.25))["tm"]
    assert seen.host_counter("sglang:process_cpu_seconds", component="tokenizer") == pytest.approx(82.25)
    assert seen.host_counter("sglang:process_cpu_seconds") == pytest.approx(82.25 * 1.001)  # both components
    assert seen.host_counter("sglang:num_requests") == pytest.approx(101.0)
    for missing in ("sglang:process_cpu_seconds", "sglang:num_requests"):  # an SGLang that does not export it
        partial = tune.Observed(seen.coalescer, seen.histograms, seen.counters, seen.host,
                                {k: v for k, v in seen.host_counters.items() if k != missing})
        assert partial.host_counter(missing) is None
        assert settings.tune_rules({}, partial) == []


def test_the_preprocessing_advice_is_one_line_naming_both_flags():
    from types import SimpleNamespace

    assert settings.preprocessing_advice(SimpleNamespace(tokenizer_worker_num=1, mm_feature_transport=None)) == (
        "mm-coalescer: SGLang runs 1 tokenizer worker(s) with cpu feature transport; on image-heavy traffic its "
        "preprocessing, not the vision tower, dominated TTFT in our real-server runs (--tokenizer-worker-num 4 "
        "--mm-feature-transport cuda_ipc without this plugin: TTFT 0.66x on Qwen2.5-VL, 0.57x on Qwen3-VL, whose "
        "0.5.16 needs 0.5.23's device fix or this plugin for them, 0.94x on Gemma 4); turn those on first, then "
        "measure this plugin against them (on top of them it lost on Qwen2.5-VL and Qwen3-VL, 1.20x and 1.11x, and "
        "won on Gemma 4, 0.70x)")


def test_preprocessing_advice_only_when_sglangs_own_preprocessing_flags_are_off():
    def advice(**server_args):
        return settings.preprocessing_advice(SimpleNamespace(**server_args))

    assert advice() is None  # a ServerArgs without the flags (an older SGLang): nothing to advise
    assert advice(tokenizer_worker_num=4, mm_feature_transport="cuda_ipc") is None  # both on
    assert advice(tokenizer_worker_num=2, mm_feature_transport="cuda_ipc") is None  # more than one worker is enough
    for workers, transport, said in [(1, "cuda_ipc", "1 tokenizer worker(s) with cuda_ipc feature transport"),
                                     (4, "cpu", "4 tokenizer worker(s) with cpu feature transport"),
                                     (4, None, "4 tokenizer worker(s) with cpu feature transport"),  # SGLang's default
                                     (1, None, "1 tokenizer worker(s) with cpu feature transport")]:
        line = advice(tokenizer_worker_num=workers, mm_feature_transport=transport)
        assert line is not None and said in line, (workers, transport, line)
        assert "--tokenizer-worker-num 4 --mm-feature-transport cuda_ipc" in line  # the flags to try


def test_a_typo_under_sglang_is_answered_with_the_key_it_resembles(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("sglang:\n  prefill_wait: 5\n  defer_prefil_ms: 1\n")
    with pytest.raises(ValueError) as info:
        settings.resolve(False, str(path))
    assert str(info.value) == (f"{path}: unknown key(s) ['defer_prefil_ms', 'prefill_wait'] under 'sglang' (did you "
                               "mean 'defer_prefill_ms', 'prefill_wait_ms'?); known: ['defer_prefill_ms', "
                               "'early_encode_min_waiting', 'fast_mm_token_check', 'llm_stream_priority', "
                               "'prefill_wait_ms', 'preprocess_thread', 'tokenizer_torch_threads', 'uint8_pixels', "
                               "'vit_graph_patches']")


def test_a_budget_below_the_familys_smallest_unit_is_refused_with_the_arithmetic(tmp_path):
    path = tmp_path / "gemma4.yaml"
    path.write_text("name: gemma4\nbudget_bytes: 1000000\nbytes_per_patch: 2000\n")
    with pytest.raises(ValueError) as info:
        settings.check_config_file(str(path))
    assert str(info.value) == (f"{path}: 'budget_bytes' 1000000 cannot hold the smallest gemma4 unit (one 70-token "
                               "image: 630 patches x 2000 bytes/patch = 1260000 bytes); raise budget_bytes")
    path.write_text("name: gemma4\nbudget_bytes: 1260000\nbytes_per_patch: 2000\n")  # exactly one unit: enough
    assert settings.check_config_file(str(path))["values"]["budget_bytes"] == 1260000


def test_preprocess_thread_with_several_tokenizer_workers_is_said_not_to_apply_and_the_default_uint8_is_not_named():
    chosen = {"plugin": {**settings.PLUGIN_DEFAULTS, "preprocess_thread": True}}
    args = SimpleNamespace(tokenizer_worker_num=4, mm_feature_transport="cuda_ipc", **{settings.ATTR: chosen})
    advice = settings.preprocessing_advice(args)
    assert "with --tokenizer-worker-num 4, no effect of sglang.preprocess_thread:" in advice
    assert "uint8_pixels" not in advice  # on by default, and it applies only where it can
    args = SimpleNamespace(tokenizer_worker_num=2, mm_feature_transport="cpu",
                           **{settings.ATTR: {"plugin": settings.PLUGIN_DEFAULTS}})
    assert settings.preprocessing_advice(args).startswith("mm-coalescer: SGLang runs 2 tokenizer worker(s)")
    args = SimpleNamespace(tokenizer_worker_num=1, mm_feature_transport="cpu", **{settings.ATTR: chosen})
    assert "turn those on first" in settings.preprocessing_advice(args)


@pytest.mark.parametrize(("name", "bad"), [("uint8_pixels", 1), ("fast_mm_token_check", "yes please"),
                                           ("preprocess_thread", 0)])
def test_a_switch_under_sglang_must_be_true_or_false(tmp_path, name, bad):
    path = tmp_path / "c.yaml"
    path.write_text(f"sglang:\n  {name}: {bad}\n")
    with pytest.raises(ValueError, match=rf"sglang\.{name} must be true or false, got {bad!r}"):
        settings.resolve(False, str(path))
    default = settings.PLUGIN_DEFAULTS[name]
    path.write_text(f"sglang:\n  {name}: {str(not default).lower()}\n")
    assert settings.resolve(False, str(path))["plugin"][name] is (not default)


def test_a_tokenizer_torch_threads_count_reaches_the_settings_and_null_keeps_torchs_default(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sglang:\n  tokenizer_torch_threads: 2\n")
    assert settings.resolve(False, str(path))["plugin"]["tokenizer_torch_threads"] == 2
    path.write_text("sglang:\n  tokenizer_torch_threads: null\n")
    assert settings.resolve(False, str(path))["plugin"]["tokenizer_torch_threads"] is None

"""The real-server harness's model families (scripts/gpu_serve/serve.py FAMILIES, build_model.py FAMILIES).

What the harness serves must be buildable offline and name a plugin config the wheel ships; the Gemma 4 dirs must
satisfy what SGLang 0.5.16's Gemma4 classes check when they are built (KV-shared layers need an unshared layer of
their type) and render image/video parts as the placeholders Gemma4Processor and SGLang's processor expand.
No transformers or sglang needed: the builders' checks against those run in verify_cpu.py / instantiate_cpu.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "gpu_serve"))
import build_model
import serve

GEMMA4 = [name for name, spec in build_model.FAMILIES.items() if spec["kind"] == "gemma4"]


@pytest.mark.parametrize("family", sorted(serve.FAMILIES))
def test_each_served_family_is_built_here_and_names_a_shipped_plugin_config(family):
    from mm_scheduler.config import load_config, resolve_config_path, shipped_configs

    assert family in build_model.FAMILIES
    name = serve.FAMILIES[family]["config"]
    assert name in shipped_configs()  # serve.py passes it by name, as an operator does
    load_config(resolve_config_path(name))
    assert serve.FAMILIES[family]["max_total_tokens"] > 8192  # holds a whole --context-length request


def test_gemma4_families_are_served_with_their_tiny_rehearsal():
    assert {"gemma4_e4b", "gemma4_e2b", "gemma4_tiny"} <= set(GEMMA4)
    assert {"gemma4_e4b", "gemma4_e2b"} <= set(serve.FAMILIES)
    assert serve.FAMILIES["gemma4_e4b"]["config"] == "gemma4"


@pytest.mark.parametrize("family", GEMMA4)
def test_gemma4_layer_types_fit_sglangs_kv_sharing(family):
    text = build_model.FAMILIES[family]["text"]
    types, n, shared = text["layer_types"], text["num_hidden_layers"], text["num_kv_shared_layers"]
    assert len(types) == n and types[-1] == "full_attention"  # transformers forces the last layer to full
    unshared = set(types[:n - shared])
    assert set(types[n - shared:]) <= unshared  # gemma4_causal.Gemma4Attention raises otherwise


def test_gemma4_template_renders_sglangs_openai_parts_as_the_processors_placeholders():
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment().from_string(build_model.GEMMA4_CHAT_TEMPLATE)
    # what SGLang's process_content_for_template_format hands the template for content format "openai"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "video"},
                                             {"type": "text", "text": " Describe these. "}]}]
    prompt = template.render(messages=messages, bos_token="<bos>", add_generation_prompt=True)
    assert prompt == "<bos><|turn>user\n<|image|><|image|><|video|>Describe these.<turn|>\n<|turn>model\n"
    special = {token: i for i, token in build_model.GEMMA4_SPECIAL.items()}
    for token in ("<|image|>", "<|video|>", "<|turn>", "<turn|>", "<bos>"):
        assert token in special
    # Gemma4Config's default ids, which the builder's config keeps (and asserts against the tokenizer)
    assert (special["<|image|>"], special["<|image>"], special["<image|>"], special["<|video|>"]) == (
        258880, 255999, 258882, 258884)


def test_more_servers_than_fit_the_gpu_are_refused_before_anything_starts(monkeypatch, capsys):
    """Four Qwen3-VL-8B servers ran out of GPU memory at their first request (eea0358): refuse such a command."""
    monkeypatch.setattr(sys, "argv", ["serve.py", "--family", "qwen3_vl_8b",
                                      "--variants", "off,on,on+defer2s,on+lazy1"])
    monkeypatch.setattr(serve, "install", lambda *_: pytest.fail("refused after starting"))
    with pytest.raises(SystemExit):
        serve.main()
    assert "more than the GPU's 139.8" in capsys.readouterr().err


def test_a_server_that_never_answers_is_stopped_and_its_run_fails_instead_of_hanging_the_command(
        monkeypatch, tmp_path):
    """A Qwen3-VL server with SGLang's tokenizer workers took requests and never answered (c704fd5): the load
    generator waited until the device command was killed and the command's raw files were lost."""
    import socket
    import subprocess
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    silent = ("import socket, time\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
              f"s.bind(('127.0.0.1', {port}))\ns.listen()\nheld = []\nwhile True:\n    held.append(s.accept())\n")
    server = serve.Server("on+x", port, tmp_path / "server-on+x.log")
    server.proc = subprocess.Popen([sys.executable, "-c", silent], start_new_session=True)
    for _ in range(200):  # until it listens
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)

    class LoadGenerator:  # like SGLang's: waits for the server's reply; a closed connection fails the run
        def run(self, argv, log_path):
            try:
                urllib.request.urlopen(f"{server.url}/v1/chat/completions", timeout=60)
            except OSError:
                return 1
            return 0

    monkeypatch.setattr(serve, "LOADGEN", LoadGenerator(), raising=False)
    monkeypatch.setattr(serve, "RUN_TIMEOUT_S", 1.0)
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="no result after 1 s; server stopped"):
            serve.bench(server, tmp_path, ["--num-prompts", "1"], [], tmp_path, "seed0-on+x")
    finally:
        server.stop()
    assert server.proc.poll() is not None and time.monotonic() - started < 40
    assert (tmp_path / "metrics-seed0-on+x.txt").exists()  # what was scraped is kept


# The end of a real server log (sglang 0.5.16, Qwen3-VL-8B, --tokenizer-worker-num 4 --mm-feature-transport cuda_ipc,
# e12f02a): the scheduler died in its first warm-up burst while the HTTP server went on answering /metrics.
DEAD_SCHEDULER_LOG = """\
[2026-12-03 08:18:05] Prefill batch, #new-seq: 2, #new-token: 3044, #cached-token: 14, token usage: 0.09
[2026-12-03 08:18:06] Scheduler hit an exception: Traceback (most recent call last):
  File "/tmp/gpu-serve-site/sglang/srt/managers/mm_utils.py", line 646, in _batch_encode_per_image_misses
    all_miss_embedding = data_embedding_func(miss_items)
                         ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/tmp/gpu-serve-site/sglang/srt/models/qwen3_vl.py", line 1334, in get_image_feature
    pixel_values = torch.cat([item.feature for item in items], dim=0).type(
                   ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
RuntimeError: Expected all tensors to be on the same device, but got tensors is on cuda:0, different from other \
tensors on cpu (when checking argument in method wrapper_CUDA_cat)

[rank0]:[W1203 08:18:15.208680290 ProcessGroupNCCL.cpp:1575] Warning: WARNING: destroy_process_group() was not called
[2026-12-03 08:18:16] INFO:     127.0.0.1:45044 - "GET /metrics HTTP/1.1" 200 OK
"""


def test_the_exception_that_killed_an_sglang_process_is_read_from_its_server_log():
    assert serve.server_failure(DEAD_SCHEDULER_LOG).startswith(
        "Scheduler: RuntimeError: Expected all tensors to be on the same device")
    fatal = "RuntimeError: RMSNorm failed with error code invalid argument\nFatal Python error: Aborted\n"
    assert serve.server_failure(fatal) == "Fatal Python error: Aborted"
    assert serve.server_failure(DEAD_SCHEDULER_LOG.split("[2026-12-03 08:18:06]")[0]) is None  # alive
    tokenizer = "[2026-12-03 08:18:06] TokenizerManager hit an exception: Traceback (most recent call last):\n" \
                '  File "tokenizer_manager.py", line 9, in loop\n    recv()\nzmq.error.ZMQError: Socket closed\n'
    assert serve.server_failure(tokenizer) == "TokenizerManager: zmq.error.ZMQError: Socket closed"
    assert serve.server_failure(DEAD_SCHEDULER_LOG + tokenizer).startswith("Scheduler: RuntimeError")  # the cause


def test_of_a_chained_traceback_the_outer_exception_is_named_whatever_its_class_is_called():
    chained = (
        "[2026-12-03 08:18:06] Scheduler hit an exception: Traceback (most recent call last):\n"
        '  File "scheduler.py", line 1, in run\n    table["x"]\n'
        "KeyError: 'x'\n\nDuring handling of the above exception, another exception occurred:\n\n"
        'Traceback (most recent call last):\n  File "scheduler.py", line 3, in run\n    compile()\n'
        "triton.runtime.errors.OutOfResources: out of resource: shared memory\n\n"
        "[rank0]:[W1203 08:18:15] Warning: destroy_process_group() was not called\n")
    assert serve.server_failure(chained) == \
        "Scheduler: triton.runtime.errors.OutOfResources: out of resource: shared memory"


def _watched(monkeypatch, loadgen) -> list[str]:
    """serve.bench with ``loadgen`` as SGLang's load generator, no scrape, a 50 ms watch interval and a 60 s run
    limit; returns the variants whose server was stopped, in order."""
    calls: list[str] = []
    monkeypatch.setattr(serve.Server, "stop", lambda self: calls.append(self.variant))
    monkeypatch.setattr(serve, "LOADGEN", loadgen, raising=False)
    monkeypatch.setattr(serve, "RUN_TIMEOUT_S", 60.0)
    monkeypatch.setattr(serve, "WATCH_INTERVAL_S", 0.05)
    monkeypatch.setattr(serve, "MetricsScraper", lambda server: type("S", (), {
        "start": lambda self: None, "finish": lambda self: ("", ""), "samples": []})())
    return calls


def test_a_server_whose_scheduler_dies_is_stopped_at_once_with_the_cause(monkeypatch, tmp_path):
    """The HTTP server outlives a dead scheduler, so without this the run waited out RUN_TIMEOUT_S (150 s of
    device time) and reported only that nothing came back."""
    import time

    server = serve.Server("off+x", 1, tmp_path / "server-off+x.log")
    server.log_path.write_text("[2026-12-03 08:17:36] The server is fired up and ready to roll!\n")

    class LoadGenerator:  # the burst's requests go in; the scheduler dies; nothing answers until the stop
        def run(self, argv, log_path):
            with server.log_path.open("a") as f:
                f.write(DEAD_SCHEDULER_LOG)
            stopped = time.monotonic() + 30
            while time.monotonic() < stopped and not calls:
                time.sleep(0.05)
            return 1

    calls = _watched(monkeypatch, LoadGenerator())
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="process died: Scheduler: RuntimeError: Expected all tensors to be on the"):
        serve.bench(server, tmp_path, ["--num-prompts", "1"], [], tmp_path, "warm-off+x")
    assert calls == ["off+x"] and time.monotonic() - started < 20


def test_a_scheduler_failure_logged_before_the_run_does_not_stop_the_server_during_it(monkeypatch, tmp_path):
    """Only what the log gains during a run counts: a failure text from before (another run's, or a restarted
    server's) must not stop a server that is answering."""
    import time

    server = serve.Server("off+x", 1, tmp_path / "server-off+x.log")
    server.log_path.write_text(DEAD_SCHEDULER_LOG)

    class LoadGenerator:  # answers after several watch intervals
        def run(self, argv, log_path):
            time.sleep(0.5)
            return 1

    calls = _watched(monkeypatch, LoadGenerator())
    with pytest.raises(RuntimeError, match="load generator exit 1"):
        serve.bench(server, tmp_path, ["--num-prompts", "1"], [], tmp_path, "seed0-off+x")
    assert calls == []


def test_a_run_records_when_its_requests_arrived_and_how_long_the_server_drained_after_the_last(monkeypatch,
                                                                                              tmp_path):
    """From SGLang's own per-request export, only the records of this run's window (the file also holds earlier
    runs'): the load generator's pace can stretch the arrivals, so the summary judges tok/s only at equal spans."""
    import json
    import time

    server = serve.Server("on", 1, tmp_path / "server-on.log")
    server.log_path.write_text("")
    export = tmp_path / "requests-on"
    export.mkdir()

    class LoadGenerator:  # three requests over 2 s, the last finished 0.7 s after it arrived; one line per run
        def run(self, argv, log_path):
            now = time.time()
            lines = [{"request_received_ts": now - 100.0, "request_finished_ts": now - 99.0}]  # an earlier run's
            lines += [{"request_received_ts": now + t, "request_finished_ts": now + t + d}
                      for t, d in ((0.0, 0.3), (1.0, 0.5), (2.0, 0.7))]
            (export / "sglang-request-metrics.log").write_text("".join(json.dumps(x) + "\n" for x in lines))
            time.sleep(2.8)  # the run's window covers the arrivals and the finish
            (tmp_path / "bench-poisson0.5-on.jsonl").write_text(json.dumps({"duration": 2.8, "completed": 3,
                                                                            "median_ttft_ms": 100.0,
                                                                            "p99_ttft_ms": 120.0,
                                                                            "p99_itl_ms": 20.0,
                                                                            "total_throughput": 10.0}) + "\n")
            return 0

    _watched(monkeypatch, LoadGenerator())
    kept = serve.bench(server, tmp_path, ["--num-prompts", "3"], [], tmp_path, "poisson0.5-on")
    assert kept["arrivals_s"] == pytest.approx(2.0, abs=0.01) and kept["drain_s"] == pytest.approx(0.7, abs=0.01)


def test_a_server_whose_scheduler_died_is_not_asked_for_greedy_replies(monkeypatch, tmp_path):
    """Each correctness request waits up to 120 s; 21 of them against a dead scheduler outlast a device command."""
    server = serve.Server("off+x", 1, tmp_path / "server-off+x.log")
    server.log_path.write_text(DEAD_SCHEDULER_LOG)
    monkeypatch.setattr(serve, "http", lambda *a, **k: pytest.fail("a dead server was sent a request"))
    reply = serve.greedy_reply(server, tmp_path, [{"type": "text", "text": "hi"}])
    assert reply.startswith("process died: Scheduler: RuntimeError: Expected all tensors")


def test_an_unreadable_greedy_reply_is_recorded_not_raised(monkeypatch, tmp_path):
    """A raise would surface only after every other server finished its requests (up to 21 x 120 s each)."""
    server = serve.Server("on", 1, tmp_path / "server-on.log")
    monkeypatch.setattr(serve, "http", lambda *a, **k: (200, '{"choices": []}'))
    assert serve.greedy_reply(server, tmp_path, [{"type": "text", "text": "hi"}]).startswith("unreadable reply")


def test_servers_give_greedy_replies_side_by_side_each_one_request_at_a_time(monkeypatch, tmp_path):
    """Sequentially, four servers' correctness took 131 s of a device command with a 430 s budget (e5bb1ae)."""
    import threading

    servers = {v: serve.Server(v, i, tmp_path / f"server-{v}.log") for i, v in enumerate(["off", "on", "on+queue4m"])}
    all_asked = threading.Barrier(len(servers), timeout=10)  # broken unless every server is asked at once
    busy: set[str] = set()
    monkeypatch.setattr(serve, "png_b64", lambda size, seed: f"png{seed}")

    def greedy_reply(server, model, content):
        assert server.variant not in busy  # one request at a time per server
        busy.add(server.variant)
        all_asked.wait()
        busy.discard(server.variant)
        picture = content[0]["image_url"]["url"]
        return picture if server.variant != "on+queue4m" or picture != "png2000" else "something else"

    monkeypatch.setattr(serve, "greedy_reply", greedy_reply)
    result = serve.correctness(servers, tmp_path, 4, video=False)
    assert [r["replies"]["off"] for r in result["replies"]] == ["png0", "png1000", "png2000", "png3000"]
    assert [r["identical"] for r in result["replies"]] == [True, True, False, True]
    assert (result["identical"], result["all_identical"]) == (3, False)


@pytest.mark.parametrize("variant", sorted(v for v in serve.VARIANTS if serve.VARIANTS[v].config))
def test_each_plugin_setting_variant_is_a_config_the_plugin_accepts_for_every_family(variant, tmp_path):
    """A misspelt setting would stop that server on the GPU, minutes into a device command; here it fails on CPU."""
    from mm_scheduler_sglang.settings import check_config_file

    for family, spec in serve.FAMILIES.items():
        path = serve.merged_config(spec["config"], serve.VARIANTS[variant].config, tmp_path / f"{family}.yaml")
        checked = check_config_file(str(path))
        changes = dict(serve.VARIANTS[variant].config)
        for key, value in changes.pop("sglang", {}).items():
            assert checked["plugin"][key] == value
        for key, value in changes.items():
            assert checked["values"][key] == value



def test_a_paced_run_gets_its_arrival_time_on_top_of_the_run_timeout(monkeypatch):
    monkeypatch.setattr(serve, "RUN_TIMEOUT_S", 150.0)
    assert serve.run_timeout(["--num-prompts", "100", "--request-rate", "inf"]) == 150.0  # a burst
    assert serve.run_timeout([*serve.POISSON_WORKLOAD, "--num-prompts", "30", "--request-rate", "0.5"]) == 210.0


def test_the_progress_log_is_also_written_into_the_returned_folder(monkeypatch, tmp_path, capsys):
    """A device command killed at its limit returns only what is under --out: the log must be there too."""
    monkeypatch.setattr(serve, "LOG_COPY", tmp_path / "serve.log")
    serve.log("seed0-on: 100 done")
    serve.log("done")
    lines = (tmp_path / "serve.log").read_text().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == ["seed0-on: 100 done", "done"]
    assert capsys.readouterr().out.count("[gpu-serve +") == 2


def test_the_lead_gauges_are_traced_once_a_scrape_summed_over_their_labels():
    scrape = ('mm_coalescer_held_bytes{{coalescer="q",pid="1"}} {held}\n'
              'mm_coalescer_held_bytes{{coalescer="q",pid="2"}} 5.0\n'
              'mm_coalescer_deferred_items{{coalescer="q",pid="1"}} {deferred}\n'
              'mm_coalescer_queue_patches{{coalescer="q",pid="1"}} 900.0\n'
              'mm_coalescer_held_bytes_other 7.0\n')
    samples = [(100.0, scrape.format(held=10.0, deferred=3.0)), (101.5, scrape.format(held=20.0, deferred=0.0))]
    assert serve.gauge_trace(samples) == [[0.0, 900.0, 15.0, 3.0], [1.5, 900.0, 25.0, 0.0]]
    assert serve.gauge_trace([(100.0, "sglang:num_running_reqs 1.0\n")]) == []  # plugin off: nothing to trace


def test_three_qwen3_servers_with_cuda_ipc_tokenizer_workers_are_refused_before_they_run_out_of_memory():
    # 2279e05: off+tok4ipc+backport, on+tok4ipc and on+tok4ipc+enqueued (12 workers) ran out of memory mid-seed
    reason = serve.exceeds_the_gpu("qwen3_vl_8b", ["off+tok4ipc+backport", "on+tok4ipc", "on+tok4ipc+enqueued"])
    assert reason is not None and "12 CUDA-IPC tokenizer workers" in reason
    # 643572e ran two such servers beside plain off, and eea0358's fourth server did not fit
    assert serve.exceeds_the_gpu("qwen3_vl_8b", ["off", "off+tok4ipc+backport", "on+tok4ipc"]) is None
    assert serve.exceeds_the_gpu("qwen3_vl_8b", ["off", "on", "on+graphs", "on+defer2s"]) is not None


def test_tokenizer_workers_added_to_every_server_count_against_the_gpu(monkeypatch):
    assert serve.exceeds_the_gpu("qwen3_vl_8b", ["off", "on", "on+graphs"]) is None
    monkeypatch.setattr(serve, "EXTRA_FLAGS", list(serve.TOK4IPC))
    reason = serve.exceeds_the_gpu("qwen3_vl_8b", ["off", "on", "on+graphs"])
    assert reason is not None and "12 CUDA-IPC tokenizer workers" in reason


def test_a_fourth_gemma3_server_is_refused_before_it_starts():
    # 351b609: the fourth Gemma3-12B server (on+g3graphs+lazy1) found no memory left for its KV cache
    reason = serve.exceeds_the_gpu("gemma3_12b", ["off", "on", "on+g3graphs", "on+g3graphs+lazy1"])
    assert reason is not None and "4 servers" in reason
    assert serve.exceeds_the_gpu("gemma3_12b", ["off", "on", "on+g3graphs"]) is None


def test_four_gemma4_servers_with_eight_cuda_ipc_tokenizer_workers_are_refused():
    # 9ca7bdd: off, off+freeenc, on+tok4ipc and off+tok4ipc+freeenc ran out of GPU memory in a tokenizer worker's
    # GPU processor mid-seed (7 of 100 requests failed); four plain servers have always fit
    reason = serve.exceeds_the_gpu("gemma4_e4b", ["off", "off+freeenc", "on+tok4ipc", "off+tok4ipc+freeenc"])
    assert reason is not None and "8 CUDA-IPC tokenizer workers" in reason
    assert serve.exceeds_the_gpu("gemma4_e4b", ["off", "on", "off+freeenc", "on+prio0"]) is None


@pytest.mark.parametrize("family", sorted(serve.FAMILIES))
def test_every_family_fits_off_and_on_with_and_without_sglangs_flags(family):
    most = 3 if family in ("qwen3_vl_8b", "gemma3_12b", "gemma4_e4b") else 4
    assert serve.exceeds_the_gpu(family, ["off", "on", "off+tok4ipc", "on+tok4ipc"][:most]) is None


def test_extra_flags_reach_every_server_plugin_on_and_off(monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(serve, "EXTRA_FLAGS", ["--sleep-on-idle"])
    monkeypatch.setattr(serve.subprocess, "Popen", lambda args, **kwargs: started.append(args))
    for variant in ("off", "on"):
        serve.Server(variant, 30000, tmp_path / f"server-{variant}.log").start(
            tmp_path / "model", "qwen2_5_vl_7b", tmp_path, tmp_path / f"requests-{variant}")
    assert [args.count("--sleep-on-idle") for args in started] == [1, 1]
    assert "--enable-mm-coalescer" in started[1] and "--enable-mm-coalescer" not in started[0]


def test_a_servers_cpu_seconds_are_read_per_process_under_its_launcher_and_differenced_per_run():
    import subprocess
    import sys
    import time

    burner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 0.4\n"
                               "while time.process_time() < end: pass\ntime.sleep(30)"], start_new_session=True)
    try:
        idle = {"off": {}}
        for _ in range(100):  # until it has burnt its 0.4 s
            used = serve.process_cpu_seconds(burner.pid)
            if sum(used.values()) >= 0.35:
                break
            time.sleep(0.05)
        assert sum(used.values()) >= 0.35 and all(name.startswith("python") for name in used)
        assert serve.process_cpu_seconds(2**22 + 7) == {}  # no such process
        during = serve.cpu_during({"on": {name: 0.1 for name in used}, **idle}, {"on": used, **idle})
        assert sum(during["on"].values()) == pytest.approx(sum(used.values()) - 0.1 * len(used), abs=0.02)
        assert during["off"] == {}
    finally:
        burner.kill()
        burner.wait()


def _poisson_only_run(monkeypatch, tmp_path, capacity: str | None):
    """run_family on Gemma3-12B, Poisson at 80 % only, servers and the load generator stubbed (each run's plugin-off
    throughput reads 9.9 req/s): the runs it made, the requests it built, and its result."""
    import time

    runs: list[tuple[str, list[str]]] = []
    primed: list[list[str]] = []
    if capacity is None:
        monkeypatch.delenv("GPU_SERVE_CAPACITY", raising=False)
    else:
        monkeypatch.setenv("GPU_SERVE_CAPACITY", capacity)
    monkeypatch.setenv("GPU_SERVE_LOADS", "0.8")
    monkeypatch.setenv("GPU_SERVE_POISSON_S", "18")
    monkeypatch.setattr(serve.Server, "start", lambda self, *args: None)
    monkeypatch.setattr(serve.Server, "wait_healthy", lambda self, timeout: None)
    monkeypatch.setattr(serve.Server, "stop", lambda self: None)
    monkeypatch.setattr(serve, "prime_all", lambda model, workloads, out: primed.extend(workloads))
    monkeypatch.setattr(serve, "prime_pool", lambda model, workload, out, tag: runs.append((f"prime-{tag}", workload)))

    def bench(server, model, workload, extra, out, tag):
        runs.append((tag, workload))
        return {"request_throughput": 9.9, "duration": 1.0}

    monkeypatch.setattr(serve, "bench", bench)
    result = serve.run_family("gemma3_12b", tmp_path, ["poisson"], ["off", "on"], range(1), tmp_path,
                              time.monotonic() + 1000, tmp_path)
    paced = {tag: w[w.index("--request-rate") + 1] for tag, w in runs if tag.startswith("poisson")}
    return runs, primed, paced, result


def test_a_given_capacity_skips_the_capacity_run_and_paces_the_poisson_loads_from_it(monkeypatch, tmp_path):
    """A Gemma3-12B capacity run took 68 s of a command's budget at 2729c81, and Poisson then did not fit."""
    runs, primed, paced, result = _poisson_only_run(monkeypatch, tmp_path, "2.0")
    assert not any(tag.startswith("capacity") for tag, _ in runs)
    assert not any("300" in w and "inf" in w for w in primed)  # the capacity run's requests are not even built
    assert paced == {"poisson0.8-off": "1.600", "poisson0.8-on": "1.600"}
    assert (result["capacity_req_s"], result["capacity_source"]) == (2.0, "GPU_SERVE_CAPACITY")
    pool = next(w for w in primed if "400" in w)  # built while the servers start, as large as the runs: 1.6 x 18 s
    assert pool[pool.index("--num-prompts") + 1] == "30"  # 28.8 requests, at least 30


def test_every_poisson_run_of_a_load_gets_requests_built_before_either_servers_run(monkeypatch, tmp_path):
    """660b520's Qwen2.5-VL pools held 104 requests at 80 %, its runs took 128: the first server's run rebuilt them
    inside its timing and its arrivals took 21.8 s against the second's 18.2. Pools are now sized for the runs, and
    each load's requests are built (a no-op when the pool holds them) before the first server's run."""
    runs, primed, _, _ = _poisson_only_run(monkeypatch, tmp_path, None)
    runs = [(tag, w) for tag, w in runs if not tag.startswith("warm")]
    assert [tag for tag, _ in runs] == ["capacity-off", "prime-poisson0.8", "poisson0.8-off", "poisson0.8-on"]
    assert runs[1][1] == runs[2][1] == runs[3][1]  # the very requests both servers then get
    pool = next(w for w in primed if "400" in w)  # no capacity given: built for 14 req/s, 0.8 x 14 x 18 s
    assert pool[pool.index("--num-prompts") + 1] == "200"  # 201.6, at most POISSON_MAX
    n = runs[2][1][runs[2][1].index("--num-prompts") + 1]
    assert int(n) == int(0.8 * 9.9 * 18) <= int(pool[pool.index("--num-prompts") + 1])


def test_poisson_runs_take_the_seconds_asked_within_their_bounds(monkeypatch):
    monkeypatch.setenv("GPU_SERVE_POISSON_S", "18")
    assert serve.poisson_requests(7.125) == 128
    assert serve.poisson_requests(0.5) == 30 and serve.poisson_requests(50.0) == serve.POISSON_MAX
    monkeypatch.delenv("GPU_SERVE_POISSON_S")
    assert serve.poisson_requests(5.0) == 60  # 12 s unless set
    assert serve.pool_workload(0.5, 0, 8.9)[-4:] == ["--num-prompts", "53", "--seed", "400"]


def test_without_a_given_capacity_plugin_off_is_measured_first_and_paces_the_loads(monkeypatch, tmp_path):
    runs, primed, paced, result = _poisson_only_run(monkeypatch, tmp_path, None)
    assert [tag for tag, _ in runs if tag.startswith("capacity")] == ["capacity-off"]
    assert any("300" in w and "inf" in w for w in primed)
    assert paced == {"poisson0.8-off": "7.920", "poisson0.8-on": "7.920"}
    assert (result["capacity_req_s"], result["capacity_source"]) == (9.9, "capacity-off")


@pytest.mark.parametrize("text", ["abc", "0", "-1", "inf", "nan"])
def test_a_capacity_that_is_not_a_positive_rate_is_refused_before_anything_starts(monkeypatch, capsys, text):
    monkeypatch.setenv("GPU_SERVE_CAPACITY", text)
    monkeypatch.setattr(sys, "argv", ["serve.py", "--family", "gemma3_12b", "--workloads", "poisson"])
    monkeypatch.setattr(serve, "install", lambda prepared: pytest.fail("started despite a bad capacity"))
    with pytest.raises(SystemExit):
        serve.main()
    assert "GPU_SERVE_CAPACITY" in capsys.readouterr().err


def test_without_an_unpacked_or_carried_sglang_kernel_the_command_stops_at_once_saying_which(monkeypatch, tmp_path):
    """A command that leaves .gpu-serve-pack behind relies on a warm machine's unpacked copy (NOTES.md)."""
    import subprocess

    monkeypatch.setattr(serve, "REPO", tmp_path)
    prepared = tmp_path / ".gpu-serve"
    (prepared / "whl").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"no sglang-kernel .* carry \.gpu-serve-pack"):
        serve.install(prepared)
    pack_dir = tmp_path / ".gpu-serve-pack"
    pack_dir.mkdir()
    (tmp_path / "other").mkdir()
    subprocess.run(["tar", "-cJf", str(pack_dir / "sk.txz"), "-C", str(tmp_path), "other"], check=True)
    with pytest.raises(SystemExit, match="holds no sk/ folder"):
        serve.install(prepared)


def _servers_stubbed(monkeypatch) -> list[str]:
    """Servers that start at once and runs that take no time: the tags run_family runs, in order."""
    monkeypatch.setattr(serve.Server, "start", lambda self, *args: None)
    monkeypatch.setattr(serve.Server, "wait_healthy", lambda self, timeout: None)
    monkeypatch.setattr(serve.Server, "stop", lambda self: None)
    monkeypatch.setattr(serve, "prime_all", lambda model, workloads, out: None)
    monkeypatch.setattr(serve, "prime_pool", lambda model, workload, out, tag: None)
    ran: list[str] = []
    monkeypatch.setattr(serve, "bench", lambda server, model, workload, extra, out, tag: ran.append(tag) or {})
    return ran


def _bench_failing(monkeypatch, failing: str, requested: int, failure: str) -> list[str]:
    """Servers stubbed and runs whose ``requested`` requests all complete, except the run whose tag starts with
    ``failing``: it carries ``failure`` ("N of M requests failed: ..."), as serve.bench attaches it. The tags run."""
    ran = _servers_stubbed(monkeypatch)

    def bench(server, model, workload, extra, out, tag):
        ran.append(tag)
        run = {"duration": 1.0, "request_throughput": 9.0, "completed": requested, "requested": requested}
        if tag.startswith(failing):
            run.update(completed=requested - int(failure.split()[0]), failure=failure)
        return run

    monkeypatch.setattr(serve, "bench", bench)
    return ran


def test_a_poisson_load_whose_runs_would_outlast_the_deadline_with_their_drain_is_skipped(monkeypatch, tmp_path):
    """Gemma3-12B at 80 % of 2.0 req/s: 30 requests arrive over 18.75 s, and each run took 36-40 s of wall time
    (86aa9fc). Two servers need ~78 s; with 60 s left the load is skipped (arrivals + 5 s a run would have started it,
    and the command ran past the device's limit)."""
    import time

    monkeypatch.setenv("GPU_SERVE_CAPACITY", "2.0")
    monkeypatch.setenv("GPU_SERVE_LOADS", "0.8")
    monkeypatch.setenv("GPU_SERVE_POISSON_S", "18")
    ran = _servers_stubbed(monkeypatch)
    for left, expected in ((60.0, []), (90.0, ["poisson0.8-off", "poisson0.8-on"])):
        ran.clear()
        serve.run_family("gemma3_12b", tmp_path, ["poisson"], ["off", "on"], range(1), tmp_path,
                         time.monotonic() + left, tmp_path)
        assert [tag for tag in ran if tag.startswith("poisson")] == expected


def test_the_last_run_must_end_early_enough_for_every_server_to_stop_and_the_files_to_be_packed():
    """Three Gemma3-12B servers' teardown passed 31 s; four Gemma 4 servers' took 46 s (86aa9fc)."""
    assert serve.command_deadline(100.0, 560.0, 3) < 100.0 + 560.0 - 31.0
    assert serve.teardown_reserve(4) >= 46.0
    assert serve.teardown_reserve(3) > 31.0
    assert serve.teardown_reserve(4) > serve.teardown_reserve(3)


def _wheel(path, members: dict[str, bytes]):
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_packed_wheels_come_back_stored_with_the_same_members_and_bytes(tmp_path):
    """xz over uncompressed wheels is what fits the carry (41.1 MB of wheels in 20.8); pip checks RECORD's hashes
    of the files, so the members' bytes must be exactly the wheel's, and their modes too (py-spy's binary)."""
    import zipfile

    import pack

    members = {"pkg/__init__.py": b"x = 1\n" * 500, "pkg-1.0.data/scripts/tool": b"\x7fELF",
               "pkg-1.0.dist-info/RECORD": b"pkg/__init__.py,,\n"}
    (tmp_path / "whl").mkdir()
    wheel = _wheel(tmp_path / "whl" / "pkg-1.0-py3-none-any.whl", members)
    with zipfile.ZipFile(wheel, "a") as z:  # an executable member, as py-spy's wheel has
        info = zipfile.ZipInfo("pkg-1.0.data/scripts/tool-exec", date_time=(2024, 5, 6, 7, 8, 10))
        info.external_attr = 0o100755 << 16
        z.writestr(info, b"#!/bin/sh\n")
    members["pkg-1.0.data/scripts/tool-exec"] = b"#!/bin/sh\n"
    archive = pack.pack_wheels(tmp_path / "whl", tmp_path / "whl.txz")
    out = tmp_path / "machine"
    out.mkdir()
    pack.unpack(archive, out, "whl")
    with zipfile.ZipFile(out / "whl" / "pkg-1.0-py3-none-any.whl") as z:
        assert {i.filename: z.read(i) for i in z.infolist()} == members
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
        executable = z.getinfo("pkg-1.0.data/scripts/tool-exec")
        assert (executable.external_attr >> 16, executable.date_time) == (0o100755, (2024, 5, 6, 7, 8, 10))


def test_a_carried_wheel_pack_replaces_the_wheels_a_warm_machine_kept(monkeypatch, tmp_path):
    import pack

    monkeypatch.setattr(serve, "REPO", tmp_path)
    monkeypatch.setattr(serve, "SITE", tmp_path / "site")
    installed: list[list[str]] = []

    def run(cmd, check=False, **kwargs):
        if "install" in cmd and "--target" in cmd and str(tmp_path / "site") in cmd:
            installed.append(sorted(Path(a).name for a in cmd if a.endswith(".whl")))
            (tmp_path / "site").mkdir(exist_ok=True)
            return None
        raise RuntimeError("stop after the closure is installed")

    monkeypatch.setattr(serve.subprocess, "run", run)
    prepared = tmp_path / ".gpu-serve"
    (prepared / "sk").mkdir(parents=True)
    (prepared / "whl").mkdir()
    _wheel(prepared / "whl" / "old-1.0-py3-none-any.whl", {"old.py": b""})  # left by an earlier command
    carried = tmp_path / "carried"
    carried.mkdir()
    _wheel(carried / "new-2.0-py3-none-any.whl", {"new.py": b""})
    (tmp_path / ".gpu-serve-pack").mkdir()
    pack.pack_wheels(carried, tmp_path / ".gpu-serve-pack" / "whl.txz")
    with pytest.raises(RuntimeError, match="stop after"):
        serve.install(prepared)
    assert installed == [["new-2.0-py3-none-any.whl"]]


def test_without_time_for_the_capacity_run_no_poisson_load_starts(monkeypatch, tmp_path):
    """A Gemma3-12B capacity run took 68 s: with less than that left it would run into the teardown's reserve."""
    import time

    monkeypatch.delenv("GPU_SERVE_CAPACITY", raising=False)
    monkeypatch.setenv("GPU_SERVE_LOADS", "0.8")
    ran = _servers_stubbed(monkeypatch)
    result = serve.run_family("gemma3_12b", tmp_path, ["poisson"], ["off", "on"], range(1), tmp_path,
                              time.monotonic() + serve.CAPACITY_RUN_S - 10, tmp_path)
    assert ran == ["warm-off", "warm-on"] and "capacity_req_s" not in result


def test_a_carried_kernel_pack_replaces_a_kernel_unpacked_from_another_pack_and_a_bad_pack_keeps_the_old_one(
        monkeypatch, tmp_path):
    import subprocess

    import pack

    monkeypatch.setattr(serve, "REPO", tmp_path)
    monkeypatch.setattr(serve, "SITE", tmp_path / "site")

    def run(cmd, check=False, **kwargs):
        raise RuntimeError("stop after the kernel")

    prepared = tmp_path / ".gpu-serve"
    (prepared / "whl").mkdir(parents=True)
    (prepared / "sk").mkdir()
    (prepared / "sk" / "old.so").write_bytes(b"old")  # a warm machine's kernel from an earlier pack
    (tmp_path / ".gpu-serve-pack").mkdir()
    (tmp_path / "new" / "sk").mkdir(parents=True)
    (tmp_path / "new" / "sk" / "new.so").write_bytes(b"new")
    pack.pack_kernel(tmp_path / "new" / "sk", tmp_path / ".gpu-serve-pack" / "sk.txz")
    monkeypatch.setattr(serve.subprocess, "run", run)
    with pytest.raises(SystemExit, match="no wheels"):
        serve.install(prepared)
    assert sorted(p.name for p in (prepared / "sk").iterdir()) == ["new.so"]
    (tmp_path / "other").mkdir()
    subprocess.check_call(["tar", "-cJf", str(tmp_path / ".gpu-serve-pack" / "sk.txz"), "-C", str(tmp_path), "other"],
                          env={"PATH": "/usr/bin:/bin"})
    with pytest.raises(SystemExit, match="holds no sk/ folder"):
        serve.install(prepared)
    assert sorted(p.name for p in (prepared / "sk").iterdir()) == ["new.so"]  # not deleted before the check


# 9ca7bdd, server-on+tok4ipc.log: a tokenizer worker's GPU processor ran out of memory (the message shortened)
OOM_LOG = ("[2026-12-04 20:02:57] INFO:     127.0.0.1:54080 - \"GET /metrics HTTP/1.1\" 200 OK\n"
           "Error in request: CUDA out of memory. Tried to allocate 46.00 MiB. GPU 0 has a total capacity of "
           "139.80 GiB of which 44.00 MiB is free.\nTraceback (most recent call last):\n"
           "Error in request: CUDA out of memory. Tried to allocate 46.00 MiB (a second one)\n")


def test_a_run_with_fewer_completed_requests_than_sent_fails_with_the_servers_first_request_error():
    failure = serve.shortfall({"completed": 93, "requested": 100}, OOM_LOG)
    assert failure is not None and failure.startswith("7 of 100 requests failed: CUDA out of memory.")
    assert "a second one" not in failure
    assert serve.shortfall({"completed": 93, "requested": 100}, "") == \
        "7 of 100 requests failed (no request error in the server log)"
    assert serve.shortfall({"completed": 100, "requested": 100}, OOM_LOG) is None


def test_a_run_with_failed_requests_is_recorded_as_failed_and_never_compared_while_the_server_keeps_serving(
        monkeypatch, tmp_path):
    """The load generator leaves failed requests out of its latencies: 93 completed of 100 read as a faster run
    (seed15-on+tok4ipc at 9ca7bdd, 0.37x of off). Such a run goes to failed_runs, even for plugin-on, and the same
    server still runs the next repetition."""
    import time

    ran = _bench_failing(monkeypatch, "seed0-on", 100, "7 of 100 requests failed: CUDA out of memory")
    result = serve.run_family("gemma4_e4b", tmp_path, ["seed"], ["off", "on"], range(2), tmp_path,
                              time.monotonic() + 1000, tmp_path)
    assert result["failed_runs"] == {"seed0-on": "7 of 100 requests failed: CUDA out of memory"}
    assert "seed0-on" not in result["runs"] and result["incomplete_runs"]["seed0-on"]["completed"] == 93
    assert {"seed0-off", "seed1-on", "seed1-off"} <= set(result["runs"])
    assert ran.count("seed1-on") == 1


def test_the_sdpa_variants_replace_the_harness_triton_vision_attention_for_plugin_on_off_and_the_floor(
        monkeypatch, tmp_path):
    """COMMON_FLAGS pick triton_attn; SGLang's argparse keeps the last value, so the variant's flag must come after.
    on+mmsdpa+eager is on+mmsdpa with the shipped config's graphs turned off, and nothing else changed."""
    started = []
    monkeypatch.setattr(serve.subprocess, "Popen", lambda args, **kwargs: started.append(args))
    for variant in ("off+mmsdpa", "on+mmsdpa", "off+mmsdpa+freeenc", "on", "on+mmsdpa+eager"):
        serve.Server(variant, 30000, tmp_path / f"server-{variant}.log").start(
            tmp_path / "model", "gemma3_12b", tmp_path, tmp_path / f"requests-{variant}")
    last = [args[len(args) - 1 - args[::-1].index("--mm-attention-backend") + 1] for args in started]
    assert last == ["sdpa", "sdpa", "sdpa", "triton_attn", "sdpa"]
    eager = yaml.safe_load(Path(started[-1][started[-1].index("--mm-coalescer-config") + 1]).read_text())
    shipped = yaml.safe_load((serve.REPO / "mm_scheduler" / "configs" / "gemma3.yaml").read_text())
    assert shipped["sglang"]["vit_graph_patches"] and eager["sglang"].pop("vit_graph_patches") == []
    shipped["sglang"].pop("vit_graph_patches")
    assert eager == shipped
    assert serve.exceeds_the_gpu("gemma3_12b", ["off+mmsdpa", "on+mmsdpa", "off+mmsdpa+freeenc"]) is None


def test_each_servers_greedy_replies_are_compared_with_the_plugin_off_server_of_its_own_flags():
    """Another vision attention kernel may change the replies, so on+mmsdpa answers to off+mmsdpa; a free encoder
    answers from zeros and is not compared at all (9ca7bdd's planned command has no plain off)."""
    assert serve.reply_baselines(["off+mmsdpa", "on+mmsdpa", "off+mmsdpa+freeenc"]) == \
        {"off+mmsdpa": "off+mmsdpa", "on+mmsdpa": "off+mmsdpa"}
    assert serve.reply_baselines(["off", "on", "off+tok4ipc", "on+tok4ipc", "off+freeenc"]) == \
        {"off": "off", "on": "off", "off+tok4ipc": "off", "on+tok4ipc": "off+tok4ipc"}
    assert serve.reply_baselines(["off", "on+queue4m"]) == {"off": "off", "on+queue4m": "off"}
    assert serve.capacity_baseline(["off+mmsdpa+freeenc", "on+mmsdpa", "off+mmsdpa"]) == "off+mmsdpa"
    assert serve.capacity_baseline(["on", "off+tok4ipc", "off"]) == "off"


def test_correctness_and_poisson_without_a_plugin_off_server_that_encodes_are_refused_before_anything_starts(
        monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["serve.py", "--family", "gemma3_12b", "--variants", "on,off+freeenc",
                                      "--workloads", "correct,seed"])
    monkeypatch.setattr(serve, "install", lambda prepared: pytest.fail("started without a baseline"))
    with pytest.raises(SystemExit):
        serve.main()
    assert "plugin-off server that runs its encoder" in capsys.readouterr().err


def test_a_capacity_run_with_failed_requests_paces_no_poisson_load(monkeypatch, tmp_path):
    import time

    monkeypatch.delenv("GPU_SERVE_CAPACITY", raising=False)
    monkeypatch.setenv("GPU_SERVE_LOADS", "0.5")
    ran = _bench_failing(monkeypatch, "capacity", 120, "20 of 120 requests failed: CUDA out of memory")
    result = serve.run_family("gemma4_e4b", tmp_path, ["poisson"], ["off", "on"], range(1), tmp_path,
                              time.monotonic() + 1000, tmp_path)
    assert result["failed_runs"] == {"capacity-off": "20 of 120 requests failed: CUDA out of memory"}
    assert "capacity_req_s" not in result and not any(tag.startswith("poisson") for tag in ran)


def test_a_smaller_kv_pool_lets_two_qwen3_servers_fit_an_h100_and_reaches_every_server(monkeypatch, tmp_path):
    monkeypatch.setattr(serve, "gpu_gib", lambda: 79.6)  # an 80 GB H100
    assert serve.exceeds_the_gpu("qwen3_vl_8b", ["off", "on"]) is not None  # 2 x 42.5 GiB
    monkeypatch.setenv("GPU_SERVE_MAX_TOTAL_TOKENS", "100000")
    assert serve.exceeds_the_gpu("qwen3_vl_8b", ["off", "on"]) is None  # 2 x 35.6 GiB
    assert "35.6 GiB each" in serve.exceeds_the_gpu("qwen3_vl_8b", ["off", "on", "on+prethread"])
    started = []
    monkeypatch.setattr(serve.subprocess, "Popen", lambda args, **kwargs: started.append(args))
    serve.Server("off", 30000, tmp_path / "server-off.log").start(tmp_path / "model", "qwen3_vl_8b", tmp_path,
                                                                   tmp_path / "requests-off")
    assert started[0][started[0].index("--max-total-tokens") + 1] == "100000"
    assert serve.kv_tokens("qwen2_5_vl_7b") == 100000  # its KV bytes a token are recorded too
    monkeypatch.setenv("GPU_SERVE_MAX_TOTAL_TOKENS", "20000")
    assert serve.exceeds_the_gpu("gemma3_12b", ["off", "on"]) is None  # 2 x 32.7 GiB
    assert "32.7 GiB each" in serve.exceeds_the_gpu("gemma3_12b", ["off", "on", "on+prethread"])
    with pytest.raises(ValueError, match="KV bytes a token"):
        serve.kv_tokens("gemma4_e2b")
    for bad in ("100k", "-5", "0"):
        monkeypatch.setenv("GPU_SERVE_MAX_TOTAL_TOKENS", bad)
        with pytest.raises(ValueError, match="a whole number > 0"):
            serve.kv_tokens("qwen3_vl_8b")


def test_a_run_records_the_config_each_plugin_server_ran_and_none_for_plugin_off(monkeypatch):
    import summarize

    monkeypatch.delenv("GPU_SERVE_CONFIG", raising=False)
    header = serve.results_header("qwen3_vl_8b", ["off", "on", "on+noprethread"])
    shipped = serve.shipped_config("qwen3_vl")
    assert set(header["configs"]) == {"on", "on+noprethread"}
    assert header["configs"]["on"] == shipped
    assert header["poisson_primed"] is True  # summarize.own_schedule: no server of this run drew its own schedule
    unthreaded = {**shipped, "sglang": {**shipped["sglang"], "preprocess_thread": False}}
    assert header["configs"]["on+noprethread"] == unthreaded
    assert summarize.shipped_server(header, "qwen3_vl", shipped, lambda commit, name: None) == "on"
    monkeypatch.setenv("GPU_SERVE_CONFIG", "default")  # servers started from another shipped config record it
    assert serve.results_header("qwen3_vl_8b", ["on"])["configs"]["on"] == serve.shipped_config("default")


def _flags(argv: list[str]) -> dict[str, str | bool]:
    """``--flag value`` pairs and bare ``--flag`` switches of a load generator command line, as argparse dests."""
    out: dict[str, str | bool] = {}
    for i, token in enumerate(argv):
        if token.startswith("--"):
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else True
            out[token[2:].replace("-", "_")] = value
    return out


def test_a_primed_poisson_pool_and_the_measured_run_share_the_load_generators_dataset_key():
    """The run finds the primed requests only if every argument loadgen.dataset_key reads is the same in both."""
    import loadgen

    workload = [*serve.POISSON_WORKLOAD, "--num-prompts", "128", "--request-rate", "7.125", "--seed", "401"]
    primed, measured = [], []
    gen = serve.LoadGenerator.__new__(serve.LoadGenerator)
    gen.run = lambda argv, log_path: primed.extend(argv) or 1
    gen.prime(Path("/m"), [*serve.POISSON_WORKLOAD, "--num-prompts", "200", "--seed", "401"], Path("/dev/null"))
    measured = serve.loadgen_argv("http://127.0.0.1:30001", Path("/m"), workload, Path("/out/bench.jsonl"))
    kept = [{k: v for k, v in _flags(argv).items() if k not in loadgen._IGNORED} for argv in (primed, measured)]
    assert kept[0] == kept[1] and kept[0]["seed"] == "401" and "image_count" in kept[0]
    assert _flags(primed)["base_url"] == "http://127.0.0.1:9"  # a closed port: the prime sends nothing


def test_a_runs_log_line_shows_its_arrival_span_and_last_request_where_sglang_exported_its_requests():
    assert serve.arrivals_note({"arrivals_s": 21.77, "drain_s": 2.47}) == ", arrivals 21.77 s, drain 2.47 s"
    assert serve.arrivals_note({"arrivals_s": 21.77, "drain_s": 2.47, "last_first_token_s": 0.097,
                                "last_decode_s": 2.38}) == (", arrivals 21.77 s, drain 2.47 s (last request: first "
                                                            "token 0.097 s, decode 2.38 s)")
    assert serve.arrivals_note({}) == ""  # no export (older SGLang or no requests in the window)


def test_scheduler_threads_report_cpu_and_run_queue_seconds_per_thread_name(tmp_path):
    def thread(pid: int, tid: int, name: str, cpu_ns: int, runq_ns: int) -> None:
        task = tmp_path / str(pid) / "task" / str(tid)
        task.mkdir(parents=True)
        (task / "comm").write_text(name + "\n")
        (task / "schedstat").write_text(f"{cpu_ns} {runq_ns} 7\n")

    def process(pid: int, ppid: int, cmdline: str) -> None:
        (tmp_path / str(pid)).mkdir(exist_ok=True)
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (x) S {ppid} 0 0\n")
        (tmp_path / str(pid) / "cmdline").write_bytes(cmdline.encode() + b"\0")

    process(10, 1, "python3 -m sglang.launch_server")
    process(11, 10, "sglang::scheduler_TP0")
    process(12, 10, "sglang::detokenizer")
    thread(11, 11, "sglang::schedul", 2_000_000_000, 500_000_000)
    thread(11, 13, "sglang::schedul", 300_000_000, 100_000_000)  # the plugin's threads: the process's name
    thread(11, 14, "sglang::schedul", 200_000_000, 0)
    thread(12, 12, "sglang::detoken", 9_000_000_000, 0)  # not a scheduler: left out
    before = serve.scheduler_thread_seconds(10, tmp_path)
    assert before == {"sglang::schedul (main)": {"cpu": 2.0, "runq": 0.5},
                      "sglang::schedul": {"cpu": 0.5, "runq": 0.1}}
    after = {"sglang::schedul (main)": {"cpu": 5.0, "runq": 1.75}, "sglang::schedul": {"cpu": 0.52, "runq": 0.1}}
    assert serve.thread_seconds_during(before, after) == {"sglang::schedul (main)": {"cpu": 3.0, "runq": 1.25}}
    assert serve.scheduler_thread_seconds(99, tmp_path) == {}


def test_core_sharing_counts_samples_on_the_same_cpu_or_a_hardware_thread_sibling(tmp_path):
    for cpu, listing in ((0, "0,8"), (8, "0,8"), (1, "1-1"), (9, "9")):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(listing + "\n")
    siblings = serve.core_siblings(tmp_path)
    assert siblings == {0: {0, 8}, 8: {0, 8}, 1: {1}, 9: {9}}
    seen = [{"on:scheduler": 0, "off:scheduler": 8, "loadgen": 1},   # sibling of the idle scheduler
            {"on:scheduler": 1, "off:scheduler": 8, "loadgen": 1},   # same CPU as the load generator
            {"on:scheduler": 9, "off:scheduler": 0, "loadgen": None},  # alone; the load generator had ended
            {"on:scheduler": None, "off:scheduler": 0, "loadgen": 0}]  # not running: not counted
    sharing = serve.core_sharing(seen, "on:scheduler", siblings)
    assert sharing == {"samples": 3, "threads_per_core": 2, "cpus": {0: 1, 1: 1, 9: 1},
                       "shared_core": {"loadgen": round(1 / 3, 3), "off:scheduler": round(1 / 3, 3)}}
    assert serve.core_sharing([], "on:scheduler", siblings)["shared_core"] == {}


def test_running_cpu_is_the_threads_cpu_while_runnable_and_none_asleep_or_ended(tmp_path):
    import os

    assert serve.running_cpu(os.getpid()) in range(os.cpu_count())  # this thread is running now
    assert serve.running_cpu(2**22 + 7) is None
    for pid, state in ((7, "S"), (8, "R")):
        task = tmp_path / str(pid) / "task" / str(pid)
        task.mkdir(parents=True)
        fields = [state, *["0"] * 35, "5", "0"]  # state is field 3, the CPU field 39
        (task / "stat").write_text(f"{pid} (sglang::sched x) " + " ".join(fields) + "\n")
    assert serve.running_cpu(7, tmp_path) is None and serve.running_cpu(8, tmp_path) == 5


def test_core_placement_samples_the_threads_until_finished():
    import subprocess
    import sys
    import time

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        placement = serve.CorePlacement("spinner", {"spinner": spinner.pid}, every_s=0.01)
        placement.start()
        time.sleep(0.3)
        sharing = placement.finish({})
    finally:
        spinner.kill()
        spinner.wait()
    assert sharing["samples"] >= 2 and sum(sharing["cpus"].values()) == sharing["samples"]


def test_watched_threads_are_each_servers_first_scheduler_and_the_load_generator(monkeypatch):
    import types

    monkeypatch.setattr(serve, "descendants_titled", lambda root, title: {10: [12, 11], 20: []}[root])
    monkeypatch.setattr(serve, "LOADGEN", types.SimpleNamespace(proc=types.SimpleNamespace(pid=5)))
    servers = {"off": types.SimpleNamespace(proc=types.SimpleNamespace(pid=10)),
               "on": types.SimpleNamespace(proc=types.SimpleNamespace(pid=20)),  # no scheduler yet
               "on+x": types.SimpleNamespace(proc=None)}
    assert serve.watched_threads(servers) == {"off:scheduler": 12, "loadgen": 5}

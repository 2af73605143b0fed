"""The harness's stack sampling (scripts/gpu_serve/stack_samples.py): which processes it samples, how it stops
py-spy, and what it reads from py-spy's raw output. py-spy itself is replaced by a script that behaves as it does
(records until SIGINT, then writes its file; or fails with an ``Error:`` line), so this runs without it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "gpu_serve"))

import serve
import stack_samples

LOOP = "event_loop_overlap (/site/sglang/srt/managers/scheduler.py:900)"
RAW = f"""\
thread (11): MainThread;{LOOP};encode (/site/mm_scheduler_sglang/service.py:310) 30
thread (11): MainThread;{LOOP} 50
thread (12): mm-coalescer-qwen3_vl;_run (/site/mm_scheduler/coalescer.py:366) 20
"""


def _tree() -> subprocess.Popen:
    """A process whose child is titled like SGLang's scheduler, beside one that is not."""
    script = "exec -a 'sglang::scheduler_TP0' sleep 30 & exec -a 'sglang::detokenizer' sleep 30 & wait"
    root = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    _until(lambda: all(stack_samples.descendants_titled(root.pid, title)
                       for title in ("sglang::scheduler", "sglang::detokenizer")))
    return root


def _until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _kill(*trees: subprocess.Popen) -> None:
    for tree in trees:
        os.killpg(tree.pid, signal.SIGKILL)
        tree.wait()


def test_only_the_scheduler_processes_under_the_server_are_found(tmp_path):
    root = _tree()
    other = subprocess.Popen(["bash", "-c", "exec -a 'sglang::scheduler_TP0' sleep 30"],  # another server's
                             start_new_session=True)
    try:
        _until(lambda: stack_samples.descendants_titled(other.pid, stack_samples.SCHEDULER_TITLE))  # it exec'd
        found = stack_samples.descendants_titled(root.pid, stack_samples.SCHEDULER_TITLE)
        assert len(found) == 1 and found[0] != other.pid
        title = Path(f"/proc/{found[0]}/cmdline").read_bytes().decode()
        assert title.startswith("sglang::scheduler_TP0")
    finally:
        _kill(root, other)


def test_the_summary_gives_each_threads_share_and_the_plugins_frames(tmp_path):
    raw = tmp_path / "stacks.txt"
    raw.write_text(RAW)
    summary = stack_samples.summarize([raw])
    assert summary["samples"] == 100
    assert summary["threads"] == {"MainThread": 0.8, "mm-coalescer-qwen3_vl": 0.2}
    # the scheduler thread inside the plugin's hook, and the plugin's own thread; not SGLang's frames
    assert summary["plugin_frames"] == {"MainThread": 0.3, "mm-coalescer-qwen3_vl": 0.2}
    assert summary["innermost"] == {f"MainThread: {LOOP}": 0.5,
                                    "MainThread: encode (/site/mm_scheduler_sglang/service.py:310)": 0.3,
                                    "mm-coalescer-qwen3_vl: _run (/site/mm_scheduler/coalescer.py:366)": 0.2}
    assert stack_samples.summarize([]) == {"samples": 0}


def test_threads_python_does_not_list_are_counted_under_their_id(tmp_path):
    """py-spy writes no name for such a thread, and a hex id where it has no native one: still samples."""
    raw = tmp_path / "stacks.txt"
    raw.write_text(f"thread (0x7F3A2B): MainThread;{LOOP} 6\nthread (4242);run (/x.py:1) 3\nthread (17) 1\n")
    summary = stack_samples.summarize([raw])
    assert summary["samples"] == 10
    assert summary["threads"] == {"MainThread": 0.6, "thread 4242": 0.3, "thread 17": 0.1}
    assert summary["innermost"]["thread 17: (no Python frame)"] == 0.1


FAKE_PY_SPY = """\
#!{python}
import signal, sys, time
args = sys.argv[1:]
output = args[args.index("--output") + 1]
if "--pid" not in args or "--nonblocking" not in args or "--threads" not in args:
    sys.exit("Error: unexpected arguments " + " ".join(args))
{behaviour}
"""
RECORDS = """\
def finish(*_):
    kind = "gil" if "--gil" in args else "all"
    with open(output, "w") as f:
        f.write("thread (1): MainThread;loop (/site/sglang/x.py:1) " + ("7" if kind == "gil" else "9") + "\\n")
    sys.exit(0)
signal.signal(signal.SIGINT, finish)
open(output + ".ready", "w").close()
while True:
    time.sleep(0.01)
"""
FAILS = """\
print("Error: Failed to open process " + args[args.index("--pid") + 1] + ": Operation not permitted")
sys.exit(1)
"""


def _fake(tmp_path: Path, behaviour: str) -> Path:
    path = tmp_path / "py-spy"
    path.write_text(FAKE_PY_SPY.format(python=sys.executable, behaviour=textwrap.dedent(behaviour)))
    path.chmod(0o755)
    return path


def test_the_recorders_run_until_stopped_and_both_recordings_are_summarized(tmp_path):
    sampler = stack_samples.StackSampler(_fake(tmp_path, RECORDS), [4242], tmp_path / "stacks-lone-on")
    sampler.start()
    _until(lambda: all(Path(f"{out}.ready").exists() for kind in ("all", "gil") for out in sampler.outputs(kind)))
    result = sampler.stop()
    assert result["all"]["samples"] == 9 and result["gil"]["samples"] == 7
    assert (tmp_path / "stacks-lone-on-gil-4242.txt").exists()


def test_a_recorder_that_cannot_read_the_process_says_why(tmp_path):
    sampler = stack_samples.StackSampler(_fake(tmp_path, FAILS), [4242], tmp_path / "stacks-lone-on")
    sampler.start()
    _until(lambda: all(p.poll() is not None for p in sampler._procs))  # both said why and exited
    result = sampler.stop()
    assert result["all"]["samples"] == 0
    assert result["gil"]["error"] == "Error: Failed to open process 4242: Operation not permitted"


def test_a_run_is_sampled_only_when_its_workload_is_named_and_py_spy_is_there(tmp_path, monkeypatch):
    root = _tree()
    try:
        server = serve.Server("on", 30001, tmp_path / "server-on.log", proc=root)
        monkeypatch.setattr(serve, "PY_SPY", _fake(tmp_path, RECORDS))
        monkeypatch.setattr(serve, "PROFILE", {"lone"})
        samplers = serve.samplers_for(server, tmp_path, "lone-on")
        assert samplers["scheduler"].pids == stack_samples.descendants_titled(root.pid, "sglang::scheduler")
        assert samplers["tokenizer_manager"].pids == [root.pid]  # the launcher: SGLang's tokenizer manager
        assert serve.samplers_for(server, tmp_path, "seed3-on") == {}  # seed not named
        monkeypatch.setattr(serve, "PY_SPY", tmp_path / "missing")
        assert serve.samplers_for(server, tmp_path, "lone-on") == {}
    finally:
        _kill(root)


@pytest.mark.parametrize("tag", ["seedwarm3-on", "warm-on", "capacity-off"])
def test_warm_ups_are_not_sampled_when_only_the_measured_workload_is_named(tag, tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "PROFILE", {"seed", "poisson"})
    server = serve.Server("on", 30001, tmp_path / "server-on.log", proc=subprocess.Popen(["true"]))
    assert serve.samplers_for(server, tmp_path, tag) == {}


def test_a_py_spy_that_cannot_start_leaves_the_run_unsampled_with_the_reason(tmp_path):
    binary = tmp_path / "py-spy"
    binary.write_text("not a program")  # not executable
    sampler = stack_samples.StackSampler(binary, [4242], tmp_path / "stacks-lone-on")
    sampler.start()
    result = sampler.stop()
    assert result["all"]["samples"] == 0 and result["all"]["error"].startswith("Error: [Errno 13]")


def test_a_sampler_whose_stop_fails_is_recorded_with_the_reason_instead_of_raising(tmp_path):
    class Failing:
        def stop(self):
            raise OSError("py-spy output unreadable")

    assert serve.stopped_sampler(Failing()) == {"samples": 0, "error": "OSError('py-spy output unreadable')"}

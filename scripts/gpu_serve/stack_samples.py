"""Python stack samples of a server's scheduler and tokenizer manager during a measured run (py-spy), and what they
say.

Why: several of the real server's findings are inferences, not profiles: that the plugin's threads compete with
SGLang's scheduler thread for the GIL (Qwen2.5-VL's loss), and why a lone request decoded slower with the plugin
on (643572e: ITL median 47 ms against 23, with no encode queued). Two recordings a scheduler answer both: every
thread's stacks, idle ones included (where each thread waits), and only the thread holding the GIL in each sample
(who holds it while the scheduler thread wants it).

``serve.py`` records them when ``GPU_SERVE_PROFILE`` names the run's workload (``lone``, ``seed``, ...) and a
``py-spy`` binary is installed (a py-spy wheel among the carried wheels puts one in the site's ``bin``).
``--nonblocking`` reads the process's memory without pausing it, so the sampled server runs at full speed.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

SCHEDULER_TITLE = "sglang::scheduler"  # SGLang's setproctitle for each TP rank's scheduler process
RATE_HZ = 100
# ``thread (TID): NAME;frame;... COUNT``; py-spy leaves out ``: NAME`` for a thread Python does not list, and writes
# TID in hex where it has no native id.
_LINE = re.compile(r"^thread \(([^)]+)\)(?:: ([^;]*))?(?:;(.*))? (\d+)$")
# Frames of this project, by path (py-spy runs with --full-filenames): the installed wheel's two packages.
PLUGIN_PATHS = ("/mm_scheduler/", "/mm_scheduler_sglang/")


def descendants(root: int, proc: Path = Path("/proc")) -> list[int]:
    """``root`` and every process under it, from the parent links in /proc."""
    children: dict[int, list[int]] = {}
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process exited meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return sorted(found)


def descendants_titled(root: int, title: str, proc: Path = Path("/proc")) -> list[int]:
    """Processes under ``root`` (itself included) whose command line starts with ``title``."""
    found = []
    for pid in descendants(root, proc):
        try:
            cmdline = (proc / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmdline = ""
        if cmdline.startswith(title):
            found.append(pid)
    return found


class StackSampler:
    """``py-spy record`` of each of ``pids`` twice (all threads with idle ones; the GIL holder only), from
    :meth:`start` until :meth:`stop`, into ``{prefix}-{all|gil}-{pid}.txt`` (py-spy's raw collapsed stacks)."""

    def __init__(self, py_spy: Path, pids: list[int], prefix: Path) -> None:
        self.py_spy, self.pids, self.prefix = py_spy, pids, prefix
        self._procs: list[subprocess.Popen] = []

    def outputs(self, kind: str) -> list[Path]:
        return [self.prefix.with_name(f"{self.prefix.name}-{kind}-{pid}.txt") for pid in self.pids]

    def start(self) -> None:
        # --idle in both: py-spy drops a thread it deems idle, even one holding the GIL while blocked in the kernel
        for kind, flags in (("all", ["--idle"]), ("gil", ["--gil", "--idle"])):
            for pid, output in zip(self.pids, self.outputs(kind), strict=True):
                argv = [str(self.py_spy), "record", "--pid", str(pid), "--threads", "--nonblocking",
                        "--full-filenames", "--rate", str(RATE_HZ), "--format", "raw", "--output", str(output),
                        *flags]
                with output.with_suffix(".log").open("w") as log:
                    try:
                        self._procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
                    except OSError as exc:  # not executable here: the run goes on unsampled, and says why
                        log.write(f"Error: {exc}\n")

    def stop(self, timeout: float = 30.0) -> dict:
        """Stop the recorders (py-spy writes its file on SIGINT; one still running ``timeout`` seconds later is
        killed); what each recording says (:func:`summarize`)."""
        for p in self._procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout
        for p in self._procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        out = {}
        for kind in ("all", "gil"):
            out[kind] = summarize([path for path in self.outputs(kind) if path.exists()])
            if not out[kind]["samples"]:  # e.g. no permission to read the process: py-spy's own words
                logs = [path.with_suffix(".log") for path in self.outputs(kind)]
                out[kind]["error"] = next((line for log in logs if log.exists()
                                           for line in log.read_text(errors="replace").splitlines()
                                           if line.startswith("Error")), "no samples")
        return out


def summarize(paths: list[Path], top: int = 8) -> dict:
    """Samples per thread name (the ``top`` largest shares), the share of samples in this project's frames, and
    where the samples were: the innermost frames with the largest shares.

    ``plugin_frames``: samples whose stack holds a frame of ``mm_scheduler`` or ``mm_scheduler_sglang``, per
    thread: on the scheduler's main thread these are the plugin's hooks (a prefill waiting for its encodes, the
    admission checks); on its own threads, everything they do. ``innermost``: ``thread: frame`` (for the tokenizer
    manager: is its loop converting images, copying features, or waiting, and for what)."""
    threads: Counter[str] = Counter()
    plugin: Counter[str] = Counter()
    innermost: Counter[str] = Counter()
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            m = _LINE.match(line)
            if not m:
                continue
            name, stack, count = m.group(2) or f"thread {m.group(1)}", m.group(3) or "", int(m.group(4))
            threads[name] += count
            innermost[f"{name}: {stack.rsplit(';', 1)[-1] or '(no Python frame)'}"] += count
            if any(marker in stack for marker in PLUGIN_PATHS):
                plugin[name] += count
    total = sum(threads.values())
    if not total:
        return {"samples": 0}
    return {"samples": total,
            "threads": {name: round(n / total, 4) for name, n in threads.most_common(top)},
            "plugin_frames": {name: round(n / total, 4) for name, n in plugin.most_common(top)},
            "innermost": {frame: round(n / total, 4) for frame, n in innermost.most_common(2 * top)}}

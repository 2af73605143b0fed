"""Soak: thousands of requests from hundreds of clients with every fault at once, then count what came back.

Faults, all in one run: random cancellation (some while the request's batch runs), poisoned items (the
tower raises), malformed outputs (a non-tensor, video frames of the wrong width), slow forwards, transient
and capacity out-of-memory, and one unbounded hang (a forward that never returns until the run ends).

Checks: 0 lost (every request ends), 0 wrong (each result equals the fake tower's pure function of
its item, each error is one the request's faults allow), 0 duplicated (no request ends twice), nothing left
queued or running, RSS growth over the second half under 20 MB, no forward run on the event loop's thread,
and the loop never blocked for more than 500 ms (a probe task measures its own lateness, minus the time the
OS kept the loop thread waiting on a run queue, which is machine load and not blocking; the lateness is
reported in full).

A *driver* feeds the requests to the system under test: :class:`CoalescerDriver` (the asyncio core)
here; another (EncoderService called from scheduler-like threads) implements the same
:class:`Driver` protocol. ``python -m mm_scheduler.soak --help`` (``make soak``) runs it for people;
``tests/core/test_soak.py`` runs a short one on CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import importlib
import itertools
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .coalescer import Coalescer
from .config import CoalescerConfig
from .errors import EncodeError, ForwardTimeoutError, TowerUnhealthyError
from .testing import FakeTower, expected_encoding
from .types import EncodeItem

PATCH_SIZES = (16, 64, 144, 256, 576)
BYTES_PER_PATCH = 100
MAX_RSS_GROWTH_MB = 20.0
# A loop waiting for the GIL held by another thread is not on a run queue, so on a loaded 2-core machine the
# probe saw 116 ms with nothing wrong. A forward on the loop thread is caught exactly by the thread check;
# this bound catches a loop that waits on something slow, such as a hung forward's lock (seconds).
MAX_BLOCKED_MS = 500.0


@dataclass(frozen=True)
class SoakSettings:
    """One soak run. Rates are per request; ``hang_at`` is the fraction of the run where one request hangs."""

    requests: int = 10_000
    clients: int = 400
    target_rate: float = 600.0
    """Requests per second the clients offer together (each thinks ``clients / target_rate`` s on average)."""
    seed: int = 0
    cancel_rate: float = 0.05
    cancel_running_rate: float = 0.02
    """Requests cancelled the moment a forward holding one of their units starts."""
    poison_rate: float = 0.005
    malformed_rate: float = 0.004
    slow_rate: float = 0.01
    slow_s: tuple[float, float] = (0.02, 0.05)
    oom_rate: float = 0.001
    capacity_patches: int = 3000
    budget_patches: int = 4096
    hang_at: float | None = 0.3
    forward_timeout_s: float = 0.5
    fallback_s: float = 0.25
    """How long a refused client (TowerUnhealthyError) spends on its fallback path before its next request."""
    fixed_s: float = 0.0005
    per_patch_s: float = 2e-7
    deadline_s: float = 600.0
    """Wall-clock limit of the whole run: requests not ended by then are counted as lost."""


@dataclass
class RequestSpec:
    """One request of the workload and the faults it carries (what outcomes it may legitimately have).

    Its items are built on demand (:meth:`make_items`, deterministic): a harness that held all of them
    for the whole run would make the garbage collector, not the system under test, block the loop.
    """

    rid: int
    faults: frozenset[str]
    cancel_after: float | None
    cancel_when_running: bool = False
    seed: int = 0
    shared: Sequence[EncodeItem] = field(default=(), repr=False, compare=False)

    @property
    def cancelled_on_purpose(self) -> bool:
        return self.cancel_after is not None or self.cancel_when_running

    def make_items(self) -> list[EncodeItem]:
        """1-6 items: images of five sizes, 2-4 frame videos, shared keys (dedup); plus the fault item."""
        rng = random.Random(self.seed * 1_000_003 + self.rid)
        rid = self.rid
        items: list[EncodeItem] = []
        for j in range(rng.randint(1, 6)):
            kind = rng.random()
            if kind < 0.15 and self.shared:
                items.append(rng.choice(self.shared))
            elif kind < 0.30:
                frames = rng.randint(2, 4)
                pixels = torch.arange(frames * 6, dtype=torch.float32).reshape(frames, 2, 3) + rid * 100 + j
                items.append(EncodeItem(pixels, rng.choice(PATCH_SIZES[:3]), "video", key=f"v{rid}-{j}"))
            else:
                key = None if kind > 0.9 else f"r{rid}-{j}"
                items.append(EncodeItem(torch.full((2, 3), rid * 100.0 + j), rng.choice(PATCH_SIZES), key=key))
        for fault in self.faults - {"hang"}:
            if fault == "malformed" and rng.random() < 0.5:  # frames of the wrong width
                frames = rng.randint(2, 3)
                pixels = torch.arange(frames * 6, dtype=torch.float32).reshape(frames, 2, 3) - rid
                items.append(EncodeItem(pixels, 16, "video", key=f"{fault}-{rid}"))
            else:
                items.append(EncodeItem(torch.full((2, 3), -rid - 0.5), rng.choice(PATCH_SIZES), key=f"{fault}-{rid}"))
        if "hang" in self.faults:
            items.append(EncodeItem(torch.full((2, 3), 0.25), 16, key=f"hang-{rid}"))
        return items

    def own_keys(self, items: Sequence[EncodeItem]) -> list[str]:
        """Keys only this request's images carry (shared and fault keys excluded)."""
        prefix = f"r{self.rid}-"
        return [item.key for item in items if isinstance(item.key, str) and item.key.startswith(prefix)]


@dataclass
class Ledger:
    """Every request's outcome, recorded once; anything else is a defect the soak reports."""

    total: int
    outcomes: dict[int, str] = field(default_factory=dict)
    duplicated: int = 0
    items: int = 0
    wrong: list[str] = field(default_factory=list)
    on_half: Callable[[], None] | None = None

    def record(self, spec: RequestSpec, outcome: str, why: str = "") -> None:
        if spec.rid in self.outcomes:
            self.duplicated += 1
            self.wrong.append(f"request {spec.rid} ended twice: {self.outcomes[spec.rid]} then {outcome}")
            return
        self.outcomes[spec.rid] = outcome
        if outcome == "wrong":
            self.wrong.append(f"request {spec.rid}: {why}")
        if len(self.outcomes) == self.total // 2 and self.on_half is not None:
            self.on_half()

    def judge(self, spec: RequestSpec, items: Sequence[EncodeItem], result: list[torch.Tensor] | BaseException,
              cancelled_by_us: bool) -> None:
        """Classify one request's end against its faults, and record it."""
        self.items += len(items)
        if isinstance(result, asyncio.CancelledError):
            self.record(spec, "cancelled" if cancelled_by_us else "wrong", "cancelled without being cancelled")
        elif isinstance(result, ForwardTimeoutError):
            self.record(spec, "timed_out")  # shared a batch with the hung forward
        elif isinstance(result, TowerUnhealthyError):
            self.record(spec, "fallback")  # refused while unhealthy: the plugin takes SGLang's own path
        elif isinstance(result, EncodeError):
            bad = spec.faults & {"poison", "malformed"}
            self.record(spec, "failed" if bad else "wrong", f"EncodeError without a poisoned item: {result}")
        elif isinstance(result, BaseException):
            self.record(spec, "wrong", f"escaped as {type(result).__name__}: {result!r}")
        elif spec.faults & {"poison", "malformed", "hang"}:
            self.record(spec, "wrong", f"succeeded despite faults {sorted(spec.faults)}")
        elif len(result) != len(items):
            self.record(spec, "wrong", f"{len(result)} results for {len(items)} items")
        elif not all(isinstance(out, torch.Tensor) and torch.equal(out, expected_encoding(item))
                     for item, out in zip(items, result, strict=True)):
            self.record(spec, "wrong", "a result differs from the tower's output for its item")
        else:
            self.record(spec, "ok")


class Driver(Protocol):
    """Runs every spec through a system under test, judging each end in ``ledger`` exactly once."""

    name: str
    runs_on_soak_loop: bool
    """Optional (default True): the system under test runs on the soak's own event loop, whose blocking the
    soak's probe measures. A driver whose system runs elsewhere (threads, its own loop) sets False and
    reports its own blocking checks: the soak's loop then runs nothing of the product, so its lateness
    only measures contention for the GIL and the CPU."""

    async def run(self, specs: Sequence[RequestSpec], tower: FakeTower, settings: SoakSettings,
                  ledger: Ledger) -> dict[str, Any]:
        """Returns end-of-run state: every value under ``"leftovers"`` must be 0 (queues, held bytes...);
        optional ``"stats"`` (the coalescer's), ``"figures"`` and ``"checks"`` (name -> passed) join the
        report, e.g. a :class:`LoopLagProbe` the driver ran on its own loop thread."""
        ...


class LoopLagProbe:
    """Measures how late the loop it runs on wakes a sleeping task.

    ``max_lag_ms`` is the raw lateness; ``max_blocked_ms`` subtracts the time the OS kept this thread
    waiting on a run queue (``/proc/thread-self/schedstat``), so a busy machine is not mistaken for
    a blocked loop. Start it on the loop to watch (``asyncio.run_coroutine_threadsafe`` for another one).
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.max_lag_ms = 0.0
        self.max_blocked_ms = 0.0
        self.samples = 0
        self._stop = False

    async def run(self) -> None:
        while not self._stop:
            queued = _runqueue_wait_s()
            start = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            lag = time.perf_counter() - start - self.interval_s
            waited = _runqueue_wait_s() - queued
            self.samples += 1
            self.max_lag_ms = max(self.max_lag_ms, lag * 1000)
            self.max_blocked_ms = max(self.max_blocked_ms, (lag - waited) * 1000)

    def stop(self) -> None:
        self._stop = True


class GcPauses:
    """A ``gc.callbacks`` entry that keeps the longest collection (it stops every thread, the loop's too)."""

    def __init__(self) -> None:
        self.max_ms = 0.0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.max_ms = max(self.max_ms, (time.perf_counter() - self._start) * 1000)


def _runqueue_wait_s() -> float:
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def rss_mb() -> float:
    """Resident set size now (not the peak), from /proc; 0 where there is no /proc."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, IndexError, ValueError):
        return 0.0


# --- workload --------------------------------------------------------------------------------------
def make_workload(settings: SoakSettings) -> list[RequestSpec]:
    """Deterministic requests (from ``seed``): which carry which fault, which are cancelled and when."""
    rng = random.Random(settings.seed)
    shared = [EncodeItem(torch.full((2, 3), -float(k)), rng.choice(PATCH_SIZES), key=f"shared-{k}") for k in range(32)]
    hang_rid = None if settings.hang_at is None else int(settings.requests * settings.hang_at)
    specs = []
    for rid in range(settings.requests):
        faults: set[str] = set()
        roll = rng.random()
        for name, rate in (("poison", settings.poison_rate), ("malformed", settings.malformed_rate),
                           ("slow", settings.slow_rate), ("oom", settings.oom_rate)):
            if roll < rate:
                faults.add(name)
                break
            roll -= rate
        cancel_after = rng.uniform(0.0, 0.03) if rng.random() < settings.cancel_rate else None
        when_running = cancel_after is None and rng.random() < settings.cancel_running_rate
        if rid == hang_rid:
            faults, cancel_after, when_running = {"hang"}, None, False  # the hang must reach the tower
        specs.append(RequestSpec(rid, frozenset(faults), cancel_after, when_running, settings.seed, shared))
    return specs


def make_tower(specs: Sequence[RequestSpec], settings: SoakSettings) -> FakeTower:
    rng = random.Random(settings.seed + 1)
    keys: dict[str, set[str]] = {name: set() for name in ("poison", "malformed", "slow", "oom", "hang")}
    for spec in specs:
        for fault in spec.faults:
            keys[fault].add(f"{fault}-{spec.rid}")
    return FakeTower(ragged=False, bytes_per_patch=BYTES_PER_PATCH, fixed_s=settings.fixed_s,
                     per_patch_s=settings.per_patch_s, fail_keys=keys["poison"], malformed_keys=keys["malformed"],
                     slow_keys={k: rng.uniform(*settings.slow_s) for k in sorted(keys["slow"])},
                     oom_keys=keys["oom"], hang_keys=keys["hang"], capacity_patches=settings.capacity_patches)


# --- the asyncio core ------------------------------------------------------------------------------
class CoalescerDriver:
    """Clients on this event loop call :meth:`Coalescer.encode` directly (closed loop, random think time)."""

    name = "coalescer"

    async def run(self, specs: Sequence[RequestSpec], tower: FakeTower, settings: SoakSettings,
                  ledger: Ledger) -> dict[str, Any]:
        config = CoalescerConfig(max_wait_ms=1.0, max_batch_items=48, budget_bytes=settings.budget_patches *
                                 BYTES_PER_PATCH, max_queue_patches=10_000_000,
                                 forward_timeout_s=settings.forward_timeout_s, name=f"soak-{settings.seed}")
        loop = asyncio.get_running_loop()
        rng = random.Random(settings.seed + 2)
        think_s = settings.clients / settings.target_rate
        queue = iter(specs)
        cancelled: list[list[str]] = []
        cancel_on_forward: dict[Any, asyncio.Task[Any]] = {}

        def on_forward(record: Any) -> None:  # the forward thread: hand the cancels to the loop
            for key in record.keys:
                task = cancel_on_forward.get(key)
                if task is not None:
                    loop.call_soon_threadsafe(task.cancel)

        tower.on_forward = on_forward

        async with Coalescer(tower, config) as co:
            async def client() -> None:
                me = asyncio.current_task()
                for spec in queue:
                    await asyncio.sleep(rng.uniform(0, 2 * think_s))
                    items = spec.make_items()
                    task = loop.create_task(co.encode(items))
                    handle = None if spec.cancel_after is None else loop.call_later(spec.cancel_after, task.cancel)
                    own_keys = spec.own_keys(items) if spec.cancel_when_running else []
                    for key in own_keys:
                        cancel_on_forward[key] = task
                    try:
                        result: Any = await task
                    except asyncio.CancelledError as exc:
                        if me.cancelling():  # this client is being stopped (the run's deadline)
                            raise
                        result = exc
                        cancelled.append(spec.own_keys(items))
                    except Exception as exc:
                        result = exc
                    if handle is not None:
                        handle.cancel()
                    for key in own_keys:
                        del cancel_on_forward[key]
                    ledger.judge(spec, items, result, cancelled_by_us=spec.cancelled_on_purpose)
                    refused = isinstance(result, TowerUnhealthyError)
                    del items, task, result  # nothing of this request stays alive while the client thinks
                    if refused:
                        await asyncio.sleep(settings.fallback_s)

            clients = [loop.create_task(client()) for _ in range(settings.clients)]
            done, running = await asyncio.wait(clients, timeout=settings.deadline_s)
            for task in running:
                task.cancel()
            for task in done:
                task.result()  # a client that crashed is a harness bug: surface it
            if tower.hung_forwards:  # let the health probe finish recovering before the figures are taken
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10 * settings.forward_timeout_s + 5):
                        while not co.stats()["healthy"]:
                            await asyncio.sleep(0.01)
            stats = co.stats()
            tower.release()  # the hung forward may return now; the coalescer closes without waiting for it
        after = co.stats()
        return {
            "stats": stats,
            "cancelled_while_running": _cancelled_while_running(cancelled, tower),
            "leftovers": {"pending_units": after["pending_units"], "pending_patches": after["pending_patches"],
                          "inflight_batches": after["inflight_batches"], "jobs_by_key": len(co._jobs_by_key)},
        }


def _cancelled_while_running(cancelled: Sequence[list[str]], tower: FakeTower) -> int:
    """Cancelled requests whose own units reached the tower: queued units are withdrawn on cancel, so
    these were cancelled while their batch ran."""
    seen = {key for record in tower.log for key in record.keys}
    return sum(any(key in seen for key in keys) for keys in cancelled)


# --- the run ---------------------------------------------------------------------------------------
async def _report_progress(ledger: Ledger, progress: Callable[[str], None], every_s: float) -> None:
    started = time.perf_counter()
    while True:
        await asyncio.sleep(every_s)
        progress(f"      {len(ledger.outcomes):,} / {ledger.total:,} requests ended "
                 f"({time.perf_counter() - started:.0f} s)")


async def run_soak(settings: SoakSettings, driver: Driver | None = None,
                   progress: Callable[[str], None] | None = None, progress_every_s: float = 5.0) -> dict[str, Any]:
    """Run one soak on the running loop; returns figures and a ``checks`` dict of name -> passed.

    ``progress`` (e.g. ``print``) gets a line every ``progress_every_s`` seconds while it runs.
    """
    driver = driver or CoalescerDriver()
    specs = make_workload(settings)
    tower = make_tower(specs, settings)
    ledger = Ledger(total=len(specs))
    rss: dict[str, float] = {"start": rss_mb()}
    ledger.on_half = lambda: rss.__setitem__("half", rss_mb())
    probe = LoopLagProbe()
    loop_thread = threading.current_thread().name
    gc_pauses = GcPauses()
    # What a server does once started (SGLang: Engine.freeze_gc): older objects leave the collector's scans,
    # so a full collection costs what the run allocates, not what the host process (pytest, a model) holds.
    gc.collect()
    gc.freeze()
    gc.callbacks.append(gc_pauses)
    probe_task = asyncio.get_running_loop().create_task(probe.run())
    reporter = None if progress is None else \
        asyncio.get_running_loop().create_task(_report_progress(ledger, progress, progress_every_s))
    started = time.perf_counter()
    try:
        state = await driver.run(specs, tower, settings, ledger)
    finally:
        if reporter is not None:
            reporter.cancel()
        tower.release()
        gc.callbacks.remove(gc_pauses)
        gc.unfreeze()
    seconds = time.perf_counter() - started
    rss["end"] = rss_mb()
    probe.stop()
    await probe_task

    counts = Counter(ledger.outcomes.values())
    lost = len(specs) - len(ledger.outcomes)
    stats = state.get("stats", {})
    over_budget = sum(r.patches > settings.budget_patches for r in tower.log)
    growth = rss["end"] - rss.get("half", rss["end"])
    figures = {
        "driver": driver.name, "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
        "requests": len(specs), "clients": settings.clients, "seconds": round(seconds, 2),
        "requests_per_s": round(len(specs) / seconds, 1),
        "items": ledger.items,
        "ok": counts["ok"], "failed_poisoned": counts["failed"], "cancelled": counts["cancelled"],
        "cancelled_while_running": state.get("cancelled_while_running", 0),
        "timed_out": counts["timed_out"], "fallback_unhealthy": counts["fallback"],
        "lost": lost, "wrong": counts["wrong"], "duplicated": ledger.duplicated,
        "forwards": stats.get("forwards", 0), "mean_patches_per_forward": round(stats.get("mean_patches_per_forward",
                                                                                          0.0), 1),
        "dedup_hits": stats.get("dedup_hits", 0), "oom_backoffs": stats.get("oom_backoffs", 0),
        "forward_timeouts": stats.get("forward_timeouts", 0), "health_probes": stats.get("health_probes", 0),
        "hung_forwards": tower.hung_forwards, "over_budget_forwards": over_budget,
        "rss_start_mb": round(rss["start"], 1), "rss_half_mb": round(rss.get("half", 0.0), 1),
        "rss_end_mb": round(rss["end"], 1), "rss_growth_second_half_mb": round(growth, 1),
        "max_loop_lag_ms": round(probe.max_lag_ms, 1), "max_loop_blocked_ms": round(probe.max_blocked_ms, 1),
        "max_gc_pause_ms": round(gc_pauses.max_ms, 1),
        "leftovers": state.get("leftovers", {}),
        **state.get("figures", {}),
    }
    checks = {
        "0 lost": lost == 0,
        "0 wrong": counts["wrong"] == 0,
        "0 duplicated": ledger.duplicated == 0,
        "queues back to 0": all(v == 0 for v in figures["leftovers"].values()),
        "no forward over budget": over_budget == 0,
        f"RSS growth over 2nd half < {MAX_RSS_GROWTH_MB:g} MB": growth < MAX_RSS_GROWTH_MB,
    }
    if getattr(driver, "runs_on_soak_loop", True):
        checks["no forward ran on the loop's thread"] = all(r.thread != loop_thread for r in tower.log)
        checks[f"loop never blocked > {MAX_BLOCKED_MS:g} ms"] = probe.max_blocked_ms <= MAX_BLOCKED_MS
    checks.update(state.get("checks", {}))
    if settings.hang_at is not None:
        checks["the hang was detected and recovered"] = (
            tower.hung_forwards >= 1 and figures["forward_timeouts"] >= 1 and stats.get("healthy") is True)
    return {"settings": asdict(settings), "figures": figures, "checks": checks, "defects": ledger.wrong[:20]}


def format_table(report: dict[str, Any]) -> str:
    """The figures and checks as a Markdown table (what ``make soak`` prints)."""
    lines = ["| figure | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in report["figures"].items()]
    lines += ["", "| check | result |", "|---|---|"]
    lines += [f"| {name} | {'pass' if ok else 'FAIL'} |" for name, ok in report["checks"].items()]
    if report["defects"]:
        lines += ["", "defects:", *(f"  - {d}" for d in report["defects"])]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mm_scheduler.soak", description=__doc__.splitlines()[0])
    defaults = SoakSettings()
    parser.add_argument("--requests", type=int, default=defaults.requests)
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--rate", type=float, default=defaults.target_rate, help="offered requests/s")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--loop", choices=("asyncio", "uvloop", "both"), default="both")
    parser.add_argument("--driver", default="mm_scheduler.soak:CoalescerDriver",
                        help="module:Class of the Driver that feeds the system under test")
    parser.add_argument("--json", type=Path, help="write the reports here")
    args = parser.parse_args(argv)
    loops = ("asyncio", "uvloop") if args.loop == "both" else (args.loop,)
    reports = []
    for stage, (seed, loop_name) in enumerate(zip(itertools.count(args.seed), loops), start=1):
        settings = SoakSettings(requests=args.requests, clients=args.clients, target_rate=args.rate, seed=seed)
        print(f"[{stage}/{len(loops)}] soak on {loop_name} ({args.driver}): {args.requests:,} requests from "
              f"{args.clients} clients, every fault on", flush=True)
        report = _run_on(loop_name, settings, _load_driver(args.driver), functools.partial(print, flush=True))
        print(f"\n## soak: {report['figures']['driver']} on {loop_name}\n\n{format_table(report)}", flush=True)
        reports.append(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0], "torch": torch.__version__,
                "cpus": os.cpu_count(), "command": "python -m mm_scheduler.soak " + " ".join(sys.argv[1:])}
        args.json.write_text(json.dumps({"meta": meta, "runs": reports}, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0 if all(all(r["checks"].values()) for r in reports) else 1


def _load_driver(spec: str) -> Driver:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)()


def _run_on(loop_name: str, settings: SoakSettings, driver: Driver,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run(run_soak(settings, driver, progress))
    return asyncio.run(run_soak(settings, driver, progress))


if __name__ == "__main__":
    raise SystemExit(main())

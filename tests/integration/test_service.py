"""EncoderService on its own (CPU): threads, leaks, the cap, bounded waits, the tower lock, the sweep.

A small CPU adapter stands in for a model's tower here: what is tested is the service's bookkeeping
and its handoffs between threads, which do not depend on the model (the real models' adapters are
covered in test_adapters.py, test_equivalence.py and test_early_encoding.py).
"""

from __future__ import annotations

import linecache
import random
import sys
import threading
import time
from array import array
from types import SimpleNamespace

import pytest
import torch
from mm_scheduler_sglang.adapters import SGLangTower
from mm_scheduler_sglang.service import EncoderService

from mm_scheduler import CoalescerConfig, EncodeItem

pytestmark = pytest.mark.timeout(60)  # tests wait on gates and threads: a hang fails fast

ROWS = 4


class SumTower(SGLangTower):
    """One unit per item; output row = pixel sum. ``gate`` can hold forwards; ``in_forward`` is visible."""

    ragged = True
    bytes_per_patch = 64

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.model = object()
        self.gate = threading.Event()
        self.gate.set()
        self.in_forward = threading.Event()
        self.forwarded: list = []

    def _raw_pixels(self, item, shape=None) -> bool:
        return isinstance(item.feature, torch.Tensor)

    def accepts(self, item) -> bool:
        return item.precomputed_embeddings is None and isinstance(item.feature, torch.Tensor)

    def result_key(self, item):
        return ("image", item.hash)

    def output_bytes(self, item) -> int:
        return ROWS * 4

    def units(self, item) -> list[EncodeItem]:
        return [EncodeItem(item.feature, ROWS, "image", (item.hash, 0))]

    def forward(self, units):
        self.in_forward.set()
        try:
            assert self.gate.wait(30), "test gate never opened"
            self.forwarded.extend(u.key for u in units)
            return [u.pixel_values.sum(dim=-1, keepdim=True) for u in units]
        finally:
            self.in_forward.clear()


class VideoSumTower(SumTower):
    """Also takes videos: one video unit of ``frames`` frames, which the coalescer splits into frame units."""

    def units(self, item) -> list[EncodeItem]:
        if item.modality.name == "VIDEO":
            return [EncodeItem(item.feature, ROWS, "video", (item.hash, 0))]
        return super().units(item)

    def output_bytes(self, item) -> int:
        return item.feature.shape[0] * ROWS * 4 if item.modality.name == "VIDEO" else ROWS * 4


def item(hash_value: int, end: int = 10, start: int = 0):
    return SimpleNamespace(modality=SimpleNamespace(name="IMAGE"), hash=hash_value,
                           feature=torch.full((ROWS, 3), float(hash_value)), precomputed_embeddings=None,
                           offsets=[(start, end)], model_specific_data={})


def video(hash_value: int, frames: int):
    return SimpleNamespace(modality=SimpleNamespace(name="VIDEO"), hash=hash_value,
                           feature=torch.full((frames, ROWS, 3), float(hash_value)), precomputed_embeddings=None,
                           offsets=[(0, 10)], model_specific_data={})


def expected(*hashes: int) -> torch.Tensor:
    return torch.cat([torch.full((ROWS, 1), 3.0 * h) for h in hashes])


def never(_items):
    raise AssertionError("fell back to the model's own method")


@pytest.fixture
def make_service():
    services = []

    def make(**kwargs) -> EncoderService:
        tower = kwargs.pop("tower", None) or SumTower()
        config = kwargs.pop("config", None) or CoalescerConfig(budget_bytes=1 << 20, max_batch_items=16,
                                                                bytes_per_patch=64)
        service = EncoderService(tower, config, lockstep=kwargs.pop("lockstep", False), **kwargs).start()
        services.append(service)
        return service

    yield make
    for service in services:
        service.tower.gate.set()
        service.close()


def _eventually(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _blocked_in(thread: threading.Thread, function: str, filename: str) -> bool:
    """Whether ``thread`` is waiting inside ``function`` (of a file ending with ``filename``): its innermost
    Python frame is a ``threading`` wait called from there, or that function itself on a line that
    acquires a lock or waits (a C call, which has no frame of its own)."""
    frame = sys._current_frames().get(thread.ident)
    if frame is None:
        return False
    innermost = frame
    while frame is not None:
        if _named(frame.f_code.co_name, function) and frame.f_code.co_filename.endswith(filename):
            if innermost.f_code.co_filename.endswith("threading.py"):
                return True
            line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
            return frame is innermost and (".acquire(" in line or ".wait(" in line)
        frame = frame.f_back
    return False


def _named(code_name: str, function: str) -> bool:
    """``function`` itself, or its copy under mutation testing (mutmut renames ``f`` to ``x_f__mutmut_orig``,
    a method to ``xǁClassǁf__mutmut_orig``, and so on)."""
    return code_name == function or f"ǁ{function}__mutmut" in code_name or code_name.startswith(f"x_{function}__mutmut")


def _wait_until_blocked(thread: threading.Thread, function: str, filename: str, what: str) -> None:
    _eventually(lambda: _blocked_in(thread, function, filename), what)


def _start_thread(fn, *args) -> tuple[threading.Thread, dict]:
    """Run ``fn(*args)`` on a new thread; the dict gets its ``value`` or ``error``."""
    result: dict = {}

    def body() -> None:
        try:
            result["value"] = fn(*args)
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, result


@pytest.mark.parametrize("lockstep, inline", [(False, False), (True, False), (False, True)],
                         ids=["async", "lockstep", "async-inline-when-idle"])
def test_eight_threads_arriving_encoding_and_releasing_leave_nothing_held(make_service, lockstep, inline):
    """Issue 11: concurrent callers must not leak held bytes (submitted ahead of released). With
    ``inline_when_idle`` (``early_encode_min_waiting``) half the requests are left to their prefill, which encodes
    them on its own thread when the coalescer is idle: never beside a coalescer forward, with the same results."""
    service = make_service(lockstep=lockstep, max_held_bytes=ROWS * 4 * 2,  # room for 2: 3-item requests defer
                           inline_when_idle=inline)
    errors: list[BaseException] = []
    lockstep_turn = threading.Lock()  # lockstep runs forwards on the caller's thread: one at a time
    beside_a_forward: list[bool] = []

    def sglangs_own(items):  # what SumTower computes, on the caller's thread
        beside_a_forward.append(service.tower.in_forward.is_set())
        return torch.cat([it.feature.sum(dim=-1, keepdim=True) for it in items])

    def client(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for n in range(60):
                rid = f"t{seed}-{n}"
                hashes = rng.sample(range(1, 25), rng.randint(1, 3))  # shared hashes across threads
                items = [item(h) for h in hashes]
                if not (inline and rng.random() < 0.5):  # else left to its prefill, as the gate leaves it
                    service.on_arrival(rid, items)
                if rng.random() < 0.25:
                    service.release(rid, aborted=True)
                    continue
                with lockstep_turn if lockstep else _nothing():
                    got = service.encode(items, original=sglangs_own if inline else never)
                assert torch.equal(got, expected(*hashes))
                if rng.random() < 0.5:
                    service.consumed(rid, items, prefilled_upto=1 << 20)
                service.release(rid)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[0]
    stats = service.stats()
    assert (stats["held_bytes"], stats["held_items"], stats["deferred_items"]) == (0, 0, 0), stats
    assert stats["fallbacks"] == 0 and stats["deferred"] > 0, stats
    if inline:
        assert stats["inline"] > 0 and len(beside_a_forward) == stats["inline"], stats
        assert not any(beside_a_forward)
    _eventually(lambda: service.stats()["pending_units"] == 0, "withdrawn work to leave the queue")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_prefill_waiting_on_a_shared_result_survives_the_other_holders_abort(make_service):
    """Issue 11: an abort cancels the shared handle; the waiter must re-encode, not see CancelledError."""
    service = make_service()
    service.tower.gate.clear()
    service.on_arrival("busy", [item(99)])
    _eventually(service.tower.in_forward.is_set, "the tower to be busy")
    service.on_arrival("holder", [item(7)])  # queued behind the busy forward
    result: dict = {}

    def prefill_of_another_request() -> None:  # it never arrived (e.g. beyond the cap): joins at prefill
        try:
            result["value"] = service.encode([item(7)], original=never)
        except BaseException as exc:
            result["error"] = exc

    waiter = threading.Thread(target=prefill_of_another_request)
    waiter.start()
    _wait_until_blocked(waiter, "_wait", "service.py", "the prefill to block on the holder's handle")
    service.release("holder", aborted=True)  # cancels the queued encode the waiter was using
    service.tower.gate.set()
    waiter.join(30)
    assert "error" not in result, result.get("error")
    assert torch.equal(result["value"], expected(7))
    assert service.counts["cancelled"] == 1 and service.counts["encoded_on_demand"] == 1


def test_items_beyond_the_cap_are_encoded_once_room_frees(make_service):
    """Issue 8 item 12: the cap is back-pressure that recovers, not a switch that stays off."""
    service = make_service(max_held_bytes=ROWS * 4)
    service.on_arrival("a", [item(1)])
    service.on_arrival("b", [item(2)])
    assert service.stats()["deferred_items"] == 1
    service.encode([item(1)], original=never)
    service.consumed("a", [item(1)], prefilled_upto=100)  # frees a's result: b's is admitted
    assert service.counts["admitted"] == 1
    assert torch.equal(service.encode([item(2)], original=never), expected(2))
    assert service.counts["taken_early"] == 2 and service.counts["encoded_on_demand"] == 0


def test_sweep_releases_holders_absent_from_two_sweeps_and_withdraws_their_work(make_service):
    """Issue 8 item 12: exits that skip every release hook (PD bootstrap failure, ...) are swept."""
    service = make_service()
    service.tower.gate.clear()
    service.on_arrival("busy", [item(50)])
    _eventually(service.tower.in_forward.is_set, "the tower to be busy")
    service.on_arrival("live", [item(1)])
    service.on_arrival("vanished", [item(2)])
    assert service.sweep({"live", "busy"}) == 0  # first absence: only suspected
    assert service.sweep({"live", "busy"}) == 1
    assert service.held_keys() == {("image", 50), ("image", 1)}
    service.tower.gate.set()
    service.encode([item(1)], original=never)
    assert (2, 0) not in service.tower.forwarded  # the vanished request's unit was withdrawn


def test_a_request_back_in_the_live_set_is_not_swept(make_service):
    service = make_service()
    service.on_arrival("r", [item(3)])
    service.sweep(set())  # in transit between two queues
    service.sweep({"r"})
    service.sweep(set())
    assert service.held_keys() == {("image", 3)}


def test_release_all_frees_everything_when_the_server_releases_memory(make_service):
    service = make_service()
    service.on_arrival("a", [item(1), item(2)])
    service.on_arrival("b", [item(2), item(3)])
    service.release_all()
    assert service.stats()["held_bytes"] == 0 and service.held_keys() == set()


def test_a_prefill_blocked_past_the_wait_bound_falls_back_to_sglangs_method(make_service, caplog):
    """Issue 8 item 10 / issue 11: a hung or slow tower never holds the scheduler thread unbounded."""
    service = make_service(prefill_wait_s=0.2)
    service.tower.gate.clear()
    service.on_arrival("r", [item(4)])
    _eventually(service.tower.in_forward.is_set, "the tower to hang")
    calls = []
    started = time.monotonic()
    got = service.encode([item(4)], original=lambda items: calls.append(items) or "sglang's own")
    elapsed = time.monotonic() - started
    assert got == "sglang's own" and len(calls) == 1
    assert service.counts["wait_timeouts"] == 1
    # The bound: the 0.2 s wait, then the tower lock that the hung forward holds is overridden once it has
    # been held 0.2 s in all. Generous margin for a loaded machine; an unbounded wait would take the 30 s gate.
    assert 0.2 <= elapsed < 2.0, f"the prefill blocked {elapsed:.2f} s (bound 0.2 s + margin)"
    assert service.stats()["exclusive_overrides"] == 1
    assert "the model's own method runs beside it" in caplog.text
    service.encode([item(4)], original=lambda items: "sglang's own")  # a second time: counted again
    assert service.counts["wait_timeouts"] == 2


def test_a_wait_whose_deadline_has_passed_gives_up_at_once(make_service):
    import concurrent.futures

    service = make_service()
    never_done: concurrent.futures.Future = concurrent.futures.Future()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        service._wait(never_done, deadline=time.perf_counter() - 1.0)
    assert time.monotonic() - started < 0.5


def _hold_the_tower_with_a_queue_behind(service) -> None:
    """One forward held in the tower, 30 single-item requests queued behind it."""
    service.tower.gate.clear()
    service.on_arrival("busy", [item(100)])
    _eventually(service.tower.in_forward.is_set, "the tower to be busy")
    for n in range(30):
        service.on_arrival(f"q{n}", [item(200 + n)])


def test_a_queued_item_a_prefill_needs_jumps_the_queue(make_service):
    """Issue 8 item 10: units behind a long queue are dispatched first when prefill needs them."""
    service = make_service()
    _hold_the_tower_with_a_queue_behind(service)
    service.on_arrival("needed", [item(7)])
    prefill = threading.Thread(target=service.encode, args=([item(7)], never))
    prefill.start()
    try:
        _eventually(lambda: service.stats()["expedited_units"] == 1, "the prefill to expedite its unit")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; service {service.stats()}; forwarded {service.tower.forwarded}") from None
    service.tower.gate.set()
    prefill.join(30)
    assert service.tower.forwarded[:2] == [(100, 0), (7, 0)], service.tower.forwarded  # next after the busy one


def test_sglangs_own_method_never_runs_during_a_coalescer_forward(make_service):
    """Issue 8 item 11: one tower, one user at a time."""
    service = make_service(prefill_wait_s=30.0)  # the lock wait yields to a hang only after 30 s: not in this test
    service.tower.gate.clear()
    service.on_arrival("r", [item(5)])
    _eventually(service.tower.in_forward.is_set, "the tower to be busy")
    precomputed = SimpleNamespace(**{**vars(item(6)), "precomputed_embeddings": torch.zeros(1)})
    overlapped = []

    def original(items):
        overlapped.append(service.tower.in_forward.is_set())
        return "sglang's own"

    fallback, result = _start_thread(service.encode, [precomputed], original)
    _wait_until_blocked(fallback, "held", "service.py", "SGLang's method to wait for the tower lock")
    assert overlapped == []  # it has not run beside the forward
    service.tower.gate.set()
    fallback.join(30)
    assert result == {"value": "sglang's own"} and overlapped == [False]
    assert service.stats()["exclusive_overrides"] == 0


def test_an_inline_encode_that_read_idle_just_before_a_forward_began_waits_for_it(make_service, monkeypatch):
    """``inline_when_idle`` reads the coalescer's state without a lock (racy by design): a forward may start right
    after. The inline encode must then wait for the tower, not run beside that forward."""
    service = make_service(prefill_wait_s=30.0, inline_when_idle=True)
    service.tower.gate.clear()
    service.on_arrival("r", [item(5)])
    _eventually(service.tower.in_forward.is_set, "the tower to be busy")
    monkeypatch.setattr(service, "_idle", lambda: True)  # what a read just before that forward saw
    overlapped = []

    def original(items):
        overlapped.append(service.tower.in_forward.is_set())
        return torch.cat([it.feature.sum(dim=-1, keepdim=True) for it in items])

    inline, result = _start_thread(service.encode, [item(6)], original)
    _wait_until_blocked(inline, "held", "service.py", "the inline encode to wait for the tower lock")
    assert overlapped == []
    service.tower.gate.set()
    inline.join(30)
    assert torch.equal(result["value"], expected(6)) and overlapped == [False]
    assert service.stats()["inline"] == 1 and service.stats()["exclusive_overrides"] == 0


def test_live_rids_reads_every_queue_a_scheduler_keeps_requests_in():
    from mm_scheduler_sglang.sglang_plugin import live_rids
    from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
    from sglang.srt.sampling.sampling_params import SamplingParams

    def req(rid):
        return Req(rid, "", array("i", [1, 2]), SamplingParams(max_new_tokens=1))

    scheduler = SimpleNamespace(
        waiting_queue=[req("w")], running_batch=ScheduleBatch(reqs=[req("run")]),
        last_batch=ScheduleBatch(reqs=[req("last")]), chunked_req=req("chunk"),
        disagg_prefill_bootstrap_queue=SimpleNamespace(queue=[req("boot")]),
        disagg_prefill_inflight_queue=[req("inflight")])
    assert live_rids(scheduler) == {"w", "run", "last", "chunk", "boot", "inflight"}
    scheduler.last_batch = scheduler.chunked_req = None  # nothing there now (a unified server, between batches)
    assert live_rids(scheduler) == {"w", "run", "boot", "inflight"}  # the holders after them are still read


# --- behaviours a one-line bug broke with every test passing (issue 18) ----------------------------
def test_a_request_with_an_item_deferred_by_the_cap_is_not_ready(make_service):
    """``ready`` (what ``defer_prefill_ms`` asks) must count a deferred item as unfinished: it is not even queued."""
    service = make_service(max_held_bytes=ROWS * 4 * 2)  # room for two results
    service.on_arrival("a", [item(1)])
    service.on_arrival("b", [item(2), item(3)])  # item 3 does not fit: deferred
    assert service.stats()["deferred_items"] == 1
    _eventually(lambda: service.ready("a"), "a's result to be encoded")
    _eventually(lambda: service._held_handle(item(2)).done(), "b's first result to be encoded")
    assert not service.ready("b"), "b has an item deferred by the cap, yet ready() says True"
    service.release("a")  # room: item 3 is admitted and encoded
    _eventually(lambda: service.ready("b"), "b to be ready once its deferred item was admitted and encoded")
    assert service.counts["admitted"] == 1


def test_the_held_bytes_and_deferred_items_gauges_follow_the_cap(make_service):
    """What an operator watches to see how far the encoder runs ahead (and whether the cap binds)."""
    from mm_scheduler_sglang.service import DEFERRED_ITEMS, HELD_BYTES

    service = make_service(max_held_bytes=ROWS * 4 * 2)  # room for two results
    held, deferred = HELD_BYTES.labels(service.config.name), DEFERRED_ITEMS.labels(service.config.name)
    service.on_arrival("a", [item(1)])
    service.on_arrival("b", [item(2), item(3)])  # item 3 does not fit: deferred
    assert (held._value.get(), deferred._value.get()) == (ROWS * 4 * 2, 1)
    service.release("a")  # room: item 3 is admitted
    assert (held._value.get(), deferred._value.get()) == (ROWS * 4 * 2, 0)
    service.release("b")
    assert (held._value.get(), deferred._value.get()) == (0, 0)


def test_a_prefill_chunk_ending_at_an_items_last_token_keeps_its_result_for_the_next_chunk(make_service):
    """Offsets are inclusive and ``prefilled_upto`` (SGLang's ``extend_end``) is exclusive: a chunk ending at
    the item's last offset has not embedded that token yet, so the next chunk needs the result again."""
    service = make_service()
    image = item(5, start=6, end=10)  # tokens 6..10
    service.on_arrival("r", [image])
    assert torch.equal(service.encode([image], original=never), expected(5))  # first chunk: tokens < 10
    service.consumed("r", [image], prefilled_upto=10)
    assert service.held_keys() == {("image", 5)}, "freed one token early"
    assert torch.equal(service.encode([image], original=never), expected(5))  # the chunk with token 10
    assert service.counts["taken_early"] == 2 and service.counts["encoded_on_demand"] == 0
    assert service.tower.forwarded == [(5, 0)]  # encoded once
    service.consumed("r", [image], prefilled_upto=11)
    assert service.held_keys() == set() and service.held_bytes == 0


def test_a_queued_video_a_prefill_needs_jumps_the_queue_frame_by_frame(make_service):
    """The coalescer queues a video as ``(key, frame)`` units: expedite keys must carry the frame index."""
    service = make_service(tower=VideoSumTower())
    _hold_the_tower_with_a_queue_behind(service)
    clip = video(7, frames=3)
    service.on_arrival("needed", [clip])
    prefill, result = _start_thread(service.encode, [clip], never)
    _eventually(lambda: service.stats()["expedited_units"] == 3, "the prefill to expedite the video's 3 frames",
                timeout=10)
    service.tower.gate.set()
    prefill.join(30)
    assert torch.equal(result["value"], torch.full((3 * ROWS, 1), 3.0 * 7))
    frames = [((7, 0), f) for f in range(3)]
    assert service.tower.forwarded[1:4] == frames, service.tower.forwarded  # right after the busy forward


def test_an_on_demand_encode_after_a_failed_early_encode_keeps_the_first_deadline(make_service):
    """The prefill's wait is bounded once, by ``prefill_wait_s`` from its start: an early result withdrawn
    half-way must not restart the clock for the on-demand encode (up to twice the bound otherwise)."""
    wait_s = 2.0
    service = make_service(prefill_wait_s=wait_s)
    service.tower.gate.clear()  # forwards hang: the on-demand encode can only time out
    service.on_arrival("busy", [item(99)])
    _eventually(service.tower.in_forward.is_set, "the tower to be busy")
    service.on_arrival("holder", [item(7)])  # queued behind the hung forward
    fell_back: list[float] = []
    service._own_method = lambda items, original, source: fell_back.append(time.monotonic()) or "sglang's own"
    started = time.monotonic()
    prefill, result = _start_thread(service.encode, [item(7)], never)
    _wait_until_blocked(prefill, "_wait", "service.py", "the prefill to wait for the early result")
    time.sleep(wait_s / 2)  # half the bound spent waiting: the scenario, not a synchronisation
    assert not fell_back, "the wait bound passed before the early result was withdrawn: inconclusive"
    service.release("holder", aborted=True)  # withdraws the early encode: the prefill encodes on demand
    prefill.join(4 * wait_s)
    assert result == {"value": "sglang's own"} and service.counts["wait_timeouts"] == 1
    assert service.stats()["requests"] == 3  # busy, holder, and the on-demand encode
    took = fell_back[0] - started
    # Right: about wait_s. The bug: at least wait_s / 2 + wait_s. Margin for a loaded machine in between.
    assert took < wait_s * 1.25, f"the prefill blocked {took:.2f} s: its deadline restarted (bound {wait_s} s)"


class FailsOnHashOne(SumTower):
    def forward(self, units):
        if any(u.key[0] == 1 for u in units):
            raise RuntimeError("the tower failed on item 1")
        return super().forward(units)


def test_a_failed_on_demand_encode_withdraws_the_other_items_it_queued_in_lockstep(make_service):
    """A CI soak ended with 2 units queued for good: a prefill's on-demand encode failed on one item and fell back,
    and the items it had queued after it stayed in the lockstep queue, which only a prefill ever runs."""
    config = CoalescerConfig(budget_bytes=1 << 20, max_batch_items=1, bytes_per_patch=64)  # one item a forward
    service = make_service(tower=FailsOnHashOne(), config=config, lockstep=True)
    fell_back = []
    got = service.encode([item(1), item(2), item(3)], lambda items: fell_back.append(items) or "sglang's own")
    assert got == "sglang's own" and len(fell_back) == 1
    assert service.stats()["pending_units"] == 0 and service.tower.forwarded == []


def test_an_on_demand_encode_jumps_the_queue(make_service):
    """``encode(..., urgent=True)``: an item a prefill encodes on demand goes before everything queued."""
    service = make_service()
    _hold_the_tower_with_a_queue_behind(service)
    prefill, result = _start_thread(service.encode, [item(7)], never)  # never arrived: encoded on demand
    _eventually(lambda: service.stats()["pending_units"] == 31, "the on-demand unit to be queued")
    _eventually(lambda: service.stats()["expedited_units"] == 1, "the on-demand unit to be queued as urgent",
                timeout=5)
    service.tower.gate.set()
    prefill.join(30)
    assert torch.equal(result["value"], expected(7)) and service.counts["encoded_on_demand"] == 1
    assert service.tower.forwarded[:2] == [(100, 0), (7, 0)], service.tower.forwarded


# --- contracts that mutation testing showed unchecked ------------------------------------------------
def test_queue_keys_name_each_keyed_unit_and_every_frame_of_a_video():
    from mm_scheduler_sglang.service import _queue_keys

    units = [EncodeItem(torch.zeros(2, 3), 2, "image", None), EncodeItem(torch.zeros(2, 3), 2, "image", "a"),
             EncodeItem(torch.zeros(3, 5, 2), 5, "video", "v")]  # 3 frames of 5 rows
    assert _queue_keys(units) == ["a", ("v", 0), ("v", 1), ("v", 2)]


def test_close_fails_queued_work_and_stops_the_loop_thread():
    from mm_scheduler import CoalescerClosedError

    config = CoalescerConfig(budget_bytes=1 << 20, max_batch_items=16, bytes_per_patch=64)
    service = EncoderService(SumTower(), config, lockstep=False).start()  # closed here, not by the fixture
    service.tower.gate.clear()
    service.on_arrival("busy", [item(1)])
    _eventually(service.tower.in_forward.is_set, "the tower to be busy")
    service.on_arrival("queued", [item(2)])
    queued = service._held_handle(item(2))
    closing, _ = _start_thread(service.close)
    _eventually(queued.done, "close to fail the queued work while the forward still runs")
    with pytest.raises(CoalescerClosedError):
        queued.result()
    service.tower.gate.set()  # the running batch finishes, then close returns
    closing.join(30)
    assert not closing.is_alive() and not service._loop.thread.is_alive()
    assert service.held_keys() == set()


def test_a_second_close_returns_at_once_and_later_submissions_are_refused():
    from mm_scheduler import CoalescerClosedError

    config = CoalescerConfig(budget_bytes=1 << 20, max_batch_items=16, bytes_per_patch=64)
    service = EncoderService(SumTower(), config, lockstep=False).start()
    service.close()
    closing, _ = _start_thread(service.close)
    closing.join(5)  # the stopped loop never answers: a second close used to block for 60 s
    assert not closing.is_alive()
    with pytest.raises(CoalescerClosedError, match="closed"):
        service._submit(item(1))
    service.on_arrival("late", [item(3)])  # early encoding declines quietly; the prefill encodes on demand
    assert service.held_keys() == set()


def test_fallbacks_and_sources_are_counted_in_the_service_and_in_prometheus(make_service, caplog):
    from prometheus_client import REGISTRY

    tower = SumTower()
    config = CoalescerConfig(name="counted-sources", budget_bytes=1 << 20, max_batch_items=16, bytes_per_patch=64)
    service = EncoderService(tower, config, lockstep=False).start()
    try:
        def sample(source: str) -> float:
            labels = {"coalescer": "counted-sources", "source": source}
            return REGISTRY.get_sample_value("mm_coalescer_prefill_items_total", labels) or 0.0

        before = {source: sample(source) for source in ("early", "on_demand", "fallback")}
        precomputed = SimpleNamespace(**{**vars(item(6)), "precomputed_embeddings": torch.zeros(1)})
        own = lambda items: "sglang's own"  # noqa: E731
        assert service.encode([precomputed, precomputed], original=own) == "sglang's own"
        assert service.encode([precomputed], original=own) == "sglang's own"
        service.on_arrival("r", [item(1)])
        labels = {"coalescer": "counted-sources"}
        waited_before = REGISTRY.get_sample_value("mm_coalescer_prefill_wait_seconds_sum", labels) or 0.0
        started = time.perf_counter()
        service.encode([item(1), item(2)], original=never)  # one early, one on demand
        took = time.perf_counter() - started
        waited = REGISTRY.get_sample_value("mm_coalescer_prefill_wait_seconds_sum", labels) - waited_before
        assert 0.0 < waited <= took  # the time this call blocked, observed once
        service.encode([item(3)], original=never)  # on demand again
        assert service.counts["fallbacks"] == 2 and service.counts["encoded_on_demand"] == 2
        assert {s: sample(s) - before[s] for s in before} == {"early": 1.0, "on_demand": 2.0, "fallback": 3.0}
        assert service.stats()["mode"] == "async"
    finally:
        service.close()


def test_consumed_skips_items_without_a_hash_or_offsets_and_frees_the_rest(make_service):
    service = make_service()
    hashless = SimpleNamespace(**{**vars(item(1)), "hash": None})
    no_offsets = SimpleNamespace(**{**vars(item(2)), "offsets": []})
    passed = item(3, end=4)
    service.on_arrival("r", [no_offsets, passed])
    service.consumed("r", [hashless, no_offsets, passed], prefilled_upto=100)
    assert service.held_keys() == {("image", 2)}  # kept until release: it cannot tell where its tokens are


def test_sweeps_and_admissions_are_counted_across_calls(make_service):
    service = make_service(max_held_bytes=ROWS * 4)
    service.on_arrival("a", [item(1)])
    service.on_arrival("b", [item(2)])  # deferred
    service.on_arrival("c", [item(3)])  # deferred
    service.release("a")  # b admitted
    service.release("b")  # c admitted
    assert service.counts["admitted"] == 2
    service.on_arrival("d", [item(4)])
    service.sweep(set())
    assert service.sweep(set()) == 2  # c and d, absent from two sweeps running
    service.on_arrival("e", [item(20)])
    service.sweep(set())
    assert service.sweep(set()) == 1
    assert service.counts["swept"] == 3


def test_lockstep_withdrawal_counts_only_work_that_was_still_pending(make_service):
    service = make_service(lockstep=True)
    service.on_arrival("queued", [item(1)])
    service.release("queued", aborted=True)  # its ticket never ran
    assert service.counts["cancelled"] == 1
    service.on_arrival("done", [item(2)])
    service.encode([item(2)], original=never)  # runs the ticket
    service.release("done")
    assert service.counts["cancelled"] == 1 and service.counts["released"] == 2
    assert service.stats()["mode"] == "lockstep"


def test_a_lockstep_service_runs_with_its_config_and_agrees_every_batch_with_the_other_ranks():
    agreed: list[bool] = []
    config = CoalescerConfig(budget_bytes=1 << 20, max_batch_items=16, bytes_per_patch=64)
    service = EncoderService(SumTower(), config, lockstep=True,
                             agree=lambda failed: agreed.append(failed) or failed).start()
    try:
        assert service.budget_bytes == 1 << 20 and service.bytes_per_patch == 64
        service.on_arrival("r", [item(1)])
        assert torch.equal(service.encode([item(1)], original=never), expected(1))
        assert agreed and not any(agreed)  # asked once per batch, and nobody failed
    finally:
        service.close()


def test_the_async_backend_runs_on_a_named_daemon_thread_and_waits_two_seconds_by_default():
    config = CoalescerConfig(name="named", budget_bytes=1 << 20, max_batch_items=16, bytes_per_patch=64)
    service = EncoderService(SumTower(), config, lockstep=False).start()
    try:
        assert service._loop.thread.name == "mm-coalescer-named" and service._loop.thread.daemon
        assert service.prefill_wait_s == 2.0 and service.max_held_bytes == 1 << 30
    finally:
        service.close()


def test_arrival_skips_missing_hashless_and_foreign_items_and_counts_each_outcome(make_service):
    service = make_service(max_held_bytes=ROWS * 4 * 2)
    hashless = SimpleNamespace(**{**vars(item(1)), "hash": None})
    embedded = SimpleNamespace(**{**vars(item(2)), "precomputed_embeddings": torch.zeros(1)})
    service.on_arrival("a", [None, hashless, embedded, item(3), item(4)])
    assert service.held_keys() == {("image", 3), ("image", 4)} and service.counts["submitted"] == 2
    service.on_arrival("b", [item(3), item(4), item(5), item(6)])  # two shared, then the cap: two deferred
    assert service.counts["shared"] == 2 and service.counts["deferred"] == 2
    assert service.stats()["deferred_items"] == 2


def test_a_tower_without_its_own_result_key_shares_results_by_modality_and_hash():
    from mm_scheduler_sglang.service import result_key

    assert result_key(SimpleNamespace(), item(5)) == ("image", 5)
    assert result_key(SumTower(), item(5)) == ("image", 5)


class SlowUnitsTower(SumTower):
    """Preparing an item's units takes a few ms, as moving a real feature to the GPU does; records batches."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list] = []

    def units(self, item) -> list[EncodeItem]:
        time.sleep(0.005)
        return super().units(item)

    def forward(self, units):
        self.batches.append([u.key for u in units])
        return super().forward(units)


def test_a_lone_requests_images_reach_an_idle_coalescer_in_one_forward(make_service):
    """Submitted one by one, the first image of a lone request was dispatched alone (1 + 5 forwards)."""
    tower = SlowUnitsTower()
    service = make_service(tower=tower)
    items = [item(h) for h in range(1, 7)]
    service.on_arrival("lone", items)
    assert torch.equal(service.encode(items, original=never), expected(*range(1, 7)))
    assert [sorted(batch) for batch in tower.batches] == [[(h, 0) for h in range(1, 7)]]


def test_items_encoded_on_demand_reach_an_idle_coalescer_in_one_forward(make_service):
    tower = SlowUnitsTower()
    service = make_service(tower=tower)
    items = [item(h) for h in range(1, 5)]
    assert torch.equal(service.encode(items, original=never), expected(*range(1, 5)))
    assert [sorted(batch) for batch in tower.batches] == [[(h, 0) for h in range(1, 5)]]
    assert service.counts["encoded_on_demand"] == 4


def test_an_early_encode_withdrawn_before_the_loop_started_it_never_reaches_the_tower(make_service):
    """A handle cancelled while its submission is still held back is dropped, not run."""
    tower = SlowUnitsTower()
    service = make_service(tower=tower)
    with service._loop.together():
        handle = service._submit(item(9))
        assert handle.cancel()
    service.on_arrival("after", [item(10)])
    assert torch.equal(service.encode([item(10)], original=never), expected(10))
    assert tower.batches == [[(10, 0)]]


def test_a_submission_withdrawn_before_the_loop_started_it_does_not_hold_back_the_others_submitted_with_it():
    from mm_scheduler_sglang.service import LoopThread

    loop = LoopThread("mm-coalescer-test-together")
    ran: list[int] = []

    async def job(n: int) -> int:
        ran.append(n)
        return n

    try:
        with loop.together():
            withdrawn, second, third = (loop.submit(job(n)) for n in (1, 2, 3))
            assert withdrawn.cancel()
        assert (second.result(timeout=10), third.result(timeout=10)) == (2, 3)
        assert withdrawn.cancelled() and ran == [2, 3]
    finally:
        loop.stop()


def test_close_after_a_start_that_could_not_build_the_coalescer_returns_quietly(monkeypatch):
    from mm_scheduler_sglang import service as service_module

    def no_coalescer(*args, **kwargs):
        raise RuntimeError("the coalescer could not be built")

    monkeypatch.setattr(service_module, "Coalescer", no_coalescer)
    config = CoalescerConfig(budget_bytes=1 << 20, max_batch_items=16, bytes_per_patch=64)
    service = EncoderService(SumTower(), config, lockstep=False)
    with pytest.raises(RuntimeError, match="could not be built"):
        service.start()
    assert not service._loop.thread.is_alive()  # start stopped its loop thread
    service.close()  # the shutdown path still runs: nothing to drain, nothing held
    assert service.held_keys() == set()


def test_enqueued_handover_serves_early_and_on_demand_items_like_complete(make_service):
    """``handover: enqueued`` reaches the service through the coalescer config: held results and on-demand
    encodes come back as ``Encoded`` (nothing to wait for on CPU) and assemble exactly as with ``complete``."""
    service = make_service(config=CoalescerConfig(budget_bytes=1 << 20, max_batch_items=16, bytes_per_patch=64,
                                                  handover="enqueued"))
    early, on_demand = item(3), item(4)
    service.on_arrival("r1", [early])
    got = service.encode([early, on_demand], original=never)
    assert torch.equal(got, expected(3, 4))
    assert service.stats()["taken_early"] == 1 and service.stats()["encoded_on_demand"] == 1


class _PinnedHostFeature(torch.Tensor):
    """Stands for pinned host memory (which needs a CUDA driver to allocate): where SGLang offloads a feature."""

    def is_pinned(self, *_args, **_kwargs) -> bool:
        return True


def test_a_feature_sglang_offloaded_to_pinned_memory_is_left_to_its_prefill_at_admission_and_arrival(make_service):
    """SGLang's non-blocking copy into pinned memory may still be landing when an early encode would read it;
    its prefill path waits for that copy, so the item is encoded on demand there instead."""
    service = make_service(max_held_bytes=ROWS * 4)  # room for one result
    first, deferred, offloaded = item(1), item(2), item(3)
    service.on_arrival("r1", [first, deferred])
    assert service.counts["submitted"] == 1 and service.counts["deferred"] == 1
    deferred.feature = deferred.feature.as_subclass(_PinnedHostFeature)  # SGLang offloaded it while it waited
    service.consumed("r1", [first], prefilled_upto=1 << 20)  # frees room: the deferred item's turn
    assert service.counts["left_offloaded"] == 1 and service.counts["admitted"] == 0
    offloaded.feature = offloaded.feature.as_subclass(_PinnedHostFeature)
    service.on_arrival("r2", [offloaded])
    assert service.counts["left_offloaded"] == 2 and service.counts["submitted"] == 1
    got = service.encode([deferred, offloaded], original=never)
    assert torch.equal(got, expected(2, 3)) and service.counts["encoded_on_demand"] == 2

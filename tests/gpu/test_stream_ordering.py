"""CUDA ordering and memory lifetime of the plugin's service, in SGLang's stream layout (needs a GPU).

SGLang 0.5.23's scheduler thread never runs on the default stream: its loop runs inside
``schedule_stream`` (priority 0), prefill forwards on ``forward_stream``, features reach the GPU with
``non_blocking=True`` right before ``get_*_feature`` and CUDA-IPC features are rebuilt on the
schedule stream. Each test recreates that layout with a *slow producer*: a long kernel chain queued
ahead of the write that matters, so a consumer that does not wait for the right event reads stale
memory. Memory is recycled aggressively (churn allocations, encoder batches of other requests)
and every scenario repeats many times. A control run with the ordering removed must read stale
data at least once (else it skips as inconclusive), showing the scenario can catch the bug.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from mm_scheduler_sglang.adapters import SGLangTower
from mm_scheduler_sglang.service import EncoderService

from mm_scheduler import CoalescerConfig, EncodeItem

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

REPS = 20
ROW = 64  # pixels per patch row


def _busy(stream: torch.cuda.Stream, n: int = 12, size: int = 3072) -> None:
    """Queue ~tens of ms of work on ``stream`` (the slow producer/consumer)."""
    with torch.cuda.stream(stream):
        x = torch.randn(size, size, device="cuda")
        for _ in range(n):
            x = torch.tanh(x @ x)


class RowSumTower(SGLangTower):
    """Output row r of a unit = 2 * sum(pixels[r]); an item of ``frames`` > 1 is several units
    assembled with ``torch.cat`` on the consumer's stream (like Gemma3 crops or video frames)."""

    ragged = True
    bytes_per_patch = 4096

    def __init__(self) -> None:
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.model = torch.nn.Linear(1, 1).to(self.device)
        self.forwards = 0

    def _raw_pixels(self, item, shape=None) -> bool:
        return True

    def result_key(self, item):
        return ("image", item.hash, tuple(item.feature.shape))

    def output_bytes(self, item) -> int:
        return item.feature.shape[0] * item.feature.shape[1] * 4

    def units(self, item) -> list[EncodeItem]:
        return [EncodeItem(frame, frame.shape[0], "image", (item.hash, i)) for i, frame in enumerate(item.feature)]

    def forward(self, units):
        self.forwards += 1
        busy = torch.randn(2048, 2048, device=self.device)
        for _ in range(6):  # the encoder stream is slow too: outputs land late
            busy = torch.tanh(busy @ busy)
        return [unit.pixel_values.to(self.device, non_blocking=True).sum(dim=-1, keepdim=True) * 2.0
                for unit in units]


def _item(hash_value: int, frames: int, rows: int, feature: torch.Tensor | None = None, end: int = 10):
    feature = torch.full((frames, rows, ROW), float(hash_value)) if feature is None else feature
    return SimpleNamespace(modality=SimpleNamespace(name="IMAGE"), hash=hash_value, feature=feature,
                           precomputed_embeddings=None, offsets=[(0, end)], model_specific_data={})


def _expected(hash_value: int, frames: int, rows: int) -> torch.Tensor:
    return torch.full((frames * rows, 1), 2.0 * ROW * hash_value)


def _run_on_scheduler_thread(fn):
    """Run ``fn`` on a fresh thread whose current stream is a priority-0 'schedule_stream', like SGLang."""
    result: dict = {}

    def body():
        schedule_stream = torch.cuda.Stream(priority=0)
        with torch.cuda.stream(schedule_stream):
            try:
                result["value"] = fn(schedule_stream)
            except BaseException as exc:  # re-raised on the test thread
                result["error"] = exc

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "scheduler thread hung"
    if "error" in result:
        raise result["error"]
    return result["value"]


def _service(lockstep: bool = False) -> EncoderService:
    config = CoalescerConfig(budget_bytes=1 << 30, max_batch_items=64, bytes_per_patch=4096)
    return EncoderService(RowSumTower(), config, lockstep=lockstep).start()


def _late_gpu_pixels(stream: torch.cuda.Stream, value: float, frames: int, rows: int) -> torch.Tensor:
    """Pixels written on ``stream`` behind a long kernel chain, into recycled memory holding -1s."""
    stale = torch.full((frames, rows, ROW), -1.0, device="cuda")
    del stale  # the next allocation of this size gets these -1s back
    source = torch.full((frames, rows, ROW), value).pin_memory()
    _busy(stream)
    with torch.cuda.stream(stream):
        return source.to("cuda", non_blocking=True)


@pytest.mark.parametrize("path", ["prefill_on_demand", "arrival"])
def test_encoder_waits_for_inputs_produced_on_the_callers_stream(path):
    """Issue 8 item 3: pixels moved non_blocking on forward_stream (prefill) or rebuilt on
    schedule_stream (arrival) must be read only after they land."""
    service = _service()
    try:
        def scenario(schedule_stream):
            forward_stream = torch.cuda.Stream(priority=0)
            wrong = 0
            for rep in range(REPS):
                value = float(rep + 1)
                if path == "arrival":
                    item = _item(1000 + rep, 2, 32, _late_gpu_pixels(schedule_stream, value, 2, 32))
                    service.on_arrival(f"r{rep}", [item])
                    with torch.cuda.stream(forward_stream):
                        forward_stream.wait_stream(schedule_stream)
                        got = service.encode([item], original=lambda _: pytest.fail("fell back"))
                else:
                    item = _item(1000 + rep, 2, 32, _late_gpu_pixels(forward_stream, value, 2, 32))
                    with torch.cuda.stream(forward_stream):
                        got = service.encode([item], original=lambda _: pytest.fail("fell back"))
                host = got.cpu()
                service.release(f"r{rep}")
                wrong += not torch.equal(host, torch.full((64, 1), 2.0 * ROW * value))
            return wrong

        assert _run_on_scheduler_thread(scenario) == 0
    finally:
        service.close()


@pytest.mark.parametrize("lockstep", [False, True])
def test_multi_unit_results_assembled_on_a_busy_consumer_stream_are_not_overwritten(lockstep):
    """Issue 8 items 4 and 14: the consumer's torch.cat runs late on its busy stream while the held
    result is released at once (consumed) and later encoder batches recycle memory."""
    service = _service(lockstep)
    try:
        def scenario(schedule_stream):
            forward_stream = torch.cuda.Stream(priority=0)
            wrong = 0
            for rep in range(REPS):
                frames, rows = 4, 16 + rep
                item = _item(5000 + rep, frames, rows)
                service.on_arrival(f"r{rep}", [item])
                _busy(forward_stream, n=16)  # the consumer stream is far behind
                with torch.cuda.stream(forward_stream):
                    got = service.encode([item], original=lambda _: pytest.fail("fell back"))
                    service.consumed(f"r{rep}", [item], prefilled_upto=1 << 30)  # frees the held result now
                    churn_items = [_item(90_000 + rep * 10 + k, 4, rows) for k in range(4)]
                    service.on_arrival(f"churn{rep}", churn_items)  # encoder batches reuse freed blocks
                    service.encode(churn_items, original=lambda _: pytest.fail("fell back"))
                    service.release(f"churn{rep}")
                    filler = [torch.full((1 << 18,), 7.0, device="cuda") for _ in range(16)]
                    host = got.cpu()
                del filler
                wrong += not torch.equal(host, _expected(5000 + rep, frames, rows))
            return wrong

        assert _run_on_scheduler_thread(scenario) == 0
        assert service.stats()["held_bytes"] == 0
    finally:
        service.close()


class VideoRowSumTower(RowSumTower):
    """One video unit per item: the coalescer splits it into frames and joins their outputs on its own thread."""

    def units(self, item) -> list[EncodeItem]:
        return [EncodeItem(item.feature, item.feature.shape[1], "video", item.hash)]


def _stale_reads(service: EncoderService, first_hash: int, frames: int, slow_stream: torch.cuda.Stream) -> int:
    """REPS encodes of a ``frames``-unit item, each read on SGLang's forward stream right after ``slow_stream`` was
    made far behind; how many reads came back wrong. Closes the service."""
    def scenario(schedule_stream):
        forward_stream = torch.cuda.Stream(priority=0)
        wrong = 0
        for rep in range(REPS):
            rows = 16 + rep
            item = _item(first_hash + rep, frames, rows)
            _busy(slow_stream, n=16)
            with torch.cuda.stream(forward_stream):
                got = service.encode([item], original=lambda _: pytest.fail("fell back"))
                host = got.cpu()
            wrong += not torch.equal(host, _expected(first_hash + rep, frames, rows))
        torch.cuda.synchronize()
        return wrong

    try:
        return _run_on_scheduler_thread(scenario)
    finally:
        service.close()


def _fixed_or_control(wrong: int, fixed: bool, what: str) -> None:
    """The fixed path reads nothing stale; its control must read stale data at least once, else it skips."""
    if fixed:
        assert wrong == 0
    elif wrong == 0:
        pytest.skip(f"inconclusive: 0/{REPS} {what} were read stale on this GPU")
    else:
        assert 0 < wrong <= REPS


@pytest.mark.parametrize("joined_on_own_stream", [True, False], ids=["fixed", "control"])
def test_video_frames_joined_by_the_coalescer_are_complete_when_handed_over(monkeypatch, joined_on_own_stream):
    """The coalescer joins a video's frame outputs with torch.cat on its event-loop thread, whose current stream is
    the legacy default one; the consumer reads on SGLang's forward stream right away. With that default stream far
    behind (busy), a join left on it is read before it ran. The control keeps the join there."""
    from mm_scheduler import coalescer, units

    if not joined_on_own_stream:
        monkeypatch.setattr(coalescer, "join", lambda outputs, spans, _stream, events: (
            units.assemble(outputs, spans), tuple(events)))
    config = CoalescerConfig(budget_bytes=1 << 30, max_batch_items=64, bytes_per_patch=4096)
    service = EncoderService(VideoRowSumTower(), config, lockstep=False).start()
    wrong = _stale_reads(service, 7000, 4, torch.cuda.default_stream())  # the loop thread's stream
    _fixed_or_control(wrong, joined_on_own_stream, "joins left on the default stream")


@pytest.mark.parametrize("tower_cls", [RowSumTower, VideoRowSumTower], ids=["images", "video"])
@pytest.mark.parametrize("consumer_waits", [True, False], ids=["fixed", "control"])
def test_enqueued_handover_orders_the_consumer_after_the_encoder_stream(monkeypatch, tower_cls, consumer_waits):
    """``handover: enqueued``: results go out while the encoder stream (made far behind here) still writes them;
    the consumer's stream must wait for ``Encoded.events`` (for a video, the join's too, which itself waits for
    the frames). The control drops that wait."""
    from mm_scheduler import Encoded

    if not consumer_waits:
        monkeypatch.setattr(Encoded, "wait", lambda self, stream=None: None)
    config = CoalescerConfig(budget_bytes=1 << 30, max_batch_items=64, bytes_per_patch=4096, handover="enqueued")
    service = EncoderService(tower_cls(), config, lockstep=False).start()
    wrong = _stale_reads(service, 8000, 3, service._coalescer._executor.stream)
    _fixed_or_control(wrong, consumer_waits, "reads without the wait")


def test_control_without_ordering_reads_stale_pixels():
    """The control: proves the scenario above can catch a missing wait on this GPU.

    The same late write, read on another stream with no event: some reads must come back stale. If
    none does, the slow producer was not slow enough here and the ordering tests prove nothing: the
    control then skips as inconclusive (reported with ``-rs``), it never passes silently.
    """
    stream, reader = torch.cuda.Stream(), torch.cuda.Stream()
    wrong = 0
    for rep in range(REPS):
        pixels = _late_gpu_pixels(stream, float(rep + 1), 2, 32)
        with torch.cuda.stream(reader):
            host = (pixels.sum(dim=-1) * 2).cpu()
        wrong += not torch.equal(host, torch.full((2, 32), 2.0 * ROW * (rep + 1)))
    print(f"control: {wrong}/{REPS} reads without a wait were stale")
    if wrong == 0:
        pytest.skip(f"inconclusive: 0/{REPS} reads without a wait were stale, so the stream-ordering tests "
                    "in this file could not have caught a missing wait on this GPU")
    assert 0 < wrong <= REPS


def test_llm_streams_are_created_at_high_priority_while_the_scheduler_starts():
    from mm_scheduler_sglang.sglang_plugin import llm_streams_at_high_priority

    _least, greatest = torch.cuda.Stream.priority_range()
    with llm_streams_at_high_priority(enabled=True):
        inside = torch.cuda.Stream(priority=0)
        inside_default = torch.cuda.Stream()
    after = torch.cuda.Stream(priority=0)
    assert inside.priority == greatest and inside_default.priority == greatest
    assert after.priority == 0


class PinnedHostTower:
    """Like EPD's tower: a batch's outputs are views of ONE pinned host buffer that a non-blocking
    device-to-host copy fills; they are valid only once the batch's completion event fires."""

    ragged = True
    bytes_per_patch = 4096
    device = "cuda"

    def forward(self, units):
        device = torch.device("cuda", torch.cuda.current_device())
        rows = [u.pixel_values.to(device, non_blocking=True).sum(dim=-1, keepdim=True) * 2.0 for u in units]
        busy = torch.randn(2048, 2048, device=device)
        for _ in range(8):
            busy = torch.tanh(busy @ busy)
        packed = torch.cat(rows) + busy[0, 0] * 0  # lands after the busy chain
        host = torch.zeros(packed.shape, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        return list(host.split([r.shape[0] for r in rows]))


async def _encode_many(co, batches):
    import asyncio

    return await asyncio.gather(*(co.encode(items) for items in batches))


@pytest.mark.parametrize("handover", ["complete", "enqueued"])
def test_host_views_filled_by_a_pending_copy_are_delivered_only_after_it_lands(handover):
    """With ``handover: enqueued`` too: a host output cannot be waited for by a stream, so it goes out complete."""
    import asyncio

    from mm_scheduler import Coalescer

    config = CoalescerConfig(budget_bytes=1 << 30, max_batch_items=64, handover=handover)

    async def run():
        async with Coalescer(PinnedHostTower(), config) as co:
            wrong = 0
            for rep in range(REPS):
                batches = [[EncodeItem(torch.full((8 + k, ROW), float(rep * 10 + k)), 8 + k)] for k in range(6)]
                outs = await _encode_many(co, batches)
                for k, (out,) in enumerate(outs):
                    wrong += not torch.equal(out, torch.full((8 + k, 1), 2.0 * ROW * (rep * 10 + k)))
            return wrong

    assert asyncio.run(run()) == 0

"""The ViT CUDA graphs of Gemma 4 and Gemma3 (integration/uniform_graphs.py) on real tiny SGLang models on CUDA, with
SGLang's triton vision attention (the real-server harness uses it) and, for Gemma3, its SDPA one.

What would fail if the graphs were wrong:
* batches of other images in one graph, and a batch padded with padding images: a replay that kept an earlier
  batch's inputs, or let a padding image reach a real one, differs from SGLang's own ``get_image_feature``;
* a result read after the next replay: a view of the graph's memory instead of a copy;
* Gemma 4's read-out (a boolean mask index waits for the tower), replayed or eager, spinning a core instead of
  sleeping; Gemma3's crops in host memory copied with a stream synchronize (the forward thread waiting for every
  batch ahead of it on the stream);
* SGLang's cached ``cu_seqlens`` dropped from its ``lru_cache`` after capture: the graph would read freed memory
  that later allocations overwrite (the graphs hold it, the very tensor SGLang looks up);
* a copy-out that raises after the replay was queued: the guard's event must still follow the replay;
* a batch from a second thread while the first thread's replay waits behind a long kernel: it must be declined
  (run eagerly), not overwrite the first one's inputs;
* the adapter: runs cut to the captured sizes, and every output equal to SGLang's own method;
* the idle path (``encode_now``, on the scheduler's thread under ``no_grad``): a replay that did not run on the
  caller's stream would read pixels the caller's stream has not written yet;
* Gemma3 (SigLIP crops), on the triton and on the SDPA vision attention: a padded batch and a kept result against
  SGLang's own method, and the idle path on the caller's stream. On SDPA the padding crop shares the batch with
  real ones, so a capture that let it reach them, or that kept SGLang's ``flatten_batch`` (one crop a forward,
  asserted), fails here.

Run: ``python -m pytest -q tests/gpu/test_uniform_graphs_cuda.py``.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))  # sglang_models: tiny real SGLang models

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("sglang")

from mm_scheduler_sglang.adapters import Gemma3Tower, Gemma4Tower
from mm_scheduler_sglang.uniform_graphs import Gemma4VisionGraphs

from mm_scheduler import EncodeItem

from ..core.helpers import calibrated_sleep, cpu_share, require_spinning_default_wait
from .cuda_helpers import BF16_TOL, rel_err, tiny_on_cuda

pytestmark = pytest.mark.gpu
SIZES = [1, 2, 3]
TOL = 1e-3  # float32 model: padded GEMM shapes differ from eager in the last bits; a wrong input is O(1)


@pytest.fixture
def captured():
    model = tiny_on_cuda("gemma4")
    tower = Gemma4Tower(model)
    assert Gemma4VisionGraphs.why_not(model) is None
    line = tower.use_graphs([tower.image_patches * b for b in SIZES], tp_size=1)
    assert line.startswith("ViT CUDA graphs captured for batches of [1, 2, 3] images"), line
    return model, tower, tower.graphs


def _images(model, tower, grids, seed):
    import sglang_models

    items = [sglang_models.gemma4_image(model, gh, gw, tower.image_patches, seed + i)
             for i, (gh, gw) in enumerate(grids)]
    for item in items:
        item.feature = item.feature.cuda()
    return items


def _inputs(items):
    return (torch.cat([item.feature for item in items]),
            torch.cat([item.model_specific_data["image_position_ids"] for item in items]).cuda())


# One image; two of other sizes (the 2 graph); two again, in the 3 graph's padding (graph 2 dropped below).
BATCHES = [[(8, 8)], [(4, 12), (28, 40)], [(12, 12), (6, 10)]]


@torch.inference_mode()
def test_batches_of_other_images_and_padded_batches_match_sglangs_own_method(captured):
    model, tower, graphs = captured
    outcomes: list[bool] = []
    graphs.on_forward = outcomes.append
    for seed, grids in enumerate(BATCHES):
        if seed == 2:
            graphs._batches = [b for b in graphs._batches if b.images != 2]  # two images padded to three
        items = _images(model, tower, grids, 10 * seed)
        out = graphs.run(*_inputs(items))
        assert out is not None and len(out) == len(items)
        assert rel_err(torch.cat(out), model.get_image_feature(items)) < TOL
    assert graphs.replays == len(BATCHES) and outcomes == [True] * len(BATCHES)
    assert graphs.run(*_inputs(_images(model, tower, [(8, 8)] * 4, 40))) is None  # no graph of 4
    assert outcomes[-1] is False


@torch.inference_mode()
def test_a_result_is_not_overwritten_by_the_next_replay(captured):
    model, tower, graphs = captured
    kept = graphs.run(*_inputs(_images(model, tower, BATCHES[1], 50)))
    expected = [out.clone() for out in kept]
    graphs.run(*_inputs(_images(model, tower, BATCHES[1], 60)))
    torch.cuda.synchronize()
    for out, reference in zip(kept, expected, strict=True):
        torch.testing.assert_close(out, reference, rtol=0, atol=0)


@pytest.mark.parametrize("path", ["replay", "eager"])
@torch.inference_mode()
def test_gemma4s_read_out_waits_for_the_tower_asleep(captured, path):
    """The read-out (a boolean mask index) behind 0.3 s of queued work: the thread must sleep through it. The eager
    path's tower runs first, so that only the read-out's own wait is measured (not any inside SGLang's tower)."""
    model, tower, graphs = captured
    items = _images(model, tower, BATCHES[1], 55)
    inputs = _inputs(items)
    if path == "replay":
        read = lambda: graphs.run(*inputs)  # noqa: E731
    else:
        pooled, mask = model.vision_tower(*inputs)
        read = lambda: tower._projected(pooled, mask)  # noqa: E731
    cycles, _ = calibrated_sleep(0.3)
    require_spinning_default_wait(cycles)
    torch.cuda._sleep(cycles)  # queued ahead of the read-out on this stream
    out: list = []
    assert cpu_share(lambda: out.extend(read())) < 0.2  # the mask index alone would spin ~0.3 s
    assert rel_err(torch.cat(out), model.get_image_feature(items)) < TOL


@torch.inference_mode()
def test_the_segments_a_graph_reads_outlive_sglangs_cache_of_them(captured):
    import sglang.srt.layers.attention.vision as vision

    model, tower, graphs = captured
    items = _images(model, tower, BATCHES[1], 70)
    expected = model.get_image_feature(items)
    for batch in graphs._batches:  # the very tensor SGLang's attention looks up for this shape
        assert batch.segments is vision._get_cu_seqlens_for_shape(batch.images, graphs.patches,
                                                                  device=model.vision_tower.device)
    vision._get_cu_seqlens_for_shape.cache_clear()
    litter = [torch.full((4,), 7, dtype=torch.int32, device="cuda") for _ in range(256)]  # reuse freed small blocks
    out = graphs.run(*_inputs(items))
    assert rel_err(torch.cat(out), expected) < TOL
    del litter


@torch.inference_mode()
def test_a_replay_whose_copy_out_fails_still_keeps_another_stream_off_the_pool(captured):
    """The copy-out after a replay can raise (out of memory): the replay is queued all the same, so the event another
    stream checks must be recorded after it, or that stream would rewrite the inputs under the running replay."""
    model, tower, graphs = captured
    batch = next(b for b in graphs._batches if b.images == 2)
    projected, mask = batch.output
    batch.output = (projected, mask[:, :1])  # a mask of the wrong width: the gather raises after the replay
    before = graphs._last_replay
    with pytest.raises(IndexError):
        graphs.run(*_inputs(_images(model, tower, BATCHES[1], 75)))
    assert graphs._last_replay is not None and graphs._last_replay is not before
    assert graphs._last_stream == torch.cuda.current_stream()


class _SlowReplay:
    """A graph whose replay first runs a ~0.1 s kernel on the stream, and says when it has begun."""

    def __init__(self, graph: torch.cuda.CUDAGraph, begun: threading.Event) -> None:
        self.graph, self.begun = graph, begun

    def replay(self) -> None:
        self.begun.set()
        torch.cuda._sleep(200_000_000)
        self.graph.replay()


def test_a_batch_from_another_thread_runs_eagerly_while_a_replay_is_in_progress(captured):
    """Replays share one memory pool and one set of static inputs, and a Gemma 4 replay holds them until its
    mask has been read on the host. Batch a's replay sits behind a 0.1 s kernel on the coalescer's stream when
    batch b comes from another thread on another stream (an inline encode on the scheduler's): b must neither
    overwrite a's inputs nor wait behind it, so it is declined (the caller runs the tower); once a is done,
    b replays."""
    model, tower, graphs = captured
    begun = threading.Event()
    for batch in graphs._batches:
        batch.graph = _SlowReplay(batch.graph, begun)
    a, b = _images(model, tower, BATCHES[1], 80), _images(model, tower, BATCHES[1], 90)
    with torch.inference_mode():
        expected_a, expected_b = model.get_image_feature(a), model.get_image_feature(b)
    outputs = {}

    def coalescer() -> None:
        with torch.cuda.stream(torch.cuda.Stream()):
            outputs["a"] = graphs.run(*_inputs(a))

    torch.cuda.synchronize()
    thread = threading.Thread(target=coalescer)
    thread.start()
    assert begun.wait(timeout=30)
    with torch.cuda.stream(torch.cuda.Stream()):
        declined = graphs.run(*_inputs(b))
    thread.join(timeout=30)
    assert declined is None and graphs.replays == 1
    assert rel_err(torch.cat(outputs["a"]), expected_a) < TOL
    out_b = graphs.run(*_inputs(b))
    assert rel_err(torch.cat(out_b), expected_b) < TOL


@torch.inference_mode()
def test_the_adapter_cuts_a_batch_into_replays_of_the_captured_sizes(captured):
    model, tower, graphs = captured
    items = _images(model, tower, [(8, 8), (4, 12), (28, 40), (12, 12), (6, 10)], 100)
    units = [u for item in items for u in tower.units(item)]
    before = graphs.replays
    outputs = tower.forward(units)
    assert graphs.replays - before == 2  # 3 + 2
    assert rel_err(torch.cat(outputs), model.get_image_feature(items)) < TOL


@torch.no_grad()
def test_an_idle_prefills_replay_runs_on_the_callers_stream_after_the_work_queued_there(captured):
    """``encode_now`` runs where the scheduler calls it, under its ``no_grad``. The pixels of its items are written
    on the scheduler's stream behind a 0.1 s kernel, over NaNs: a replay on any other stream, or one not ordered
    after that copy, reads NaNs. Images of another patch count go to the model's own method."""
    model, tower, graphs = captured
    own_calls = []

    def own_method(items):
        own_calls.append(len(items))
        return model.get_image_feature(items)

    for grids, patches, replayed in ((BATCHES[1], tower.image_patches, True), ([(8, 8)], 64, False)):
        import sglang_models

        items = [sglang_models.gemma4_image(model, gh, gw, patches, 110 + i) for i, (gh, gw) in enumerate(grids)]
        sources = [item.feature.cuda() for item in items]
        expected = model.get_image_feature(items)
        for item, source in zip(items, sources, strict=True):
            item.feature = torch.full_like(source, float("nan"))
        scheduler = torch.cuda.Stream()
        torch.cuda.synchronize()
        replays, calls = graphs.replays, len(own_calls)
        with torch.cuda.stream(scheduler):
            torch.cuda._sleep(200_000_000)
            for item, source in zip(items, sources, strict=True):
                item.feature.copy_(source)
            out = tower.encode_now(items, own_method)
            consumed = out * 1  # what the prefill does next, on the same stream
        torch.cuda.synchronize()
        assert rel_err(consumed, expected) < TOL
        assert (graphs.replays - replays, len(own_calls) - calls) == ((1, 0) if replayed else (0, 1))


# --- Gemma3: SigLIP crops at one resolution, on SGLang's triton and SDPA vision attention ------------------------
@pytest.fixture(params=["triton_attn", "sdpa"])
def captured_gemma3(request):
    model = tiny_on_cuda("gemma3", attention=request.param)
    tower = Gemma3Tower(model)  # on SDPA: unsets flatten_batch, so a batch of crops runs (and is captured) whole
    line = tower.use_graphs([tower.image_patches * b for b in SIZES], tp_size=1)
    assert line.startswith("ViT CUDA graphs captured for batches of [1, 2, 3] images"), line
    return model, tower, tower.graphs


def _crops(model, counts, seed):
    import sglang_models

    items = [sglang_models.gemma3_image(model, crops, seed + i) for i, crops in enumerate(counts)]
    for item in items:
        item.feature = item.feature.cuda()
    return items


@torch.inference_mode()
def test_gemma3_crops_padded_or_not_match_sglangs_own_method_and_outlive_the_next_replay(captured_gemma3):
    """One crop, then two crops replayed in the graph of three (a zero crop pads it): each against SGLang's own
    ``get_image_feature``; the first result read again after the second replay (a view would have changed)."""
    model, _, graphs = captured_gemma3
    graphs._batches = [b for b in graphs._batches if b.images != 2]
    first = _crops(model, [1], 10)
    kept = graphs.run(torch.cat([item.feature for item in first]))
    expected_first = model.get_image_feature(first)
    second = _crops(model, [2], 20)
    out = graphs.run(torch.cat([item.feature for item in second]))
    assert rel_err(torch.cat(out), model.get_image_feature(second)) < TOL
    torch.cuda.synchronize()
    assert rel_err(torch.cat(kept), expected_first) < TOL and graphs.replays == 2


@torch.no_grad()
def test_gemma3s_idle_replay_runs_on_the_callers_stream_after_the_work_queued_there(captured_gemma3):
    """As for Gemma 4: crops written on the scheduler's stream behind a 0.1 s kernel, over NaNs."""
    model, tower, graphs = captured_gemma3
    items = _crops(model, [1, 2], 30)
    sources = [item.feature.clone() for item in items]
    expected = model.get_image_feature(items)
    for item in items:
        item.feature = torch.full_like(item.feature, float("nan"))
    scheduler = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(scheduler):
        torch.cuda._sleep(200_000_000)
        for item, source in zip(items, sources, strict=True):
            item.feature.copy_(source)
        out = tower.encode_now(items, lambda _: pytest.fail("left to SGLang"))
        consumed = out * 1
    torch.cuda.synchronize()
    assert rel_err(consumed, expected) < TOL and graphs.replays == 1


@torch.inference_mode()
def test_gemma3s_crops_in_host_memory_reach_the_replay_without_the_host_waiting(captured_gemma3):
    """Crops in pageable host memory (SGLang's cpu feature transport) while the stream still runs 0.3 s of the batches
    ahead: no synchronizing CUDA call and no wait for them (a blocking copy synchronized the stream, so the forward
    thread waited for every batch ahead: 361 ms a forward's launch in the real server, e5bb1ae), and the results
    still equal SGLang's own method's."""
    model, tower, _ = captured_gemma3
    items = _crops(model, [2], 40)
    expected = model.get_image_feature(items)
    units = [EncodeItem(crop, tower.num_patches) for crop in torch.cat([item.feature for item in items]).cpu()]
    tower.forward(units)  # the pinned staging block is allocated once, then reused
    cycles, _ = calibrated_sleep(0.3)
    torch.cuda._sleep(cycles)
    torch.cuda.set_sync_debug_mode("error")
    try:
        began = time.perf_counter()
        out = tower.forward(units)
        returned = time.perf_counter() - began
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert returned < 0.15
    assert rel_err(torch.cat(out), expected) < TOL


@torch.inference_mode()
def test_gemma3s_bf16_replay_on_sdpa_matches_sglangs_own_method():
    """In bf16, as served, SDPA takes torch's flash or cuDNN kernel (the float32 fixture above takes the
    memory-efficient one), the path a real ``--mm-attention-backend sdpa`` server captures: two crops replayed in
    the graph of three (a zero crop pads it) against SGLang's own method, and the call counted as a replay."""
    model = tiny_on_cuda("gemma3", attention="sdpa").to(torch.bfloat16)
    tower = Gemma3Tower(model)
    line = tower.use_graphs([tower.image_patches * 3], tp_size=1)
    assert line.startswith("ViT CUDA graphs captured for batches of [3] images"), line
    items = _crops(model, [2], 60)
    units = [EncodeItem(crop, tower.num_patches) for crop in items[0].feature]
    out = tower.forward(units)
    assert tower.graphs.replays == 1
    assert rel_err(torch.cat(out), model.get_image_feature(items)) < BF16_TOL

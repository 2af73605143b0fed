"""CUDA-IPC feature proxies from another process, rebuilt by the adapters as SGLang rebuilds them; and the
ViT CUDA-graph refusal on a real CUDA-built Qwen2.5-VL tower.

A producer process (the tokenizer's role) owns SGLang's real ``MmItemMemoryPool`` and publishes pixel
tensors with ``wrap_tensor``, as ``BaseMultimodalProcessor._prepare_mm_items_for_transport`` does; the
test process (the scheduler's role) receives the pickled ``CudaIpcTensorTransportProxy`` objects. CUDA
refuses to open an IPC handle in the exporting process, hence two processes.

Needs CUDA and ``cuda.bindings`` (cuda-python; SGLang's pool writes its ready/ack words with
``cuStreamWaitValue32`` / ``cuStreamWriteValue32``); the IPC tests also need the pool's ``wrap_tensor``
(sglang 0.5.23; 0.5.16's pool hands out shared-memory flags instead). Each skips cleanly without them:
a producer that cannot build its pool would leave the consumer waiting on its queue.
Run: ``python -m pytest -q tests/gpu/test_adapters_cuda.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))  # sglang_models: tiny real SGLang models

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("sglang")
pytest.importorskip("cuda.bindings")

import torch.multiprocessing as mp
from mm_scheduler_sglang.adapters import feature_shape, is_transport_proxy, materialize_feature

from .cuda_helpers import rel_err, tiny, tiny_on_cuda

pytestmark = pytest.mark.gpu
PATCH_DIM = 3 * 2 * 16 * 16  # tests/integration/sglang_models.qwen3_vl: in_channels * temporal * patch**2
GRIDS = [(1, 4, 4), (1, 4, 6), (1, 8, 4)]


def _content(rows: int, index: int, device: str) -> torch.Tensor:
    """Pixel rows both processes can compute: item ``index`` is recognisable."""
    base = torch.arange(rows * PATCH_DIM, dtype=torch.float32, device=device).reshape(rows, PATCH_DIM)
    return base * 1e-3 + index


def _produce(rows: list[int], queue, done) -> None:
    torch.cuda.set_device(0)
    pool = _pool_class()(64 << 20, 0.05, 0, 1)
    proxies = [pool.wrap_tensor(_content(n, i, "cuda"), use_pool_handle_cache=True) for i, n in enumerate(rows)]
    torch.cuda.synchronize()
    queue.put(proxies)
    done.wait(120)
    deadline = time.monotonic() + 20
    while pool.active_lease_count and time.monotonic() < deadline:  # the recycler reads the consumers' acks
        time.sleep(0.05)
    queue.put(pool.active_lease_count)
    pool.shutdown()


def _pool_class() -> type | None:
    """SGLang's ``MmItemMemoryPool`` where it has ``wrap_tensor``, from the module that holds its proxy class."""
    import importlib

    from mm_scheduler_sglang.sglang_compat import cuda_ipc_proxy_class

    pool = getattr(importlib.import_module(cuda_ipc_proxy_class().__module__), "MmItemMemoryPool", None)
    return pool if hasattr(pool, "wrap_tensor") else None


def _from(producer, queue, timeout: float):
    """The producer's next message; fails at once if the producer died instead of waiting out ``timeout``."""
    import queue as queues

    deadline = time.monotonic() + timeout
    while True:
        try:
            return queue.get(timeout=1)
        except queues.Empty:
            if not producer.is_alive():
                pytest.fail(f"the producer process exited (code {producer.exitcode}) before sending")
            if time.monotonic() > deadline:
                raise


@pytest.fixture
def ipc_items():
    """Qwen3-VL-shaped image items whose features are proxies into another process's pool;
    ``finish()`` lets the producer count the pool slices still leased (0 once all were acknowledged)."""
    from sglang_models import make_item

    if _pool_class() is None:
        import sglang

        pytest.skip(f"sglang {sglang.__version__}: its MmItemMemoryPool has no wrap_tensor (the pooled "
                    "transport these tests drive is 0.5.23's)")
    rows = [t * h * w for t, h, w in GRIDS]
    ctx = mp.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Event()
    producer = ctx.Process(target=_produce, args=(rows, queue, done), daemon=True)
    producer.start()
    proxies = _from(producer, queue, 120)
    items = [make_item("image", proxy, 7000 + i, image_grid_thw=torch.tensor([grid]))
             for i, (proxy, grid) in enumerate(zip(proxies, GRIDS, strict=True))]
    left: list[int] = []

    def finish() -> int:
        if not left:
            torch.cuda.synchronize()
            done.set()
            left.append(_from(producer, queue, 60))
        return left[0]

    yield {"items": items, "rows": rows, "finish": finish}
    finish()
    producer.join(30)


def test_ipc_proxy_is_rebuilt_on_the_current_stream_and_its_pool_slice_released(ipc_items):
    """As Qwen3-VL's ``_materialize_visual_items`` does (``item.reconstruct``), on a non-default current
    stream as SGLang's scheduler thread has; the producer's pool sees every slice acknowledged."""
    items, rows = ipc_items["items"], ipc_items["rows"]
    device = torch.device("cuda", 0)
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        for item, n in zip(items, rows, strict=True):
            assert is_transport_proxy(item.feature) and feature_shape(item) == (n, PATCH_DIM)
            feature = materialize_feature(item, device)
            assert item.feature is feature and feature.is_cuda and not item.has_cuda_ipc_proxy()
    stream.synchronize()
    for i, (item, n) in enumerate(zip(items, rows, strict=True)):
        torch.testing.assert_close(item.feature, _content(n, i, "cuda"), rtol=0, atol=0)
    assert ipc_items["finish"]() == 0


def test_every_proxied_item_is_taken_by_a_cuda_qwen3_tower(ipc_items):
    """The count the issue asks for: with ``cuda_ipc`` (Qwen3-VL's single-node default) every item is
    accepted and split into units, none left to SGLang's fallback."""
    from mm_scheduler_sglang.adapters import tower_for

    model = tiny("qwen3_vl").to("cuda")
    tower = tower_for(model)
    assert tower is not None and tower.device.type == "cuda"
    items, rows = ipc_items["items"], ipc_items["rows"]
    taken = [item for item in items if tower.accepts(item)]
    assert len(taken) == len(items)
    keys = [tower.result_key(item) for item in items]
    for i, (item, n) in enumerate(zip(items, rows, strict=True)):
        units = tower.units(item)
        assert sum(u.num_patches for u in units) == n
        torch.testing.assert_close(torch.cat([u.pixel_values for u in units]), _content(n, i, "cuda"))
    assert [tower.result_key(item) for item in items] == keys  # rebuilding does not change the key


def test_qwen2_5_vl_built_with_vit_cuda_graph_is_refused(monkeypatch):
    """On CUDA, ``Qwen2_5_VisionTransformer.__init__`` turns the graph runner on from the env var; its
    outputs are views of a static buffer, so the plugin leaves the model to SGLang."""
    from mm_scheduler_sglang.adapters import tower_for, why_unsupported

    monkeypatch.setenv("SGLANG_VIT_ENABLE_CUDA_GRAPH", "1")
    model = tiny("qwen2_5_vl")
    if not model.visual.enable_cg:
        pytest.fail("SGLang did not enable its ViT CUDA graph on a CUDA host with the env var set")
    assert "SGLANG_VIT_ENABLE_CUDA_GRAPH" in why_unsupported(model)
    assert tower_for(model) is None


def test_features_on_the_gpu_and_the_cpu_in_one_call_are_encoded_as_if_all_were_on_the_gpu():
    """A cuda_ipc batch can mix GPU-rebuilt and CPU-offloaded features; SGLang 0.5.16's Qwen3-VL method
    concatenated them as found and its scheduler died (real server, e12f02a). Both of the plugin's paths
    put them on the tower's device: its own forward, and the calls it hands to SGLang's method."""
    import sglang_models
    from mm_scheduler_sglang.adapters import on_one_device, tower_for

    model = tiny_on_cuda("qwen3_vl")
    tower = tower_for(model)
    assert tower is not None and tower.device.type == "cuda"

    def items(devices: list[str]) -> list:
        return [sglang_models.make_item("image", _content(t * h * w, i, device), 70 + i,
                                        image_grid_thw=torch.tensor([[t, h, w]]))
                for i, ((t, h, w), device) in enumerate(zip(GRIDS[:2], devices, strict=True))]

    expected = model.get_image_feature(items(["cuda", "cuda"]))
    mixed = on_one_device(items(["cuda", "cpu"]), tower.device)
    assert all(item.feature.is_cuda for item in mixed)
    torch.testing.assert_close(model.get_image_feature(mixed), expected, rtol=0, atol=0)
    units = [unit for item in items(["cuda", "cpu"]) for unit in tower.units(item)]
    assert rel_err(torch.cat(tower.forward(units)), expected) < 1e-3  # its own packing: GEMM rounding may differ


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_gemma_units_on_the_gpu_and_the_cpu_in_one_forward_are_encoded_as_if_all_were_on_the_gpu(family):
    """The Gemma towers stack their units: a batch of GPU-rebuilt and CPU-offloaded features must not fail."""
    import sglang_models
    from mm_scheduler_sglang.adapters import tower_for

    model = tiny_on_cuda(family)
    tower = tower_for(model)
    assert tower is not None and tower.device.type == "cuda"

    def items(devices: list[str]) -> list:
        made = [sglang_models.gemma3_image(model, 1, 80 + i) if family == "gemma3"
                else sglang_models.gemma4_image(model, 4, 4, 16, 80 + i) for i in range(len(devices))]
        for item, device in zip(made, devices, strict=True):
            item.feature = item.feature.to(device)
        return made

    expected = torch.cat(tower.forward([u for item in items(["cuda", "cuda"]) for u in tower.units(item)]))
    mixed = torch.cat(tower.forward([u for item in items(["cuda", "cpu"]) for u in tower.units(item)]))
    torch.testing.assert_close(mixed, expected)


def test_gemma4s_uint8_pixels_from_pageable_and_pinned_memory_encode_exactly_as_their_float32_pixels():
    """``sglang.uint8_pixels``: ``stack_on`` copies uint8 units to the GPU and widens them there, on the stream the
    copies were issued on. The widened batch must equal the processor's float32 pixels bit for bit (a widen that ran
    before a copy landed reads stale memory), and so must the tower's outputs."""
    import sglang_models
    from mm_scheduler_sglang.adapters import on_one_device, stack_on, tower_for
    from mm_scheduler_sglang.pixel_transport import Widening

    widen = Widening(1 / 255)  # Gemma 4's processor: the rescale alone
    every_value = torch.arange(256, dtype=torch.uint8)  # the widen is elementwise: these are all its inputs
    processors_multiply = (every_value.cuda() * (1 / 255)).cpu()  # what the processor computes on a GPU server
    assert processors_multiply.dtype == torch.float32
    assert torch.equal(widen(every_value.cuda()).cpu(), processors_multiply)
    assert torch.equal(widen(every_value), processors_multiply)  # and on the CPU, where SGLang's own method reads it

    model = tiny_on_cuda("gemma4")
    tower = tower_for(model)
    tower.widening = widen
    generator = torch.Generator().manual_seed(5)
    narrow = [torch.randint(0, 256, (64, 48), dtype=torch.uint8, generator=generator) for _ in range(4)]
    narrow[1], narrow[3] = narrow[1].pin_memory(), narrow[3].pin_memory()  # SGLang offloads into pinned memory
    staged = stack_on(narrow, tower.device, torch.bfloat16, widen)
    torch.cuda.synchronize()
    assert torch.equal(staged.cpu(), torch.stack([widen(u) for u in narrow]).to(torch.bfloat16))

    def items(uint8: bool) -> list:
        made = [sglang_models.gemma4_image(model, 4, 4, 16, 90 + i) for i in range(2)]
        for i, item in enumerate(made):
            pixels = torch.randint(0, 256, item.feature.shape, dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(i))
            item.feature = pixels if uint8 else widen(pixels)
        return made

    expected = tower.forward([u for item in items(uint8=False) for u in tower.units(item)])
    got = tower.forward([u for item in items(uint8=True) for u in tower.units(item)])
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    # SGLang's own method (a fallback, the inline path) gets them widened on the tower's device
    handed = on_one_device(items(uint8=True), tower.device, widen)
    assert all(item.feature.is_cuda and item.feature.dtype == torch.float32 for item in handed)
    assert all(torch.equal(a.feature.cpu(), b.feature) for a, b in zip(handed, items(uint8=False), strict=True))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "gemma3"])
def test_normalizing_processors_on_the_gpu_give_what_their_uint8_pixels_widen_to_on_the_gpu_bit_for_bit(
        tmp_path, family):
    """On a GPU server SGLang runs the fast image processor on the GPU (``device="cuda"``): its fused rescale and
    normalize, ``(x - 255 mean) / (255 std)`` per channel in float32, must equal the plugin's ``Widening`` of the
    same image's uint8 pixels on the GPU, bit for bit (a division done as a multiply by the reciprocal, or the
    constants folded otherwise, differs in the last bit). The probe image holds every uint8 value in every channel;
    then the tower's outputs from uint8 and from the processor's float32 pixels must be identical."""
    import sglang_models
    from mm_scheduler_sglang.adapters import tower_for
    from mm_scheduler_sglang.pixel_transport import Widening
    from PIL import Image
    from transformers import AutoProcessor

    images = AutoProcessor.from_pretrained(sglang_models.model_dir(tmp_path, family)).image_processor
    widening = Widening.of(images)
    assert widening is not None and widening.mean is not None
    values = torch.arange(256, dtype=torch.uint8).repeat(64)  # 128 x 128, every value in every channel
    rgb = torch.stack([values, values.roll(85), values.roll(170)], dim=-1).reshape(128, 128, 3)
    probe = Image.fromarray(rgb.numpy())
    wide = images(images=[probe], return_tensors="pt", device="cuda")["pixel_values"]
    images.do_rescale = images.do_normalize = False
    narrow = images(images=[probe], return_tensors="pt", device="cuda")["pixel_values"]
    assert wide.is_cuda and wide.dtype == torch.float32 and narrow.dtype == torch.uint8
    assert torch.equal(widening(narrow), wide)
    assert torch.equal(widening(narrow.cpu()), wide.cpu())  # and on the CPU, at arrival without the service

    model = tiny_on_cuda(family)
    tower = tower_for(model)
    tower.widening = widening
    make = {"gemma3": lambda: sglang_models.gemma3_image(model, 2, 7)}.get(
        family, lambda: sglang_models.qwen_image(model, 4, 6, 7))
    narrow_item, wide_item = make(), make()
    pixels = torch.randint(0, 256, narrow_item.feature.shape, dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(7))
    narrow_item.feature, wide_item.feature = pixels, widening(pixels)
    got = tower.forward(tower.units(narrow_item))
    expected = tower.forward(tower.units(wide_item))
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_the_harness_backport_makes_sglangs_own_qwen3_method_take_features_on_two_devices():
    """The real-server baseline ``off+tok4ipc+backport`` (scripts/gpu_serve/sglang_backports) wraps SGLang's own
    Qwen3-VL methods; on 0.5.16 the bare method raises on such a call, on 0.5.23 it moves them itself. Either way
    the wrapped method must give what an all-GPU call gives, so the baseline measures SGLang, fixed."""
    import sglang_models

    sys.path.insert(0, str(Path(__file__).parents[2] / "scripts" / "gpu_serve" / "sglang_backports"))
    import feature_device

    model = tiny_on_cuda("qwen3_vl")

    def items(devices: list[str]) -> list:
        return [sglang_models.make_item("image", _content(t * h * w, i, device), 90 + i,
                                        image_grid_thw=torch.tensor([[t, h, w]]))
                for i, ((t, h, w), device) in enumerate(zip(GRIDS[:2], devices, strict=True))]

    expected = model.get_image_feature(items(["cuda", "cuda"]))
    wrapped = feature_device.on_tower_device(type(model).get_image_feature)
    torch.testing.assert_close(wrapped(model, items(["cuda", "cpu"])), expected, rtol=0, atol=0)

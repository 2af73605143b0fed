"""EPD: SGLang's encoder-only server batching through the coalescer (integration/epd.py), on CPU.

What is real: SGLang's ``MMEncoder`` methods (``batch_encode``, staging, ``_sync_tp_prepare_status``,
``send`` over ZMQ), its ``EncoderPreprocessor`` (HF Qwen2-VL processors from a saved config), its
``EncoderScheduler`` and ``execute_encode_pipeline`` (the /encode request lifecycle), the TP worker's
message handler ``_handle_encoder_worker_request`` fed by SGLang's PUSH/PULL sockets, and the tiny
random-weight Qwen2.5-VL from ``sglang_models``. ``MMEncoder`` is built without ``__init__`` (which
loads weights from a model path and starts Mooncake/metrics), with the attributes ``__init__`` sets.
Embeddings are compared as they arrive at a stand-in prefill server: a ZMQ PULL socket receiving
SGLang's own ``zmq_to_tokenizer`` transfer (pickled ``EmbeddingData`` + raw tensor bytes).

The TP=2 group is two processes on gloo with the vision tower TP-sharded by SGLang itself (published
``tp_size=2``; one harness patch: groups skip PyNccl on CPU). Rank 0 starts its worker as
``launch_local_runtime`` does. Videos: SGLang's own video *decoding* cannot run on this CPU-only setup
(decord files; ``preprocess_video`` pins memory), on its path and ours alike, so the video scenario
replaces only ``EncoderPreprocessor._flatten_and_load_videos`` (decode + frame sampling) with synthetic
uint8 frames; SGLang's HF video processor, its qwen2_5_vl ``second_per_grid_ts``, ``MMEncoder`` and the
transport stay real, and SGLang's own (unbatched) video path is the reference.
Every scenario runs in spawned processes with a queue timeout, so a hang fails instead of blocking (except the
TP=1 ones under mutation testing, see IN_PROCESS).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import multiprocessing as mp
import os
import pickle
import queue
import re
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace

import pytest
from mm_scheduler_sglang import sglang_compat

pytestmark = pytest.mark.skipif(not sglang_compat.current().has("epd"),
                                reason="this SGLang has no usable disaggregation.encoder (EPD needs 0.5.20+); "
                                       "test_sglang_compat checks the plugin says so and hooks nothing there")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TIMEOUT_S = 150
IN_PROCESS = os.environ.get("MM_EPD_IN_PROCESS") == "1"
"""The TP=1 scenarios run in the test process instead, each checked by one test (scripts/mutate.py sets it:
mutmut records, and reruns per mutant, only the test during which the test process called the mutated code; a
module fixture's calls would count for its first test only). TP=2 always spawns its two ranks."""


# --- harness (runs in the child processes) ---------------------------------------------------------
def _png(width: int, height: int, seed: int) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _init_dist(rank: int, world: int, port: int) -> None:
    sys.path[:0] = [HERE, ROOT]
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    import sglang_models as sm
    from sglang.srt.distributed import parallel_state
    from sglang.srt.distributed.parallel_state import init_distributed_environment, initialize_model_parallel
    from sglang.srt.runtime_context import SpawnRanks, get_parallel, publish, reset_context
    from sglang.srt.server_args import ServerArgs

    sm._provide_vllm_rotary_name()
    # Harness patch: SGLang's group coordinator would build a PyNccl communicator for every group of more
    # than one rank; on CPU the groups run on gloo (torch.distributed) only.
    original_group = parallel_state.init_model_parallel_group

    def gloo_group(*args, **kwargs):
        return original_group(*args, **{**kwargs, "use_pynccl": False, "use_custom_allreduce": False})

    parallel_state.init_model_parallel_group = gloo_group
    init_distributed_environment(world_size=world, rank=rank, local_rank=rank, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{port}")
    reset_context()
    publish(ServerArgs(model_path="dummy", tp_size=world, ep_size=1, pp_size=1, device="cpu"), role="test",
            ranks=SpawnRanks(world_rank=rank))
    get_parallel().override_permanently(world_group=parallel_state._WORLD)
    initialize_model_parallel(backend="gloo")
    sm._initialised = True


def _build_encoder(rank: int):
    """A real MMEncoder (methods and preprocessing are SGLang's), built without loading weights from disk."""
    import concurrent.futures

    import sglang_models as sm
    import torch
    import zmq
    import zmq.asyncio
    from sglang.srt.disaggregation.encoder.preprocessor import EncoderPreprocessor
    from sglang.srt.disaggregation.encoder.server import MMEncoder, ZmqDelivery
    from sglang.srt.managers.schedule_batch import Modality
    from sglang.srt.mem_cache.multimodal_cache import MultiModalStaticCache
    from sglang.srt.multimodal.encoder_preprocessing import EncoderMediaProcessorConfig
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    model = sm.qwen2_5_vl()
    pre = EncoderPreprocessor.__new__(EncoderPreprocessor)
    pre.server_args, pre._model_preprocessor = None, None
    pre.model_config = SimpleNamespace(hf_config=model.config)
    pre.encoder_media_processor_config = EncoderMediaProcessorConfig()
    pre.model_type, pre.device, pre.use_image_processor_gpu = "qwen2_5_vl", "cpu", False
    pre.image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=224 * 224)
    pre.video_processor = Qwen2VLVideoProcessor(min_pixels=28 * 28, max_pixels=112 * 112)
    pre.audio_processor = None
    pre._supported_modalities = frozenset({Modality.IMAGE, Modality.VIDEO})
    pre._build_vision_config(None)
    pre.preproc_executor = concurrent.futures.ThreadPoolExecutor(2)
    pre.io_executor = concurrent.futures.ThreadPoolExecutor(2)

    enc = MMEncoder.__new__(MMEncoder)
    enc.server_args, enc.rank, enc.dp_rank, enc.profiler = None, rank, 0, None
    enc.transfer_backend, enc.use_mooncake = "zmq_to_tokenizer", False
    enc.model, enc.model_type, enc.device, enc.gpu_id = model, "qwen2_5_vl", "cpu", 0
    enc.model_config = SimpleNamespace(hf_config=model.config, hidden_size=64)
    enc.preprocessor = pre
    enc.context, enc.sync_context = zmq.asyncio.Context(2), zmq.Context()
    enc.scheduler_send_sockets, enc.scheduler_send_locks = {}, {}
    enc.executor = concurrent.futures.ThreadPoolExecutor(4)
    enc.mm_cache, enc.mm_cache_lock = MultiModalStaticCache(0), asyncio.Lock()
    enc.send_timeout, enc.background_tasks, enc.mm_global_cache = 30.0, set(), None
    enc._embedding_dtype = next(model.parameters()).dtype
    enc._element_size = torch.tensor([], dtype=enc._embedding_dtype).element_size()
    enc._embedding_dims = {m: 64 for m in (Modality.IMAGE, Modality.VIDEO, Modality.AUDIO)}
    if rank == 0:
        enc.req_states, enc.abandoned_req_ids = {}, set()
        enc.encode_dispatch_lock = asyncio.Lock()
        enc.delivery = ZmqDelivery(enc, cleanup_receive_state=False)
    return enc


class Prefill:
    """A stand-in prefill server: SGLang's zmq_to_tokenizer transfer lands on this PULL socket."""

    def __init__(self) -> None:
        import zmq

        self.sock = zmq.Context.instance().socket(zmq.PULL)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.got: dict = {}

    def drain(self) -> dict:
        import torch
        import zmq

        while self.sock.poll(200, zmq.POLLIN):
            frames = self.sock.recv_multipart()
            data = pickle.loads(frames[0])
            tensor = None
            if len(frames) > 1:
                tensor = torch.frombuffer(bytearray(frames[1]), dtype=data.dtype).reshape(data.shape).clone()
            self.got[data.req_id] = (tensor, data.error_msg, data.error_code)
        return self.got


def _request(rid: str, modality: str, items: list, prefill: Prefill) -> dict:
    return {"req_id": rid, "modality": modality, "mm_items": items, "num_parts": 1, "part_idx": 0,
            "prefill_host": "127.0.0.1", "embedding_port": prefill.port}


def _workload(prefill: Prefill, tag: str) -> list[dict]:
    sizes = [(56, 56), (112, 84), (224, 168), (84, 140), (56, 56), (168, 224)]
    reqs = []
    for r in range(8):
        imgs = [_png(*sizes[(r + i) % len(sizes)], seed=10 * r + i) for i in range(1 + r % 3)]
        reqs.append(_request(f"{tag}i{r}", "image", imgs, prefill))
    return reqs


async def _run_pipeline(enc, sched, requests, send_sockets=()) -> dict:
    """SGLang's /encode lifecycle for each request, concurrently; returns req_id -> 'ok' or the error."""
    from sglang.srt.disaggregation.encoder.runtime import execute_encode_pipeline

    async def one(req):
        try:
            await execute_encode_pipeline(enc, sched, dict(req), send_sockets=list(send_sockets) or None)
            return "ok"
        except Exception as exc:
            return f"{type(exc).__name__}: {getattr(exc, 'code', '')} {exc}"

    outcomes = await asyncio.gather(*(one(r) for r in requests))
    return {r["req_id"]: o for r, o in zip(requests, outcomes, strict=True)}


def _embeddings(prefill: Prefill, tag: str) -> dict:
    return {rid[len(tag):]: t for rid, (t, _, _) in prefill.drain().items() if rid.startswith(tag) and t is not None}


def _tp1_main(out) -> None:
    try:
        out.put(("ok", asyncio.run(_tp1_scenarios())))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def _init_tp1() -> None:
    if IN_PROCESS:
        import sglang_models as sm

        sm.init_sglang_cpu()  # the world-size-1 group of this process, once
    else:
        _init_dist(0, 1, _free_port())


async def _tp1_scenarios() -> dict:
    _init_tp1()
    from mm_scheduler_sglang.epd import CoalescedEncoderScheduler
    from sglang.srt.disaggregation.encoder import runtime as rt
    from sglang.srt.disaggregation.encoder.runtime import EncoderScheduler
    from sglang.srt.managers.schedule_batch import Modality

    from mm_scheduler import CoalescerConfig

    enc = _build_encoder(0)
    prefill = Prefill()
    res: dict = {}
    # SGLang's own path: EncoderScheduler for images, videos one request at a time.
    sglang_sched = EncoderScheduler(enc, [], max_batch_size=8)
    sglang_sched.start()
    res["sglang_outcomes"] = await _run_pipeline(enc, sglang_sched, _workload(prefill, "S"))
    await sglang_sched.stop()
    res["sglang"] = _embeddings(prefill, "S")

    # Ours: videos go through the scheduler too (what install() arranges).
    rt._BATCHABLE_MODALITIES.add(Modality.VIDEO)
    config = CoalescerConfig(name="epd-test", budget_bytes=64 * 1024 * 1024, bytes_per_patch=8192,
                             max_batch_items=16)
    ours = CoalescedEncoderScheduler(enc, [], config)
    await ours.astart()
    forwards: list[tuple[str, ...]] = []
    original_forward = ours.tower.forward

    def counting_forward(units):
        forwards.append(tuple(u.meta["unit"].modality.name for u in units))
        return original_forward(units)

    ours.tower.forward = counting_forward
    res["ours_outcomes"] = await _run_pipeline(enc, ours, _workload(prefill, "C"))
    res["ours"] = _embeddings(prefill, "C")
    res["forwards"] = forwards

    # Failure cases, each next to healthy requests that must still succeed.
    good = _workload(prefill, "G")[:3]
    bad = [
        {"req_id": "Bmalformed", "modality": "image", "mm_items": [], "num_parts": 1, "part_idx": 0},
        _request("Bundecodable", "image", ["data:image/png;base64,AAAAnotapng"], prefill),
        _request("Boversized", "image", [_png(224, 224, 7)], prefill),
    ]
    small = CoalescedEncoderScheduler(enc, [], config.replace(budget_bytes=8192 * 200))
    await small.astart()
    res["failure_outcomes"] = await _run_pipeline(enc, small, bad + good)
    # A poisoned image: it preprocesses fine but the tower fails on it (forced here by its pixel sum).
    poison = _request("Ppoison", "image", [_png(84, 84, 666)], prefill)
    pre = await asyncio.get_running_loop().run_in_executor(None, small._preprocess, poison, Modality.IMAGE)
    poison_sum = float(pre.mm_inputs["pixel_values"].sum())
    real_forward = small.tower._forward_group

    def poisoned_forward(metas, pixels, mixed):
        if any(abs(float(p.sum()) - poison_sum) < 1e-3 for p in pixels):
            raise RuntimeError("tower failed on a poisoned image")
        return real_forward(metas, pixels, mixed)

    small.tower._forward_group = poisoned_forward
    mates = _workload(prefill, "P")[:4]
    res["poison_outcomes"] = await _run_pipeline(enc, small, [poison, *mates])
    res["poison_embeddings"] = _embeddings(prefill, "P")
    res["prefill_errors"] = {rid: (msg, code) for rid, (_, msg, code) in prefill.drain().items() if msg}
    # A client that disconnects: its request is cancelled while queued behind a slow forward.
    gate = asyncio.Event()
    slow_forward = small.tower._forward_group
    release = asyncio.get_running_loop()

    def gated_forward(metas, pixels, mixed):
        asyncio.run_coroutine_threadsafe(gate.wait(), release).result(timeout=30)
        return slow_forward(metas, pixels, mixed)

    small.tower._forward_group = gated_forward
    first = asyncio.ensure_future(_run_pipeline(enc, small, _workload(prefill, "D")[:1]))
    while small.coalescer.stats()["inflight_batches"] == 0:
        await asyncio.sleep(0.01)
    leaver = asyncio.ensure_future(_run_pipeline(enc, small, [_request("Lgone", "image", [_png(56, 56, 5)],
                                                                       prefill)]))
    stayer = asyncio.ensure_future(_run_pipeline(enc, small, [_request("Lstay", "image", [_png(84, 56, 6)],
                                                                       prefill)]))
    while small.coalescer.stats()["pending_units"] < 2:
        await asyncio.sleep(0.01)
    leaver.cancel()
    await asyncio.gather(leaver, return_exceptions=True)
    for _ in range(200):  # the withdrawal is synchronous in the cancelled task; allow a few loop turns
        if small.coalescer.stats()["pending_units"] < 2:
            break
        await asyncio.sleep(0.01)
    pending_after_cancel = small.coalescer.stats()["pending_units"]
    gate.set()
    res["disconnect"] = {"pending_after_cancel": pending_after_cancel, "first": await first,
                         "stayer": await stayer, "cancelled": leaver.cancelled(),
                         "states_left": sorted(enc.req_states), "stats": dict(small.stats)}
    await small.stop()
    # A TP worker process that exits while a request's forward is held: the scheduler, started as SGLang starts
    # it (start(), not awaited), fails the in-flight request with 503 at once, and later ones too.
    worker = mp.get_context("fork").Process(target=time.sleep, args=(120,), daemon=True)
    worker.start()
    doomed = CoalescedEncoderScheduler(enc, [], config, worker_processes=[worker])
    doomed.start()
    hold = asyncio.Event()
    held_forward = doomed.tower._forward_group

    def held(metas, pixels, mixed):
        asyncio.run_coroutine_threadsafe(hold.wait(), release).result(timeout=30)
        return held_forward(metas, pixels, mixed)

    doomed.tower._forward_group = held
    inflight = asyncio.ensure_future(_run_pipeline(enc, doomed, _workload(prefill, "W")[:1]))
    while doomed.coalescer.stats()["inflight_batches"] == 0:
        await asyncio.sleep(0.01)
    logged = _Records()
    logging.getLogger("mm_scheduler_sglang.epd").addHandler(logged)
    worker.kill()
    done, _ = await asyncio.wait({inflight}, timeout=10)  # the forward is still held
    hold.set()
    res["worker_exit"] = {"pid": worker.pid, "dead": doomed.tower.dead, "failed_at_once": inflight in done,
                          "inflight": await inflight,
                          "later": await _run_pipeline(enc, doomed, _workload(prefill, "V")[:1]),
                          "log": logged.lines}
    logging.getLogger("mm_scheduler_sglang.epd").removeHandler(logged)
    await doomed.stop()
    await ours.stop()
    rt._BATCHABLE_MODALITIES.discard(Modality.VIDEO)
    return _plain(res)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _synthetic_videos(preprocessor) -> None:
    """Harness patch: a video leaf ``"synthetic:<seed>:<frames>:<height>:<width>"`` decodes to random uint8
    frames ``[frames, 3, height, width]``, already sampled (what decord + ``preprocess_video`` hand over)."""
    import torch

    async def load(mm_items):
        videos = []
        for leaf in preprocessor._flatten_nested_items(mm_items):
            _, seed, frames, height, width = leaf.split(":")
            generator = torch.Generator().manual_seed(int(seed))
            videos.append(torch.randint(0, 256, (int(frames), 3, int(height), int(width)), dtype=torch.uint8,
                                        generator=generator))
        return videos, {"do_sample_frames": False}

    preprocessor._flatten_and_load_videos = load


def _video_workload(prefill: Prefill, tag: str) -> list[dict]:
    """Videos of several lengths and sizes (one request with two), next to images of other requests."""
    videos = [["synthetic:1:4:56:84"], ["synthetic:2:2:84:56"], ["synthetic:3:6:56:56", "synthetic:4:2:56:112"]]
    reqs = [_request(f"{tag}v{r}", "video", leaves, prefill) for r, leaves in enumerate(videos)]
    reqs += [_request(f"{tag}i{r}", "image", [_png(56 + 28 * r, 84, seed=50 + r)], prefill) for r in range(3)]
    return reqs


def _tp1_video_main(out) -> None:
    try:
        out.put(("ok", asyncio.run(_tp1_video_scenarios())))
    except BaseException:
        out.put(("error", traceback.format_exc()))


async def _tp1_video_scenarios() -> dict:
    _init_tp1()
    import torch
    from mm_scheduler_sglang.epd import CoalescedEncoderScheduler, _split_units, install
    from sglang.srt.disaggregation.encoder import runtime as rt
    from sglang.srt.disaggregation.encoder.runtime import EncoderScheduler
    from sglang.srt.managers.schedule_batch import Modality

    from mm_scheduler import CoalescerConfig

    enc = _build_encoder(0)
    _synthetic_videos(enc.preprocessor)
    prefill = Prefill()
    res: dict = {"batchable_before": sorted(m.name for m in rt._BATCHABLE_MODALITIES)}
    # SGLang's own path: images through EncoderScheduler, each video encoded alone (not batchable).
    sglang_sched = EncoderScheduler(enc, [], max_batch_size=8)
    sglang_sched.start()
    res["sglang_outcomes"] = await _run_pipeline(enc, sglang_sched, _video_workload(prefill, "S"))
    await sglang_sched.stop()
    res["sglang"] = _embeddings(prefill, "S")

    # Ours, installed as the plugin installs it (which routes videos to the scheduler too).
    runtime = SimpleNamespace(encoder=enc, send_sockets=[], tp_processes=[], scheduler=sglang_sched)
    config = CoalescerConfig(name="epd-video", budget_bytes=64 * 1024 * 1024, bytes_per_patch=8192,
                             max_batch_items=16)
    ours = install(runtime, config)
    res["batchable_after"] = sorted(m.name for m in rt._BATCHABLE_MODALITIES)
    res["installed"] = runtime.scheduler is ours
    await ours.astart()
    forwards: list[tuple[str, ...]] = []
    original_forward = ours.tower.forward

    def recording_forward(units):
        forwards.append(tuple(u.meta["unit"].modality.name for u in units))
        return original_forward(units)

    ours.tower.forward = recording_forward
    groups: list[tuple[bool, tuple[str, ...]]] = []
    original_group = ours.tower._forward_group

    def recording_group(metas, pixels, mixed):
        groups.append((mixed, tuple(m.modality.name for m in metas)))
        return original_group(metas, pixels, mixed)

    ours.tower._forward_group = recording_group
    res["ours_outcomes"] = await _run_pipeline(enc, ours, _video_workload(prefill, "C"))
    res["ours"] = _embeddings(prefill, "C")
    res["forwards"] = forwards
    res["groups"] = groups
    res["stats"] = dict(ours.stats)
    # One request of two videos as the coalescer splits it: one unit per video, real preprocessing.
    two = _video_workload(prefill, "U")[2]
    pre = await asyncio.get_running_loop().run_in_executor(None, ours._preprocess, two, Modality.VIDEO)
    metas, pixels = _split_units(enc, pre, two, Modality.VIDEO)
    res["split"] = {"leaves": [m.leaf for m in metas], "grids": [m.grid.tolist() for m in metas],
                    "tokens": [m.tokens for m in metas], "extras": [m.extras for m in metas],
                    "shared": [m.shared for m in metas], "rows": [p.shape[0] for p in pixels],
                    "pre_grid": pre.grid_thw.tolist(), "pre_tokens": [int(t) for t in pre.token_counts],
                    "pre_keys": sorted(pre.mm_inputs),
                    "pixels_whole": bool(torch.equal(torch.cat(pixels), pre.mm_inputs["pixel_values_videos"]))}

    # Rank 0 of a TP group: the same workload through a scheduler with a PUSH socket to its worker (read back
    # here): never started explicitly (its first request starts it), one modality per forward, each announced
    # with SGLang's batch_encode message (one single-item request per unit); the embeddings are unchanged.
    import zmq
    from sglang.srt.managers.io_struct import sock_recv, unwrap_from_pickle
    from sglang.srt.utils.network import get_zmq_socket

    path = f"ipc://{tempfile.mkdtemp()}/bcast"
    context = zmq.Context()
    pull = get_zmq_socket(context, zmq.PULL, path, True)
    push = get_zmq_socket(context, zmq.PUSH, path, False)
    bcast = CoalescedEncoderScheduler(enc, [push], config)
    started = time.time()
    res["bcast_outcomes"] = await _run_pipeline(enc, bcast, _video_workload(prefill, "B"))
    res["bcast"] = _embeddings(prefill, "B")
    messages = []
    while pull.poll(200):
        message = unwrap_from_pickle(sock_recv(pull))
        sent_at = message.pop("enter_time", None)
        messages.append({**message, "sent_in_run": isinstance(sent_at, float) and started <= sent_at <= time.time()})
    res["bcast_messages"] = messages
    res["bcast_forwards"] = bcast.coalescer.stats()["forwards"]
    res["bcast_inflight"] = bcast.coalescer.config.max_inflight_batches
    res["bcast_sndtimeo"] = push.getsockopt(zmq.SNDTIMEO)
    await bcast.stop()
    context.destroy(linger=0)
    await ours.stop()
    rt._BATCHABLE_MODALITIES.discard(Modality.VIDEO)
    return _plain(res)


def _worker_main(port: int, schedule_path: str) -> None:
    """TP rank 1 as SGLang runs it (server.run_encoder): PULL socket -> _handle_encoder_worker_request."""
    _init_dist(1, 2, port)
    enc = _build_encoder(1)

    async def serve() -> None:
        import zmq
        from sglang.srt.disaggregation.encoder.server import _handle_encoder_worker_request
        from sglang.srt.managers.io_struct import async_sock_recv
        from sglang.srt.utils.network import get_zmq_socket

        sock = get_zmq_socket(enc.context, zmq.PULL, schedule_path, True)
        while True:
            await _handle_encoder_worker_request(enc, await async_sock_recv(sock))

    asyncio.run(serve())


def _tp2_main(out) -> None:
    try:
        out.put(("ok", asyncio.run(_tp2_scenarios())))
    except BaseException:
        out.put(("error", traceback.format_exc()))


async def _tp2_scenarios() -> dict:
    import zmq
    from sglang.srt.disaggregation.encoder.runtime import EncoderScheduler
    from sglang.srt.utils.network import get_zmq_socket

    port = _free_port()
    path = f"ipc://{tempfile.mkdtemp()}/schedule_1"
    worker = mp.get_context("spawn").Process(target=_worker_main, args=(port, path), daemon=True)
    worker.start()  # rank 0 starts its TP worker, as runtime.launch_local_runtime does
    try:
        return await _tp2_with_worker(port, worker, get_zmq_socket(zmq.Context(), zmq.PUSH, path, False),
                                      EncoderScheduler)
    finally:
        if worker.is_alive():
            worker.kill()


async def _tp2_with_worker(port, worker, push, EncoderScheduler) -> dict:
    _init_dist(0, 2, port)
    from mm_scheduler_sglang.epd import CoalescedEncoderScheduler

    from mm_scheduler import CoalescerConfig

    enc = _build_encoder(0)
    prefill = Prefill()
    res: dict = {}
    sglang_sched = EncoderScheduler(enc, [push], max_batch_size=8)
    sglang_sched.start()
    res["sglang_outcomes"] = await _run_pipeline(enc, sglang_sched, _workload(prefill, "S"), [push])
    await sglang_sched.stop()
    res["sglang"] = _embeddings(prefill, "S")

    config = CoalescerConfig(name="epd-tp2", budget_bytes=64 * 1024 * 1024, bytes_per_patch=8192,
                             max_batch_items=16)
    ours = CoalescedEncoderScheduler(enc, [push], config, worker_processes=[worker])
    await ours.astart()
    res["ours_outcomes"] = await _run_pipeline(enc, ours, _workload(prefill, "C"), [push])
    res["ours"] = _embeddings(prefill, "C")
    res["forwards"] = ours.coalescer.stats()["forwards"]

    # The worker dies mid-batch: after rank 0 broadcast the batch, before the collective.
    real_sync = enc._sync_tp_prepare_status

    def die_then_sync(*args, **kwargs):
        if worker.is_alive():
            worker.kill()
            worker.join(10)
        return real_sync(*args, **kwargs)

    enc._sync_tp_prepare_status = die_then_sync
    res["death_outcomes"] = await asyncio.wait_for(_run_pipeline(enc, ours, _workload(prefill, "X")[:5]), 60)
    res["after_death"] = await asyncio.wait_for(_run_pipeline(enc, ours, _workload(prefill, "Y")[:1]), 30)
    res["states_left"] = sorted(enc.req_states)
    return _plain(res)


def _plain(value):
    """Tensors -> nested lists, so results pickle through the queue without torch storage sharing."""
    import torch

    if isinstance(value, torch.Tensor):
        return ("tensor", value.tolist())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(targets: list[tuple], timeout: float) -> list:
    """Run ``targets`` in spawned processes; collect one result per process or fail on timeout/crash."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=fn, args=(*args, out)) for fn, *args in targets]  # may start their own workers
    for p in procs:
        p.start()
    try:
        results = []
        for _ in procs:
            try:
                results.append(out.get(timeout=timeout))
            except queue.Empty:
                pytest.fail(f"EPD scenario did not finish within {timeout}s (hang)")
        return results
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


# --- tests -----------------------------------------------------------------------------------------
def test_the_launch_hook_installs_the_coalescer_only_when_enabled(monkeypatch):
    from mm_scheduler_sglang import epd

    installed = []
    monkeypatch.setattr(epd, "install", installed.append)
    runtime = SimpleNamespace()

    def launch(server_args):
        return runtime if server_args == "server-args" else None

    monkeypatch.setenv(epd.ENV_EPD, "0")
    assert epd._around_launch_local_runtime(launch, "server-args") is runtime and installed == []
    monkeypatch.setenv(epd.ENV_EPD, "1")
    assert epd._around_launch_local_runtime(launch, "server-args") is runtime and installed == [runtime]


def test_bytes_per_patch_is_declared_from_the_vision_config_unless_configured():
    from mm_scheduler_sglang.epd import EPDTower

    def tower(encoder, **kwargs):
        return EPDTower(SimpleNamespace(model_type="qwen2_5_vl", **encoder), [], **kwargs).bytes_per_patch

    vision = SimpleNamespace(hidden_size=64, depth=3)
    served = {"model_config": SimpleNamespace(hf_config=SimpleNamespace(vision_config=vision)), "_element_size": 4}
    assert tower(served) == 64 * 2 * 3 * 4  # hidden * 2 * depth * element size
    assert tower(served, bytes_per_patch=1000) == 1000  # the YAML's value wins
    # No model_config (the model's own config), num_hidden_layers for depth, 2-byte elements by default
    layers = SimpleNamespace(hidden_size=48, num_hidden_layers=5)
    assert tower({"model": SimpleNamespace(config=SimpleNamespace(vision_config=layers))}) == 48 * 2 * 5 * 2
    assert tower({"model": SimpleNamespace()}) == 1280 * 2 * 32 * 2  # nothing declared: a Qwen2.5-VL-7B tower
    no_vision = {"model_config": SimpleNamespace(hf_config=SimpleNamespace()), "_element_size": 4}
    assert tower(no_vision) == 1280 * 2 * 32 * 4


def test_per_item_extras_are_concatenated_and_shared_ones_passed_whole():
    import torch
    from mm_scheduler_sglang.epd import UnitMeta, _merge_extras

    def meta(t: float, name: str, fps: int):
        return UnitMeta("IMAGE", name, torch.zeros(1, 3), 4, extras={"ts": torch.tensor([t]), "names": [name]},
                        shared={"fps": fps})

    merged = _merge_extras([meta(1.0, "a", 2), meta(2.0, "b", 3), meta(3.0, "c", 3)])
    # a batch passes one request's shared outputs: the first unit's
    assert sorted(merged) == ["fps", "names", "ts"] and merged["fps"] == 2 and merged["names"] == ["a", "b", "c"]
    assert torch.equal(merged["ts"], torch.tensor([1.0, 2.0, 3.0]))


def test_install_builds_the_scheduler_from_the_yaml_named_by_the_environment(monkeypatch, tmp_path, caplog):
    import logging

    from mm_scheduler_sglang import epd
    from sglang.srt.disaggregation.encoder import runtime as rt
    from sglang.srt.disaggregation.encoder import server
    from sglang.srt.managers.schedule_batch import Modality

    monkeypatch.setattr(rt, "_BATCHABLE_MODALITIES", {Modality.IMAGE})
    encoder = SimpleNamespace(model_type="qwen2_5_vl", model_config=SimpleNamespace(hf_config=SimpleNamespace()))
    worker = SimpleNamespace(sentinel=-1)

    def installed():
        runtime = SimpleNamespace(encoder=encoder, send_sockets=[], tp_processes=(worker,), scheduler=None)
        with caplog.at_level(logging.INFO, logger="mm_scheduler_sglang.epd"):
            scheduler = epd.install(runtime)
        assert runtime.scheduler is scheduler and scheduler.worker_processes == [worker]
        assert caplog.records[-1].getMessage() == \
            f"mm-coalescer EPD: encoder batching by the coalescer (budget {scheduler.budget_bytes} bytes)"
        return scheduler

    monkeypatch.delenv(epd.ENV_CONFIG, raising=False)
    default = installed()
    assert default.coalescer.config.name == "epd" and rt._BATCHABLE_MODALITIES == {Modality.IMAGE, Modality.VIDEO}
    assert default.request_timeout == float(server.ENCODER_REQ_TIMEOUT)
    yaml = tmp_path / "epd.yaml"
    yaml.write_text("name: epd-yaml\nbudget_bytes: 123456789\nbytes_per_patch: 1000\n")
    monkeypatch.setenv(epd.ENV_CONFIG, str(yaml))
    configured = installed()
    assert configured.coalescer.config.name == "epd-yaml" and configured.budget_bytes == 123456789
    assert configured.tower.bytes_per_patch == 1000
    assert epd.CoalescedEncoderScheduler(encoder, []).coalescer.config.name == "epd"  # no config at all


def test_errors_reach_sglang_as_mmerror_with_the_status_a_client_should_see():
    from http import HTTPStatus

    from mm_scheduler_sglang.epd import WorkerDiedError, _as_mm_error
    from sglang.srt.disaggregation.encoder.server import MMError

    from mm_scheduler import CoalescerClosedError, EncodeError, InvalidItemError, QueueFullError

    own = MMError("as is", code=HTTPStatus.BAD_GATEWAY)
    assert _as_mm_error(own) is own

    def seen(exc):
        err = _as_mm_error(exc)
        return type(err), err.code, err.message

    for exc in (InvalidItemError("too big"), ValueError("bad grid"), TypeError("not a list")):
        assert seen(exc) == (MMError, HTTPStatus.BAD_REQUEST, f"bad request: {exc}")
    for exc in (QueueFullError("full"), CoalescerClosedError("closed"), WorkerDiedError("rank 1 exited")):
        assert seen(exc) == (MMError, HTTPStatus.SERVICE_UNAVAILABLE, str(exc))
    try:
        raise EncodeError("forward failed") from RuntimeError("cuda")
    except EncodeError as exc:
        assert seen(exc) == (MMError, HTTPStatus.INTERNAL_SERVER_ERROR,
                             "forward failed (cause: RuntimeError('cuda'))")
    assert seen(KeyError("k")) == (MMError, HTTPStatus.INTERNAL_SERVER_ERROR, "KeyError: 'k'")


def test_per_item_outputs_are_those_with_one_entry_per_grid_entry():
    import torch
    from mm_scheduler_sglang.epd import _is_per_item

    assert _is_per_item(torch.zeros(3), 3) and _is_per_item(torch.zeros(3, 2), 3) and _is_per_item([1, 2, 3], 3)
    assert not _is_per_item(torch.zeros(2, 3), 3) and not _is_per_item(torch.tensor(3.0), 3)
    assert not _is_per_item([1, 2], 3) and not _is_per_item((1, 2, 3), 3) and not _is_per_item(3, 3)


def _scenario(main, scenarios) -> dict:
    if IN_PROCESS:
        return _plain(asyncio.run(scenarios()))
    (status, payload), = _spawn([(main,)], TIMEOUT_S)
    assert status == "ok", payload
    return payload


@pytest.fixture(scope="module")
def tp1() -> dict:
    if IN_PROCESS:
        pytest.skip("in-process: test_tp1_checks_in_one_test runs these checks")
    return _scenario(_tp1_main, _tp1_scenarios)


def test_embeddings_at_prefill_identical_to_sglang_encoder_scheduler(tp1):
    assert set(tp1["sglang_outcomes"].values()) == {"ok"}, tp1["sglang_outcomes"]
    assert set(tp1["ours_outcomes"].values()) == {"ok"}, tp1["ours_outcomes"]
    assert sorted(tp1["sglang"]) == sorted(tp1["ours"]) and len(tp1["ours"]) == 8
    for key, theirs in tp1["sglang"].items():
        import torch

        a, b = torch.tensor(theirs[1]), torch.tensor(tp1["ours"][key][1])
        assert a.shape == b.shape, key
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=key)


def test_images_of_different_requests_share_forwards(tp1):
    forwards = tp1["forwards"]
    assert sum(len(f) for f in forwards) == 15  # 8 requests, 15 images
    assert len(forwards) < 8 and max(len(f) for f in forwards) > 3


def test_malformed_undecodable_and_oversized_requests_fail_alone_with_400(tp1):
    outcomes = tp1["failure_outcomes"]
    for rid in ("Bmalformed", "Bundecodable", "Boversized"):
        assert "400" in outcomes[rid] or "BadRequest" in outcomes[rid], (rid, outcomes[rid])
    # as SGLang's own validation reports it; then SGLang's loader's error and ours, both 400
    assert outcomes["Bmalformed"].startswith("BadRequestError: 400 ") and "mm_items" in outcomes["Bmalformed"]
    assert outcomes["Bundecodable"].startswith("MMError: 400 Error while loading data"), outcomes
    assert outcomes["Boversized"].startswith("MMError: 400 bad request: item 0: can never be encoded"), outcomes
    assert [o for r, o in outcomes.items() if r.startswith("G")] == ["ok"] * 3


def test_poisoned_image_fails_only_its_request_and_prefill_is_told(tp1):
    outcomes = tp1["poison_outcomes"]
    assert "MMError" in outcomes["Ppoison"] and "poisoned" in outcomes["Ppoison"]
    assert [o for r, o in outcomes.items() if r != "Ppoison"] == ["ok"] * 4
    assert len(tp1["poison_embeddings"]) == 4  # the four mates' embeddings reached prefill
    msg, code = tp1["prefill_errors"]["Ppoison"]
    assert "poisoned" in msg and code == 500


def test_disconnected_client_is_withdrawn_and_others_finish(tp1):
    d = tp1["disconnect"]
    assert d["cancelled"] and d["pending_after_cancel"] == 1, d
    assert list(d["first"].values()) == ["ok"] and d["stayer"] == {"Lstay": "ok"}, d
    assert d["states_left"] == [], d  # nothing staged or leaked for anyone


def test_a_tp_worker_that_exits_fails_requests_with_503_at_once(tp1):
    w = tp1["worker_exit"]
    assert w["dead"] == f"encoder TP worker rank 1 (pid {w['pid']}) exited with code -9", w
    assert w["failed_at_once"], w  # not after its held forward
    for outcome in (*w["inflight"].values(), *w["later"].values()):
        assert "503" in outcome and w["dead"] in outcome, w
    assert w["log"] == [f"mm-coalescer EPD: {w['dead']}; failing its requests"], w


TP1_CHECKS = (test_embeddings_at_prefill_identical_to_sglang_encoder_scheduler,
              test_images_of_different_requests_share_forwards,
              test_malformed_undecodable_and_oversized_requests_fail_alone_with_400,
              test_poisoned_image_fails_only_its_request_and_prefill_is_told,
              test_disconnected_client_is_withdrawn_and_others_finish,
              test_a_tp_worker_that_exits_fails_requests_with_503_at_once)


@pytest.mark.skipif(not IN_PROCESS, reason="spawned: the TP=1 checks run one test each")
def test_tp1_checks_in_one_test():
    res = _scenario(_tp1_main, _tp1_scenarios)
    for check in TP1_CHECKS:
        check(res)


@pytest.fixture(scope="module")
def tp1_video() -> dict:
    if IN_PROCESS:
        pytest.skip("in-process: test_video_checks_in_one_test runs these checks")
    return _scenario(_tp1_video_main, _tp1_video_scenarios)


def test_videos_are_coalesced_with_images_and_reach_prefill_as_sglangs_own_video_path_encodes_them(tp1_video):
    res = tp1_video
    assert "VIDEO" not in res["batchable_before"] and "VIDEO" in res["batchable_after"] and res["installed"]
    assert set(res["sglang_outcomes"].values()) == {"ok"}, res["sglang_outcomes"]
    assert set(res["ours_outcomes"].values()) == {"ok"}, res["ours_outcomes"]
    assert sorted(res["sglang"]) == sorted(res["ours"]) == ["i0", "i1", "i2", "v0", "v1", "v2"]
    import torch

    for key, theirs in res["sglang"].items():
        a, b = torch.tensor(theirs[1]), torch.tensor(res["ours"][key][1])
        assert a.shape == b.shape, key
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=key)
    units = [m for forward in res["forwards"] for m in forward]
    assert units.count("VIDEO") == 4 and units.count("IMAGE") == 3  # one unit per video, per image
    assert len(res["forwards"]) < 6  # requests shared forwards
    assert any({"VIDEO", "IMAGE"} <= set(f) for f in res["forwards"]), res["forwards"]  # Qwen2.5-VL mixes them
    assert res["stats"] == {"submitted": 6, "ok": 6, "failed": 0, "cancelled": 0}
    # TP=1: each forward is one mixed group (the tower's own call for both)
    assert len(res["groups"]) == len(res["forwards"]) and all(mixed for mixed, _ in res["groups"]), res["groups"]
    assert any({"VIDEO", "IMAGE"} <= set(kinds) for _, kinds in res["groups"]), res["groups"]


def test_a_request_of_two_videos_is_split_into_one_unit_per_video(tp1_video):
    split = tp1_video["split"]
    assert split["leaves"] == ["synthetic:3:6:56:56", "synthetic:4:2:56:112"]
    assert split["grids"] == [[row] for row in split["pre_grid"]] and split["tokens"] == split["pre_tokens"]
    assert split["rows"] == [t * h * w for t, h, w in split["pre_grid"]] and split["pixels_whole"]
    per_item = [k for k in split["pre_keys"] if k not in ("pixel_values_videos", "video_grid_thw")]
    assert per_item and [sorted(e) for e in split["extras"]] == [per_item, per_item], split
    assert all(len(value[1]) == 1 for e in split["extras"] for value in e.values()), split  # its own entry
    assert split["shared"] == [{}, {}], split


def test_rank0_of_a_tp_group_announces_each_forward_with_sglangs_batch_encode_message(tp1_video):
    res = tp1_video
    assert set(res["bcast_outcomes"].values()) == {"ok"}, res["bcast_outcomes"]
    import torch

    assert sorted(res["bcast"]) == sorted(res["sglang"])
    for key, theirs in res["sglang"].items():
        torch.testing.assert_close(torch.tensor(res["bcast"][key][1]), torch.tensor(theirs[1]), rtol=1e-5,
                                   atol=1e-5, msg=key)
    assert res["bcast_inflight"] == 1 and res["bcast_sndtimeo"] == 10_000  # as workers run them; never block
    messages = res["bcast_messages"]
    # one message per modality group of a forward (TP>1 never mixes them)
    assert len(messages) >= res["bcast_forwards"] and {m["modality"] for m in messages} == {"IMAGE", "VIDEO"}
    leaves = []
    for batch, message in enumerate(messages):
        kind = message["modality"]
        assert kind in ("IMAGE", "VIDEO") and message["type"] == "batch_encode" and message["sent_in_run"], message
        assert sorted(message) == ["modality", "requests", "sent_in_run", "type"], message
        for i, req in enumerate(message["requests"]):
            leaf, = req["mm_items"]
            assert req == {"req_id": f"mmc{batch}/{i}", "modality": kind, "mm_items": [leaf], "num_parts": 1,
                           "part_idx": 0}, req
            assert leaf.startswith("synthetic:" if kind == "VIDEO" else "data:image/png"), (kind, leaf[:20])
            leaves.append(leaf)
    assert len(leaves) == 7 and len(set(leaves)) == 7  # every unit once: 4 videos, 3 images


VIDEO_CHECKS = (test_videos_are_coalesced_with_images_and_reach_prefill_as_sglangs_own_video_path_encodes_them,
                test_a_request_of_two_videos_is_split_into_one_unit_per_video,
                test_rank0_of_a_tp_group_announces_each_forward_with_sglangs_batch_encode_message)


@pytest.mark.skipif(not IN_PROCESS, reason="spawned: the video checks run one test each")
def test_video_checks_in_one_test():
    res = _scenario(_tp1_video_main, _tp1_video_scenarios)
    for check in VIDEO_CHECKS:
        check(res)


@pytest.fixture(scope="module")
def tp2() -> dict:
    (status, payload), = _spawn([(_tp2_main,)], TIMEOUT_S)
    assert status == "ok", payload
    return payload


def test_tp2_rank0_plans_batches_and_unmodified_sglang_worker_follows(tp2):
    assert set(tp2["sglang_outcomes"].values()) == {"ok"}, tp2["sglang_outcomes"]
    assert set(tp2["ours_outcomes"].values()) == {"ok"}, tp2["ours_outcomes"]
    assert tp2["forwards"] < 8
    import torch

    for key, theirs in tp2["sglang"].items():
        torch.testing.assert_close(torch.tensor(tp2["ours"][key][1]), torch.tensor(theirs[1]),
                                   rtol=1e-5, atol=1e-5, msg=key)


def test_tp_worker_dying_mid_batch_fails_requests_with_503_and_never_hangs(tp2):
    outcomes = tp2["death_outcomes"]
    assert outcomes and all(o != "ok" for o in outcomes.values()), outcomes
    assert all("500" in o or "503" in o for o in outcomes.values()), outcomes
    after, = tp2["after_death"].values()
    assert "503" in after and "exited" in after
    assert tp2["states_left"] == []


# --- the scheduler's request contract, in the test process (a real MMEncoder and tower, one request at a time) ----
@pytest.fixture(scope="module")
def encoder():
    """Rank 0's MMEncoder of the scenarios above, built once in the test process (videos synthetic, as there)."""
    import sglang_models as sm

    sm.init_sglang_cpu()
    enc = _build_encoder(0)
    _synthetic_videos(enc.preprocessor)
    yield enc
    assert enc.req_states == {}, "a test left encode state behind"


class _Gate:
    """Holds the tower's forwards on the coalescer's forward thread while closed."""

    def __init__(self, tower) -> None:
        import threading

        self.opened, self.entered = threading.Event(), threading.Event()
        self.opened.set()
        real = tower._forward_group

        def held(metas, pixels, mixed):
            self.entered.set()
            if not self.opened.wait(30):
                raise RuntimeError("the test never opened the gate")
            return real(metas, pixels, mixed)

        tower._forward_group = held


async def _in_thread(wait, timeout: float = 30) -> bool:
    """``wait(timeout)`` of a threading.Event, off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, wait, timeout)


def _small_config(**changes):
    from mm_scheduler import CoalescerConfig

    # 200 patches of 8 KiB: a 56x56 image is 16 patches, a 224x224 one (256) can never be encoded
    return CoalescerConfig(name="epd-unit", budget_bytes=8192 * 200, bytes_per_patch=8192, max_batch_items=16,
                           **changes)


def _unit_request(rid: str, modality: str, items: list, num_parts: int = 1, part_idx: int = 0) -> dict:
    return {"req_id": rid, "modality": modality, "mm_items": items, "num_parts": num_parts, "part_idx": part_idx}


def _staged_fields(enc, rid: str) -> dict:
    """What rank 0 staged for ``rid`` (and /send delivers to prefill), but its req_id and transient fields."""
    import torch

    data = enc.req_states[rid].embedding_data
    fields = {k: v for k, v in vars(data).items() if k not in ("req_id", "send_time", "_mr_ptr")}
    return {k: v.tolist() if isinstance(v, torch.Tensor) and k != "embedding" else v for k, v in fields.items()}


async def _release_all(enc) -> None:
    for rid in list(enc.req_states):
        await enc.release_request(rid)


def test_staged_embedding_data_is_what_sglangs_batch_encode_stages_for_images_and_videos(encoder):
    """Everything prefill receives besides the tensor: parts, grid, modality, video metadata, the result tuple."""
    import torch
    from mm_scheduler_sglang.epd import CoalescedEncoderScheduler
    from sglang.srt.managers.schedule_batch import Modality

    requests = [("image", [_png(56, 84, 1), _png(84, 56, 2)], 3, 2),
                ("video", ["synthetic:3:6:56:56", "synthetic:4:2:56:112"], 2, 1)]

    async def scenario_of(requests):
        sched = CoalescedEncoderScheduler(encoder, [], _small_config())
        compared = []
        for n, (kind, items, num_parts, part_idx) in enumerate(requests):
            modality = Modality.from_str(kind)
            theirs, = await encoder.batch_encode([_unit_request(f"S{n}", kind, items, num_parts, part_idx)],
                                                 modality)
            ours = await sched.submit(_unit_request(f"C{n}", kind, items, num_parts, part_idx))
            compared.append((ours, theirs, _staged_fields(encoder, f"C{n}"), _staged_fields(encoder, f"S{n}")))
        await sched.stop()
        await _release_all(encoder)
        return compared

    compared = asyncio.run(scenario_of(requests))
    for ours, theirs, staged, reference in compared:
        assert ours == theirs and ours[3:] == (None, None), (ours, theirs)  # nbytes, tokens, dim, no error
        torch.testing.assert_close(staged.pop("embedding"), reference.pop("embedding"), rtol=1e-5, atol=1e-5)
        assert staged == reference
    image, video = (staged for _, _, staged, _ in compared)
    assert (image["num_parts"], image["part_idx"], image["modality"]) == (3, 2, Modality.IMAGE)
    assert len(image["grid_dim"]) == 2 and image["second_per_grid_ts"] is None
    assert (video["num_parts"], video["part_idx"], video["modality"]) == (2, 1, Modality.VIDEO)
    assert len(video["grid_dim"]) == 2 and len(video["second_per_grid_ts"]) == 2  # qwen2_5_vl's video metadata
    # which metadata travels depends on the served model type (MiMo adds its audio-in-video fields), as in SGLang
    encoder.model_type = "mimo_vl"
    try:
        (ours, theirs, staged, reference), = asyncio.run(scenario_of([requests[1]]))
    finally:
        encoder.model_type = "qwen2_5_vl"
    assert ours == theirs and "video_audio_feature_lens" in reference
    torch.testing.assert_close(staged.pop("embedding"), reference.pop("embedding"), rtol=1e-5, atol=1e-5)
    assert staged == reference


def test_submit_counts_each_request_once_by_outcome_and_always_releases_its_encode_ref(encoder):
    from mm_scheduler_sglang.epd import CoalescedEncoderScheduler
    from sglang.srt.disaggregation.encoder import server as server_module

    async def scenario():
        import threading

        sched = CoalescedEncoderScheduler(encoder, [], _small_config())
        gate = _Gate(sched.tower)
        preprocessed = threading.Event()
        real_preprocess = sched._preprocess

        def signalling_preprocess(request, modality):
            result = real_preprocess(request, modality)
            preprocessed.set()
            return result

        sched._preprocess = signalling_preprocess
        seen: list[tuple] = []

        def record(rid, outcome):
            refs = encoder.req_states[rid].active_encodes if rid in encoder.req_states else None
            seen.append((rid, outcome, dict(sched.stats), refs))

        async def cancelled(rid):  # the client leaves once the request is queued behind the held forward
            gate.opened.clear()
            preprocessed.clear()
            task = asyncio.ensure_future(sched.submit(_unit_request(rid, "image", [_png(56, 56, 3)])))
            assert await _in_thread(preprocessed.wait)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=30)
            record(rid, "cancelled" if task in done and task.cancelled() else task)
            gate.opened.set()

        # malformed: refused before anything is counted or held, as SGLang's validation words it
        with pytest.raises(server_module.BadRequestError) as malformed:
            await sched.submit(_unit_request("malformed", "image", []))
        record("malformed", (malformed.value.code, malformed.value.message))
        record("ok-image", await sched.submit(_unit_request("ok-image", "image", [_png(56, 56, 1)])))
        record("ok-video", await sched.submit(_unit_request("ok-video", "video", ["synthetic:1:4:56:84"])))
        record("undecodable", await sched.submit(
            _unit_request("undecodable", "image", ["data:image/png;base64,AAAAnotapng"])))
        # the forward outlives the request's timeout: TimeoutError to SGLang's pipeline, which publishes it
        gate.opened.clear()
        gate.entered.clear()
        sched.request_timeout = 0.2
        late = asyncio.ensure_future(sched.submit(_unit_request("late", "image", [_png(56, 56, 4)])))
        done, _ = await asyncio.wait({late}, timeout=20)
        record("late", type(late.exception()).__name__ if late in done else "still waiting")
        sched.request_timeout = 60.0
        assert await _in_thread(gate.entered.wait)  # it did reach the tower
        gate.opened.set()
        record("oversized", await sched.submit(_unit_request("oversized", "image", [_png(224, 224, 5)])))
        await cancelled("gone-1")
        await cancelled("gone-2")
        errors = {rid: _staged_fields(encoder, rid) for rid in ("undecodable", "oversized")}
        await sched.stop()
        await _release_all(encoder)
        return seen, errors

    seen, errors = asyncio.run(scenario())
    outcome = {rid: result for rid, result, _, _ in seen}
    assert outcome["ok-image"][1:] == (16 // 4, 64, None, None)  # 16 patches merged 2x2: 4 tokens of 64
    assert outcome["ok-video"][3:] == (None, None) and outcome["ok-video"][1] > 0
    assert outcome["late"] == "TimeoutError"
    assert outcome["malformed"] == (400, "missing or empty mm_items")
    assert outcome["gone-1"] == outcome["gone-2"] == "cancelled"
    for rid in ("undecodable", "oversized"):  # failed requests: SGLang's error tuple, and the error staged for /send
        assert outcome[rid][:3] == (0, 0, 0) and outcome[rid][4] == 400, outcome[rid]
        assert (errors[rid]["error_msg"], errors[rid]["error_code"]) == outcome[rid][3:], errors[rid]
        assert errors[rid]["embedding"] is None and errors[rid]["modality"].name == "IMAGE"
    assert outcome["oversized"][3].startswith("bad request: item 0: can never be encoded"), outcome["oversized"]
    counts = [(rid, stats) for rid, _, stats, _ in seen]
    assert counts == [
        ("malformed", {"submitted": 0, "ok": 0, "failed": 0, "cancelled": 0}),
        ("ok-image", {"submitted": 1, "ok": 1, "failed": 0, "cancelled": 0}),
        ("ok-video", {"submitted": 2, "ok": 2, "failed": 0, "cancelled": 0}),
        ("undecodable", {"submitted": 3, "ok": 2, "failed": 1, "cancelled": 0}),
        ("late", {"submitted": 4, "ok": 2, "failed": 2, "cancelled": 0}),
        ("oversized", {"submitted": 5, "ok": 2, "failed": 3, "cancelled": 0}),
        ("gone-1", {"submitted": 6, "ok": 2, "failed": 3, "cancelled": 1}),
        ("gone-2", {"submitted": 7, "ok": 2, "failed": 3, "cancelled": 2}),
    ]
    refs = {rid: refs for rid, _, _, refs in seen}
    assert refs.pop("malformed") is None, seen  # refused before any encode state existed
    assert set(refs.values()) == {0}, seen  # every other outcome gave its encode ref back


async def _until(condition, what: str, timeout: float = 20) -> None:
    """Wait (polling the loop) until ``condition()`` holds: state changed by other tasks of this loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.005)


def test_stop_fails_queued_requests_with_503_finishes_the_running_forward_and_does_not_wait_for_preprocessing(
        encoder):
    """SGLang's runtime stops the scheduler on shutdown: nothing may hang, and every request gets an answer."""
    import threading

    from mm_scheduler_sglang.epd import CoalescedEncoderScheduler

    async def scenario():
        read_fd, write_fd = os.pipe()  # a worker process's sentinel: readable once it exits (never, here)
        worker = SimpleNamespace(sentinel=read_fd, pid=0, exitcode=None)
        sched = CoalescedEncoderScheduler(encoder, [], _small_config(max_inflight_batches=1),
                                          worker_processes=[worker], preprocess_workers=1)
        gate = _Gate(sched.tower)
        gate.opened.clear()
        held_preprocess, preprocess_entered, preprocess_done = threading.Event(), threading.Event(), threading.Event()
        preprocessed: list[str] = []
        real_preprocess = sched._preprocess

        def preprocess(request, modality):
            preprocessed.append(request["req_id"])
            if request["req_id"] == "preprocessing":
                preprocess_entered.set()
                held_preprocess.wait(30)
            try:
                return real_preprocess(request, modality)
            finally:
                if request["req_id"] == "preprocessing":
                    preprocess_done.set()

        sched._preprocess = preprocess
        pool_submit = sched._pool.submit
        pool_calls: list = []
        sched._pool.submit = lambda *args, **kwargs: pool_calls.append(args) or pool_submit(*args, **kwargs)

        def submit(rid, seed):
            return asyncio.ensure_future(sched.submit(_unit_request(rid, "image", [_png(56, 56, seed)])))

        running = submit("running", 1)
        assert await _in_thread(gate.entered.wait)
        queued = submit("queued", 2)
        await _until(lambda: sched.coalescer.stats()["pending_units"] == 1, "a unit queued behind the forward")
        preprocessing = submit("preprocessing", 3)
        assert await _in_thread(preprocess_entered.wait)
        waiting = submit("waiting", 4)
        await _until(lambda: len(pool_calls) == 4, "a preprocessing job queued behind the held one")
        # a stop that waited for the held preprocessing would block the loop: let it end by itself then
        timer = threading.Timer(15, held_preprocess.set)
        timer.start()
        stopping = asyncio.ensure_future(sched.stop())
        done, _ = await asyncio.wait({queued}, timeout=10)
        outcome = {"queued_failed_while_forward_held": queued in done and not gate.opened.is_set()}
        gate.opened.set()
        done, _ = await asyncio.wait({stopping, running}, timeout=20)
        outcome["stopped_while_preprocessing"] = stopping in done and not preprocess_done.is_set()
        done, _ = await asyncio.wait({waiting}, timeout=10)
        outcome["waiting_cancelled_at_stop"] = waiting in done and waiting.cancelled()
        held_preprocess.set()
        timer.cancel()
        await asyncio.wait({preprocessing, waiting, stopping}, timeout=30)
        for name, task in (("running", running), ("queued", queued), ("preprocessing", preprocessing)):
            outcome[name] = task.result() if task.done() and not task.cancelled() else task
        outcome["reader_left"] = asyncio.get_running_loop().remove_reader(read_fd)
        outcome["preprocessed"] = sorted(preprocessed)
        outcome["stats"] = dict(sched.stats)
        os.close(read_fd)
        os.close(write_fd)
        await _release_all(encoder)
        return outcome

    outcome = asyncio.run(scenario())
    assert outcome["queued_failed_while_forward_held"], outcome  # failed at once, not encoded after
    assert outcome["queued"][:3] == (0, 0, 0) and outcome["queued"][4] == 503, outcome
    assert outcome["running"] == (1024, 4, 64, None, None), outcome  # the running batch finishes and delivers
    assert outcome["stopped_while_preprocessing"] and outcome["waiting_cancelled_at_stop"], outcome
    assert outcome["preprocessing"][:3] == (0, 0, 0) and outcome["preprocessing"][4] == 503, outcome
    assert outcome["preprocessed"] == ["preprocessing", "queued", "running"], outcome  # "waiting" never ran
    # the worker watchdog is gone: no reader left to remove (False from asyncio's loop, None from uvloop's, whose
    # policy any earlier import of SGLang's tokenizer manager or engine installs for the whole process)
    assert not outcome["reader_left"], outcome
    assert outcome["stats"] == {"submitted": 4, "ok": 1, "failed": 2, "cancelled": 1}, outcome


def test_preprocessing_without_one_grid_entry_per_item_fails_the_request_with_400_and_says_why(encoder):
    """The coalescer splits a request into one unit per grid entry: a processor output it cannot split that way
    (another model's layout, a processor change) is refused with the counts, never encoded misaligned."""
    import dataclasses

    from mm_scheduler_sglang.epd import CoalescedEncoderScheduler, _split_units
    from sglang.srt.managers.schedule_batch import Modality

    two = _unit_request("two", "image", [_png(56, 84, 1), _png(84, 56, 2)])
    three = _unit_request("three", "image", [_png(56, 56, 3)] * 3)

    async def scenario():
        sched = CoalescedEncoderScheduler(encoder, [], _small_config())
        pre = await asyncio.get_running_loop().run_in_executor(None, sched._preprocess, two, Modality.IMAGE)
        one = await asyncio.get_running_loop().run_in_executor(None, sched._preprocess, three, Modality.IMAGE)
        # through submit: the client's answer (the processor is made to return one image's grid for two)
        sched._preprocess = lambda request, modality: dataclasses.replace(pre, grid_thw=pre.grid_thw[:1])
        answered = await sched.submit(dict(two))
        await sched.stop()
        await _release_all(encoder)
        return pre, one, answered

    pre, one, answered = asyncio.run(scenario())
    rows = pre.mm_inputs["pixel_values"].shape[0]
    assert rows == int(pre.grid_thw.prod(dim=1).sum())  # the real output splits: 6x4 + 4x6 patches
    assert [m.tokens for m in _split_units(encoder, pre, two, Modality.IMAGE)[0]] == [6, 6]
    # an output that is not one entry per item (here a one-element list for two images) goes whole to every unit
    shared = dataclasses.replace(pre, mm_inputs={**pre.mm_inputs, "fps": [2.0]})
    assert [{k: v.tolist() for k, v in m.shared.items()} for m in _split_units(encoder, shared, two,
                                                                                Modality.IMAGE)[0]] == \
        [{"fps": [2.0]}, {"fps": [2.0]}]
    assert answered == (0, 0, 0, "bad request: 2 media items gave torch.Size([1, 3]) grid entries; the coalescer "
                                  "needs one grid entry per item", 400)

    def refused(result, request):
        with pytest.raises(ValueError) as refusal:
            _split_units(encoder, result, request, Modality.IMAGE)
        return str(refusal.value)

    assert refused(dataclasses.replace(pre, grid_thw=None), two) == \
        "2 media items gave ? grid entries; the coalescer needs one grid entry per item"
    # one image's grid row, flat: three entries, but not one [t, h, w] row per item
    assert one.grid_thw.shape == (3, 3)
    assert refused(dataclasses.replace(one, grid_thw=one.grid_thw[0]), three) == \
        "3 media items gave torch.Size([3]) grid entries; the coalescer needs one grid entry per item"
    short = dataclasses.replace(pre, mm_inputs={**pre.mm_inputs, "pixel_values": pre.mm_inputs["pixel_values"][:-4]})
    assert refused(short, two) == f"preprocessing gave {rows - 4} patch rows, the grid says {rows}"


def test_a_preprocessing_thread_reuses_its_event_loop_across_requests(encoder):
    """SGLang's preprocessor is async: each pool thread runs it on one loop of its own, not a new one per request
    (an event loop holds a selector and a self-pipe until closed)."""
    from mm_scheduler_sglang.epd import CoalescedEncoderScheduler
    from sglang.srt.managers.schedule_batch import Modality

    sched = CoalescedEncoderScheduler(encoder, [], _small_config())
    first = sched._preprocess(_unit_request("a", "image", [_png(56, 56, 1)]), Modality.IMAGE)
    loop = sched._thread_loops.loop
    second = sched._preprocess(_unit_request("b", "image", [_png(84, 56, 2)]), Modality.IMAGE)
    assert sched._thread_loops.loop is loop and not loop.is_closed() and not loop.is_running()
    assert first.grid_thw.tolist() == [[1, 4, 4]] and second.grid_thw.tolist() == [[1, 4, 6]]
    loop.close()
    sched._pool.shutdown()


def test_two_tp_workers_exiting_together_fail_the_scheduler_once_and_forwards_say_why(encoder):
    """Each exit is seen on its own sentinel; the second must not trip over the first (both ranks of a TP group
    often die together), and a forward asked for afterwards names the exit instead of running."""
    from mm_scheduler_sglang.epd import CoalescedEncoderScheduler, WorkerDiedError

    async def scenario():
        loop = asyncio.get_running_loop()
        loop_errors: list[dict] = []
        loop.set_exception_handler(lambda _, context: loop_errors.append(context))
        pipes = [os.pipe(), os.pipe()]
        workers = [SimpleNamespace(sentinel=read_fd, pid=100 + rank, exitcode=-9, join=lambda timeout=None: None)
                   for rank, (read_fd, _) in enumerate(pipes, start=1)]
        sched = CoalescedEncoderScheduler(encoder, [], _small_config(), worker_processes=workers)
        exits, both = [], asyncio.Event()
        seen_exit = sched._on_worker_exit

        def on_exit(rank, proc):
            seen_exit(rank, proc)
            exits.append(rank)
            if len(exits) == 2:
                both.set()

        sched._on_worker_exit = on_exit
        await sched.astart()
        for _, write_fd in pipes:  # both sentinels become readable in the same loop iteration
            os.write(write_fd, b"x")
        await asyncio.wait_for(both.wait(), 10)
        with pytest.raises(WorkerDiedError) as refused:
            sched.tower.forward([])
        later = await sched.submit(_unit_request("after", "image", [_png(56, 56, 1)]))
        await sched.stop()
        for fds in pipes:
            for fd in fds:
                os.close(fd)
        await _release_all(encoder)
        return exits, loop_errors, sched.tower.dead, str(refused.value), sched._dead.result(), later

    exits, loop_errors, dead, refused, first, later = asyncio.run(scenario())
    assert sorted(exits) == [1, 2] and loop_errors == [], loop_errors
    reason = {rank: f"encoder TP worker rank {rank} (pid {100 + rank}) exited with code -9" for rank in exits}
    assert first == reason[exits[0]]  # the first exit fails the requests
    assert dead == reason[exits[1]] == refused  # the latest is what later requests and forwards are told
    assert later[:3] == (0, 0, 0) and later[4] == 503 and dead in later[3], later


def test_rank0_of_a_tp_group_encodes_a_lone_unit_as_sglangs_batch_encode_does(encoder):
    """One image alone in a forward at TP>1 (one modality per forward there): announced to the workers, and the
    embedding SGLang's own encoder gives."""
    import tempfile

    import torch
    import zmq
    from mm_scheduler_sglang.epd import CoalescedEncoderScheduler
    from sglang.srt.managers.io_struct import sock_recv, unwrap_from_pickle
    from sglang.srt.managers.schedule_batch import Modality
    from sglang.srt.utils.network import get_zmq_socket

    image = [_png(56, 84, 7)]

    async def scenario():
        context = zmq.Context()
        path = f"ipc://{tempfile.mkdtemp()}/bcast"
        pull = get_zmq_socket(context, zmq.PULL, path, True)
        sched = CoalescedEncoderScheduler(encoder, [get_zmq_socket(context, zmq.PUSH, path, False)], _small_config())
        ours = await sched.submit(_unit_request("lone", "image", image))
        theirs, = await encoder.batch_encode([_unit_request("reference", "image", image)], Modality.IMAGE)
        messages = []
        while pull.poll(200):
            messages.append(unwrap_from_pickle(sock_recv(pull)))
        await sched.stop()
        context.destroy(linger=0)
        embeddings = [encoder.req_states[rid].embedding_data.embedding for rid in ("lone", "reference")]
        await _release_all(encoder)
        return ours, theirs, messages, embeddings

    ours, theirs, messages, (embedding, reference) = asyncio.run(scenario())
    assert ours == theirs and ours[3] is None, (ours, theirs)
    torch.testing.assert_close(embedding, reference, rtol=1e-5, atol=1e-5)
    message, = messages
    assert message["modality"] == "IMAGE" and [r["mm_items"] for r in message["requests"]] == [image]


def test_a_model_with_a_thinker_is_encoded_through_it_as_sglang_does(encoder):
    """Omni-style models keep their towers in ``model.thinker``; SGLang's encoder calls its get_*_feature there."""
    import torch
    from mm_scheduler_sglang.epd import CoalescedEncoderScheduler
    from sglang.srt.managers.schedule_batch import Modality

    image = [_png(84, 56, 8)]

    async def scenario():
        sched = CoalescedEncoderScheduler(encoder, [], _small_config())
        ours = await sched.submit(_unit_request("thinker", "image", image))
        theirs, = await encoder.batch_encode([_unit_request("reference", "image", image)], Modality.IMAGE)
        await sched.stop()
        embeddings = [encoder.req_states[rid].embedding_data.embedding for rid in ("thinker", "reference")]
        await _release_all(encoder)
        return ours, theirs, embeddings

    model = encoder.model
    encoder.model = SimpleNamespace(thinker=model)  # the tower is no longer an attribute of encoder.model itself
    try:
        ours, theirs, (embedding, reference) = asyncio.run(scenario())
    finally:
        encoder.model = model
    assert ours == theirs and ours[3] is None, (ours, theirs)
    torch.testing.assert_close(embedding, reference, rtol=1e-5, atol=1e-5)


class _TowerOutput:
    """The served model with its image tower's output changed: ``[images, tokens, hidden]`` as towers that batch
    per image return it (``batched``), or one token short (a tower and a processor that disagree)."""

    def __init__(self, model, *, batched: bool = False, short: bool = False) -> None:
        self.model, self.batched, self.short = model, batched, short

    def get_image_feature(self, items):
        embedding = self.model.get_image_feature(items)
        embedding = embedding[:-1] if self.short else embedding
        return embedding.unsqueeze(0) if self.batched else embedding


def test_a_3d_tower_output_is_flattened_to_tokens_and_a_token_count_mismatch_fails_the_request(encoder):
    import torch
    from mm_scheduler_sglang.epd import CoalescedEncoderScheduler
    from sglang.srt.managers.schedule_batch import Modality

    images = [_png(56, 84, 9), _png(56, 56, 10)]

    async def scenario(tag):
        sched = CoalescedEncoderScheduler(encoder, [], _small_config())
        ours = await sched.submit(_unit_request(f"{tag}-ours", "image", images))
        theirs, = await encoder.batch_encode([_unit_request(f"{tag}-theirs", "image", images)], Modality.IMAGE)
        await sched.stop()
        embeddings = [encoder.req_states[f"{tag}-{who}"].embedding_data.embedding for who in ("ours", "theirs")]
        await _release_all(encoder)
        return ours, theirs, embeddings

    model = encoder.model
    try:
        encoder.model = _TowerOutput(model, batched=True)
        batched = asyncio.run(scenario("batched"))
        encoder.model = _TowerOutput(model, short=True)
        short = asyncio.run(scenario("short"))
    finally:
        encoder.model = model
    ours, theirs, (embedding, reference) = batched
    assert ours == theirs == (embedding.nbytes, 6 + 4, 64, None, None), (ours, theirs)
    torch.testing.assert_close(embedding, reference, rtol=1e-5, atol=1e-5)
    ours, theirs, _ = short
    assert theirs[3] is not None and theirs[4] == 500  # SGLang's own encoder refuses it too
    assert ours[:3] == (0, 0, 0) and ours[4] == 500, ours
    # the coalescer isolates a failing unit (one image): the request's error says which count disagreed
    said = re.search(r"encoder produced (\d+) tokens, preprocessing expected (\d+)", ours[3])
    assert said and (int(said[1]) + 1, int(said[2])) in {(6, 6), (4, 4)}, ours


def test_scheduler_setup_keeps_tp1_pipelining_resolves_auto_bytes_per_patch_and_names_its_preprocessing_threads(
        encoder):
    import threading

    from mm_scheduler_sglang.epd import CoalescedEncoderScheduler

    from mm_scheduler import CoalescerConfig

    # TP=1: no workers to keep in step, so the configured batches in flight stand (TP>1 runs one at a time)
    assert CoalescedEncoderScheduler(encoder, [], _small_config(max_inflight_batches=2)).coalescer.config \
        .max_inflight_batches == 2
    # "auto" measures on CUDA only; on this CPU encoder it is the vision config's declared value
    auto = CoalescedEncoderScheduler(encoder, [], CoalescerConfig(name="epd-auto", budget_bytes=1 << 26,
                                                                  bytes_per_patch="auto"))
    assert auto.tower.bytes_per_patch == auto.coalescer.bytes_per_patch == 32 * 2 * 2 * 4  # hidden*2*depth*fp32
    # preprocessing: four threads by default, named for thread dumps
    names: list[str] = []
    real = auto._preprocess
    auto._preprocess = lambda request, modality: names.append(threading.current_thread().name) or real(request,
                                                                                                         modality)

    async def one():
        result = await auto.submit(_unit_request("named", "image", [_png(56, 56, 11)]))
        await auto.stop()
        await _release_all(encoder)
        return result

    assert asyncio.run(one())[3] is None
    assert len(names) == 1 and names[0].startswith("mm-epd-preproc"), names
    assert auto._pool._max_workers == 4

"""Tiny real SGLang vision models on CPU, and real SGLang multimodal items to feed them.

What is real and what is not:
* ``sglang.srt.distributed`` is initialised for world size 1 on gloo, with SGLang's own ``publish``
  of a ``ServerArgs`` (what ``sglang.test.layer_ut_utils.init_single_process_dist`` does; that helper
  itself imports benchmark modules needing ``datasets``, so its few lines are repeated here).
* SGLang's ``RotaryEmbedding.__init__`` imports ``vllm._custom_ops.rotary_embedding`` on devices other
  than CUDA/its CPU engine, only to keep it as a fallback kernel. vllm is not installed, so that one
  name is provided by a module that raises if it is ever called. The vision paths tested here only
  use ``get_cos_sin`` (pure torch) and never call it.
* Qwen2.5-VL and Qwen3-VL: the real SGLang classes with a tiny config and ``encoder_only=True``
  (SGLang's own switch for encoder-only serving), so no language model is built.
* Gemma3: the real SGLang class, fully constructed (language model included).
* Gemma4: ``Gemma4ForConditionalGeneration.__init__`` cannot build its text model from a tiny
  transformers 5.19 config here (``head_dim`` is rejected as an ambiguous per-layer attribute), so the
  real class is instantiated without ``__init__`` and given its real vision submodules
  (``Gemma4VisionEncoder`` + ``Gemma4MultimodalEmbedder``, built exactly as ``__init__`` builds them)
  and a stand-in ``language_model`` answering only ``device`` and ``dtype()``, the two things its
  vision path asks of it. The ``get_image_feature`` / ``get_video_feature`` under test are SGLang's own.
* The tokenizer-manager side (:func:`mm_processor`): SGLang's own multimodal processor (``Gemma4SGLangProcessor``,
  ``QwenVLImageProcessor``, ...) over the HF processor of the real-server harness's tiny directory of a family
  (:func:`model_dir`: the real model's processor settings), on the CPU as SGLang runs it on a CPU engine.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import socket
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

_initialised = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _never_called(*args, **kwargs):
    raise RuntimeError("vllm's rotary kernel is not available in these tests")


def _provide_vllm_rotary_name() -> None:
    if "vllm._custom_ops" in sys.modules:
        return
    ops = types.ModuleType("vllm._custom_ops")
    ops.rotary_embedding = _never_called
    vllm = types.ModuleType("vllm")
    vllm._custom_ops = ops
    sys.modules.setdefault("vllm", vllm)
    sys.modules["vllm._custom_ops"] = ops


def init_sglang_cpu() -> None:
    """World-size-1 gloo process group and SGLang's published runtime context (once per process)."""
    global _initialised
    if _initialised:
        return
    _provide_vllm_rotary_name()
    from mm_scheduler_sglang import sglang_compat
    from sglang.srt import runtime_context
    from sglang.srt.distributed import parallel_state
    from sglang.srt.distributed.parallel_state import init_distributed_environment, initialize_model_parallel
    from sglang.srt.server_args import ServerArgs

    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
    runtime_context.reset_context()
    server_args = ServerArgs(model_path="dummy", tp_size=1, ep_size=1, pp_size=1, device="cpu")
    if hasattr(runtime_context, "publish"):  # 0.5.17+: the runtime context is published from ServerArgs
        runtime_context.publish(server_args, role="test", ranks=runtime_context.SpawnRanks(world_rank=0))
        if parallel_state._WORLD is not None:
            runtime_context.get_parallel().override_permanently(world_group=parallel_state._WORLD)
    else:  # 0.5.16: the process-global ServerArgs
        from sglang.srt.server_args import set_global_server_args_for_scheduler

        set_global_server_args_for_scheduler(server_args)
    initialize_model_parallel(backend="gloo")
    # SGLANG_VLM_CACHE_SIZE_MB=0, as SGLang sets for Qwen3-VL on big GPUs
    sglang_compat.embedding_cache_module().init_mm_embedding_cache(0)
    _initialised = True


def _random_weights(model: nn.Module, seed: int) -> nn.Module:
    """Weights large enough that attention is sharp: with near-uniform attention, encoding a video
    slice by slice instead of whole differed by only 1e-5 and would pass a tolerance check."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3, generator=generator)
    return model.eval()


def _flatten_text_config(config):
    # SGLang's model loader exposes text_config attributes on the top-level config.
    for key, value in config.text_config.to_dict().items():
        if not hasattr(config, key):
            setattr(config, key, value)
    config.encoder_only = True
    config.language_only = False
    return config


class LanguageModelStandIn(nn.Module):
    """Answers the two questions Gemma4's vision path asks its language model: device, dtype."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.config = type("TextConfig", (), {"hidden_size": hidden_size})()

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def dtype(self) -> torch.dtype:
        return self.anchor.dtype


def qwen2_5_vl() -> nn.Module:
    from sglang.srt.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
    from transformers import Qwen2_5_VLConfig

    init_sglang_cpu()
    config = _flatten_text_config(Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1], in_chans=3)))
    return _random_weights(Qwen2_5_VLForConditionalGeneration(config), seed=1)


def qwen3_vl() -> nn.Module:
    from sglang.srt.models.qwen3_vl import Qwen3VLForConditionalGeneration
    from transformers import Qwen3VLConfig

    init_sglang_cpu()
    config = _flatten_text_config(Qwen3VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, head_dim=16,
                         rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3],
                                       "mrope_interleaved": True}),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=64, deepstack_visual_indexes=[0, 1], in_channels=3)))
    return _random_weights(Qwen3VLForConditionalGeneration(config), seed=2)


def gemma3() -> nn.Module:
    from sglang.srt.models.gemma3_mm import Gemma3ForConditionalGeneration
    from transformers import Gemma3Config

    init_sglang_cpu()
    config = Gemma3Config(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, head_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=8),
        mm_tokens_per_image=16)
    return _random_weights(Gemma3ForConditionalGeneration(config), seed=3)


def gemma4(pooling_kernel_size: int = 2) -> nn.Module:
    from sglang.srt.models.gemma4_mm import Gemma4ForConditionalGeneration, Gemma4MultimodalEmbedder
    from sglang.srt.models.gemma4_vision import Gemma4VisionEncoder
    from transformers import Gemma4Config

    init_sglang_cpu()
    config = Gemma4Config(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, head_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=pooling_kernel_size,
                           position_embedding_size=64),
        audio_config=None)
    model = Gemma4ForConditionalGeneration.__new__(Gemma4ForConditionalGeneration)
    nn.Module.__init__(model)
    model.config = config
    model.vision_tower = Gemma4VisionEncoder(config=config.vision_config, quant_config=None, prefix="vision_tower")
    model.embed_vision = Gemma4MultimodalEmbedder(config.vision_config, config.text_config, quant_config=None,
                                                  prefix="embed_vision")
    model.language_model = LanguageModelStandIn(config.text_config.hidden_size)
    return _random_weights(model, seed=4)


BUILDERS = {"qwen2_5_vl": qwen2_5_vl, "qwen3_vl": qwen3_vl, "gemma3": gemma3, "gemma4": gemma4}


def sdpa_attention(layer: nn.Module, flatten_batch: bool = False) -> nn.Module:
    """SGLang's SDPA vision attention for one ``VisionAttention`` layer (its heads, head size and scale), as
    ``--mm-attention-backend sdpa`` builds it; SigLIP builds it with ``flatten_batch``."""
    from sglang.srt.layers.attention.vision import VisionSdpaAttention

    return VisionSdpaAttention(head_dim=layer.head_size, num_heads=layer.num_attention_heads_per_partition,
                               num_kv_heads=layer.num_attention_kv_heads_per_partition,
                               softmax_scale=layer.softmax_scale, flatten_batch=flatten_batch)


# --- items -------------------------------------------------------------------------------------------
def make_item(modality: str, feature: torch.Tensor, hash_value: int, **model_specific):
    from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem

    item = MultimodalDataItem(modality=Modality.IMAGE if modality == "image" else Modality.VIDEO,
                              feature=feature, model_specific_data=dict(model_specific))
    set_hash(item, hash_value)
    return item


def set_hash(item, hash_value: int) -> None:
    """``item.set_hash`` (0.5.17+); on 0.5.16 the hash field and ``set_pad_value``, as its processors do."""
    if hasattr(type(item), "set_hash"):
        item.set_hash(hash_value)
    else:
        item.hash = hash_value
        item.set_pad_value()


def qwen_image(model: nn.Module, h: int, w: int, seed: int):
    vcfg = model.config.vision_config
    dim = 3 * vcfg.temporal_patch_size * vcfg.patch_size ** 2
    pixels = torch.randn(h * w, dim, generator=torch.Generator().manual_seed(seed))
    return make_item("image", pixels, 1000 + seed, image_grid_thw=torch.tensor([[1, h, w]]))


def qwen_video(model: nn.Module, t: int, h: int, w: int, seed: int):
    vcfg = model.config.vision_config
    dim = 3 * vcfg.temporal_patch_size * vcfg.patch_size ** 2
    pixels = torch.randn(t * h * w, dim, generator=torch.Generator().manual_seed(seed))
    return make_item("video", pixels, 2000 + seed, video_grid_thw=torch.tensor([[t, h, w]]))


def gemma3_image(model: nn.Module, crops: int, seed: int):
    size = model.config.vision_config.image_size
    pixels = torch.randn(crops, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return make_item("image", pixels, 3000 + seed)


def _gemma4_patches(model: nn.Module, frames: int, gh: int, gw: int, total: int, seed: int):
    patch_pixels = 3 * model.config.vision_config.patch_size ** 2
    pixels = torch.randn(frames, total, patch_pixels, generator=torch.Generator().manual_seed(seed))
    positions = torch.full((frames, total, 2), -1, dtype=torch.long)
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    positions[:, : gh * gw, 0] = xs.flatten()
    positions[:, : gh * gw, 1] = ys.flatten()
    pixels[:, gh * gw:] = 0
    return pixels, positions


def gemma4_image(model: nn.Module, gh: int, gw: int, total: int, seed: int):
    pixels, positions = _gemma4_patches(model, 1, gh, gw, total, seed)
    return make_item("image", pixels, 4000 + seed, image_position_ids=positions)


def gemma4_video(model: nn.Module, frames: int, gh: int, gw: int, total: int, seed: int):
    pixels, positions = _gemma4_patches(model, frames, gh, gw, total, seed)
    return make_item("video", pixels, 5000 + seed, video_position_ids=positions)


def gemma4_video_frames(model: nn.Module) -> int:
    """Frames of the test video: 3, or 1 where SGLang's own Gemma4 tower takes one image per forward (its SDPA
    ``flatten_batch`` in 0.5.16 and 0.5.17 asserts batch size 1, so SGLang's method, the reference, fails on more)."""
    from mm_scheduler_sglang.adapters import _takes_batches

    return 3 if _takes_batches(model.vision_tower) else 1


def tokens_of(model: nn.Module, item) -> int:
    """How many placeholder tokens SGLang would give ``item`` (= rows of its embedding)."""
    name = type(model).__name__
    if name.startswith("Qwen"):
        grid = (item.image_grid_thw if item.is_image() else item.video_grid_thw).reshape(-1, 3)
        return int(grid.prod(dim=-1).sum()) // model.visual.spatial_merge_size ** 2
    if name.startswith("Gemma3"):
        return item.feature.shape[0] * model.config.mm_tokens_per_image
    k2 = model.config.vision_config.pooling_kernel_size ** 2
    positions = item.image_position_ids if item.is_image() else item.video_position_ids
    real = (positions != -1).any(dim=-1).sum(dim=-1)
    return int(sum(-(-int(r) // k2) for r in real))



def model_dir(parent: Path, family: str) -> Path:
    """The harness's tiny ``family`` directory (``scripts/gpu_serve/build_model.py <family>_tiny``: the real model's
    processor settings) under ``parent``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "gpu_serve"))
    import build_model

    return build_model.build(parent / f"{family}_tiny", f"{family}_tiny")


@contextlib.contextmanager
def mm_processor(model_dir: Path, on_the_loop: bool = False, **server_args: Any) -> Iterator[Callable[[], Any]]:
    """A factory of SGLang's own multimodal processor for ``model_dir``, as its tokenizer manager builds one on a CPU
    engine (``_is_cpu``: the HF processor runs on the CPU) with these ``ServerArgs`` set, valid inside the ``with``.
    ``on_the_loop``: as with ``--mm-processor-worker-num 1`` on SGLang 0.5.17+, no executor of its own (0.5.16 has
    none)."""
    import sglang.srt.multimodal.processors.base_processor as base_processor
    from sglang.srt import runtime_context
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.managers.multimodal_processor import get_mm_processor, import_processors
    from sglang.srt.server_args import ServerArgs
    from transformers import AutoProcessor

    init_sglang_cpu()
    import_processors("sglang.srt.multimodal.processors")
    args = ServerArgs(model_path=str(model_dir), load_format="dummy", device="cpu", enable_multimodal=True,
                      skip_server_warmup=True, attention_backend="triton", mm_attention_backend="sdpa", **server_args)
    config = ModelConfig.from_server_args(args)

    def build() -> Any:
        return get_mm_processor(config.hf_config, args, AutoProcessor.from_pretrained(model_dir), "default",
                                model_config=config)

    was_cpu = base_processor._is_cpu
    base_processor._is_cpu = True
    try:
        with contextlib.ExitStack() as scope:
            if hasattr(runtime_context, "get_mm"):  # 0.5.17+: multimodal settings as a server publishes them
                workers = {"mm_processor_worker_num": 1} if on_the_loop else {}
                scope.enter_context(runtime_context.get_mm().override(mm_process_config={}, **workers))
            yield build
    finally:
        base_processor._is_cpu = was_cpu


def image_url(width: int, height: int, seed: int) -> str:
    """A JPEG data URL of random pixels, as a client sends an image."""
    from PIL import Image

    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def process_images(mm_processor: Any, urls: list[str]) -> Any:
    """SGLang's processor on a prompt with these images, as its tokenizer manager calls it for one request (on an
    event loop of the caller's: ``asyncio.run``)."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    prompt = f"{mm_processor.mm_tokens.image_token * len(urls)}Describe."
    request = GenerateReqInput(text=prompt, image_data=urls, rid="r")
    return asyncio.run(mm_processor.process_mm_data_async(image_data=urls, input_text=prompt, request_obj=request))

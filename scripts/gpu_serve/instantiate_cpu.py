"""Build SGLang's model class for a model directory without weights (meta device) or tiny (cpu): config-side check.

Run with the project's CPU stand-in sgl_kernel on the path, e.g.
  SGLANG_USE_CPU_ENGINE=1 TORCHDYNAMO_DISABLE=1 PYTHONPATH=tests/e2e/harness/shims \
    /tmp/v516/bin/python scripts/gpu_serve/instantiate_cpu.py MODEL_DIR [meta|cpu]
Prints the resolved class and parameter counts (total / vision tower / audio tower / per-layer embeddings), in
billions, the bf16 weight size, and the plugin's adapter for the class (mm_scheduler_sglang.adapters.tower_for).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def plugin_view(model) -> dict:
    """What the plugin (mm_scheduler_sglang, when importable) makes of the built class: its adapter, or why not."""
    try:
        from mm_scheduler_sglang import adapters
    except ImportError as e:
        return {"plugin": f"not importable: {e}"}
    tower = adapters.tower_for(model)
    return {"plugin_adapter": type(tower).__name__ if tower is not None else None,
            "plugin_refuses": adapters.why_unsupported(model)}


def main() -> int:
    import torch
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel
    from sglang.srt.layers.dp_attention import initialize_dp_attention
    from sglang.srt.models.registry import ModelRegistry
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    model, dev = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "meta")
    with open(os.path.join(model, "config.json")) as f:
        arch = json.load(f)["architectures"][0]
    # SGLang 0.5.16's ServerArgs asserts triton/trtllm_mha attention for Gemma4 (no attention kernel runs here)
    attention = "triton" if arch.startswith("Gemma4") else "torch_native"
    args = ServerArgs(model_path=model, load_format="dummy", device="cpu", enable_multimodal=True,
                      attention_backend=attention, mm_attention_backend="sdpa", skip_server_warmup=True)
    set_global_server_args_for_scheduler(args)
    init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                 distributed_init_method="tcp://127.0.0.1:29533", backend="gloo")
    initialize_model_parallel(1, 1)
    mc = ModelConfig.from_server_args(args)
    initialize_dp_attention(args, mc)
    cls, arch = ModelRegistry.resolve_model_cls(mc.hf_config.architectures)
    with torch.device(dev):
        m = cls(mc.hf_config, quant_config=None)
    total = sum(p.numel() for p in m.parameters())
    vision = sum(p.numel() for k, p in m.named_parameters() if "visual" in k or "vision" in k)
    audio = sum(p.numel() for k, p in m.named_parameters() if "audio" in k)
    per_layer = sum(p.numel() for k, p in m.named_parameters() if "per_layer" in k)
    print(json.dumps({"model": model, "class": cls.__name__, "arch": arch, "params_total_B": total / 1e9,
                      "vision_params_B": vision / 1e9, "audio_params_B": audio / 1e9,
                      "per_layer_embedding_params_B": per_layer / 1e9,
                      "bf16_weights_GiB": total * 2 / 2**30, **plugin_view(m)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

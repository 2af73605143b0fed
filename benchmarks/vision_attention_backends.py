"""What a Gemma3 crop costs in SGLang's own vision tower under each vision attention backend it offers without
sgl_kernel's flash ops: SGLang's method, the plugin's eager batch (all crops in one forward) and, on CUDA, the
plugin's graph replay of that batch (``uniform_graphs``: captured on both backends), each against SGLang's features.

Why: in the real-server harness (sglang 0.5.16, ``--mm-attention-backend triton_attn``, because fa3 is not in the
stripped sgl-kernel) a Gemma3-12B crop took ~58 ms of GPU time alone and ~75 ms beside prefills, and a free encoder
brought the seed burst's median TTFT to 0.47x of plugin-off (9ca7bdd). Whether the attention kernel the harness has
to use is most of that decides whether a faster kernel is the lever, for plugin-off and -on alike.

    python -m benchmarks.vision_attention_backends --device cuda --crops 1 6 12 --out DIR   # the 12B's tower
    python -m benchmarks.vision_attention_backends --tiny --crops 1 3 --out DIR             # CPU smoke, sdpa only

Needs ``sglang`` and ``mm_scheduler_sglang`` importable, as the GPU tests do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "integration"))  # sglang_models: real SGLang models

# Gemma3-12B's vision tower (google/gemma-3-12b-it config.json): SigLIP so400m, 896 px, patch 14 -> 4,096 patches
GEMMA3_12B_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         image_size=896, patch_size=14)


def gemma3_model(tiny: bool, device: torch.device) -> torch.nn.Module:
    """SGLang's Gemma3ForConditionalGeneration with the 12B's vision tower and projector (a one-layer text model:
    only its width and dtype are read), random weights, bf16 on ``device``; the tiny test model with ``tiny``."""
    import sglang_models

    if tiny:
        return sglang_models.gemma3().to(device)
    from sglang.srt.models.gemma3_mm import Gemma3ForConditionalGeneration
    from transformers import Gemma3Config

    sglang_models.init_sglang_cpu()
    config = Gemma3Config(text_config=dict(hidden_size=3840, intermediate_size=128, num_hidden_layers=1,
                                           num_attention_heads=16, num_key_value_heads=8, vocab_size=1000,
                                           head_dim=256),
                          vision_config=GEMMA3_12B_VISION, mm_tokens_per_image=256)
    model = Gemma3ForConditionalGeneration(config).to(device=device, dtype=torch.bfloat16).eval()
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=generator)
    return model


def attention_backends(device: torch.device) -> dict[str, Callable[[Any], torch.nn.Module]]:
    """SGLang's vision attention implementations that run without sgl_kernel, each built for one layer."""
    import sglang_models
    from sglang.srt.layers.attention.vision import VisionTritonAttention

    backends: dict[str, Callable[[Any], torch.nn.Module]] = {"sdpa": sglang_models.sdpa_attention}
    if device.type == "cuda":
        backends["triton_attn"] = lambda layer: VisionTritonAttention()
    return backends


def use_backend(model: torch.nn.Module, make: Callable[[Any], torch.nn.Module]) -> int:
    """Every vision attention layer of ``model`` on the backend ``make`` builds; how many layers."""
    layers = [m for m in model.modules() if hasattr(m, "qkv_backend")]
    for layer in layers:
        layer.qkv_backend = make(layer)
    return len(layers)


def timed_ms(call: Callable[[], Any], device: torch.device, reps: int) -> tuple[float, Any]:
    """Median wall ms of ``reps`` calls after two warm-ups (the triton kernels compile at the first), and the
    last call's result."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    out = None
    for _ in range(2):
        out = call()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        out = call()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def top_kernels(call: Callable[[], Any], device: torch.device, n: int = 6) -> list[dict[str, Any]]:
    """The ``n`` device kernels that took longest in one call, with their share of the call's kernel time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize(device)
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    return [{"kernel": e.key[:90], "ms": round(e.device_time_total / 1e3, 2),
             "share": round(e.device_time_total / total, 3), "calls": e.count} for e in events[:n]]


def diff_over_max(got: torch.Tensor, reference: torch.Tensor) -> float:
    """max |got - reference| over max |reference|: how far apart two runs' features are, in the features' scale."""
    got, reference = got.float().reshape(reference.shape), reference.float()
    return round(float((got - reference).abs().max() / reference.abs().max().clamp_min(1e-12)), 5)


def time_replays(tower: Any, measured: list[tuple[dict[str, Any], Any, torch.Tensor]], device: torch.device,
                 reps: int) -> str:
    """The plugin's graphs (``uniform_graphs``) for every crop count of ``measured`` (row, units, SGLang's features),
    each replay timed into its row with how many calls were replays; returns the line the plugin would log. Runs
    after the eager rows: capture wraps SGLang's triton attention (``vision_attention.pass_uniform_max_seqlen``)."""
    crops = [row["crops"] for row, _, _ in measured]
    try:
        line = tower.use_graphs([tower.image_patches * n for n in crops], tp_size=1)
    except Exception as exc:  # as sglang_plugin logs it, and serves eagerly
        return f"ViT CUDA graphs off: capture failed ({type(exc).__name__}: {exc})"
    for row, units, own in measured if tower.graphs is not None else []:
        before = tower.graphs.replays
        graph_ms, replayed = timed_ms(lambda units=units: tower.forward(units), device, reps)
        row.update(graphs_ms=round(graph_ms, 2), graphs_ms_a_crop=round(graph_ms / row["crops"], 2),
                   graphs_replays=tower.graphs.replays - before, graphs_calls=reps + 2,
                   graphs_vs_sglang_diff_over_max=diff_over_max(torch.cat(list(replayed)), own))
    tower.graphs = None  # the pool goes before the next backend's capture
    return line


def measure(tiny: bool, device: torch.device, crops: Sequence[int], reps: int) -> dict[str, Any]:
    import sglang_models
    from mm_scheduler_sglang import sglang_compat
    from mm_scheduler_sglang.adapters import tower_for

    model = gemma3_model(tiny, device)
    tower = tower_for(model)
    rows, features, graphs = [], {}, {}
    with torch.inference_mode():
        for name, make in attention_backends(device).items():
            layers = use_backend(model, make)
            measured = []
            for n in crops:
                item = sglang_models.gemma3_image(model, n, seed=n)
                units = tower.units(item)
                sglang_ms, own = timed_ms(lambda item=item: model.get_image_feature([item]), device, reps)
                batch_ms, out = timed_ms(lambda units=units: tower.forward(units), device, reps)
                features[(name, n)] = torch.cat(list(out)).float()
                row = {"backend": name, "crops": n, "layers": layers,
                       "sglang_ms": round(sglang_ms, 2), "sglang_ms_a_crop": round(sglang_ms / n, 2),
                       "batch_ms": round(batch_ms, 2), "batch_ms_a_crop": round(batch_ms / n, 2),
                       "batch_vs_sglang_diff_over_max": diff_over_max(features[(name, n)], own)}
                rows.append(row)
                measured.append((row, units, own))
            graphs[name] = time_replays(tower, measured, device, reps)
        kernels = {}
        if device.type == "cuda":
            n = max(crops)
            units = tower.units(sglang_models.gemma3_image(model, n, seed=n))
            for name, make in attention_backends(device).items():
                use_backend(model, make)
                kernels[name] = top_kernels(lambda: tower.forward(units), device)
    names = sorted({name for name, _ in features})
    agreement = {}
    if len(names) > 1:  # how far the backends' features are apart (bf16: not bit for bit), on the batched path
        for n in crops:
            agreement[str(n)] = diff_over_max(features[(names[1], n)], features[(names[0], n)])
    return {"tower": "gemma3 tiny" if tiny else "gemma3-12b SigLIP so400m 896/14", "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "sglang": sglang_compat.current().version_text, "rows": rows, "graphs": graphs,
            "top_kernels": kernels, "backends_diff_over_max": agreement}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="the tiny test model (CPU smoke)")
    p.add_argument("--crops", type=int, nargs="+", default=[1, 6, 12])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    result = measure(args.tiny, torch.device(args.device), args.crops, args.reps)
    print(f"{'backend':<12} {'crops':>5} {'SGLang ms':>10} {'/crop':>7} {'batch ms':>9} {'/crop':>7} "
          f"{'graphs ms':>10} {'/crop':>7}")
    for r in result["rows"]:
        replayed = (f"{r['graphs_ms']:>10.1f} {r['graphs_ms_a_crop']:>7.1f} ({r['graphs_replays']} of "
                    f"{r['graphs_calls']} calls replayed)" if "graphs_ms" in r else f"{'-':>10} {'-':>7}")
        print(f"{r['backend']:<12} {r['crops']:>5} {r['sglang_ms']:>10.1f} {r['sglang_ms_a_crop']:>7.1f} "
              f"{r['batch_ms']:>9.1f} {r['batch_ms_a_crop']:>7.1f} {replayed}")
    for name, line in result["graphs"].items():
        print(f"graphs, {name}: {line}")
    for name, kernels in result["top_kernels"].items():
        print(f"top kernels, {name}: " + "; ".join(f"{k['kernel'][:50]} {k['share']:.0%}" for k in kernels[:3]))
    print("max |a - b| / max |a| between backends (batched):", result["backends_diff_over_max"])
    print("the same, the plugin's batch against SGLang's method:",
          {f"{r['backend']}/{r['crops']}": r["batch_vs_sglang_diff_over_max"] for r in result["rows"]})
    print("the same, the plugin's graph replays against SGLang's method:",
          {f"{r['backend']}/{r['crops']}": r["graphs_vs_sglang_diff_over_max"] for r in result["rows"]
           if "graphs_ms" in r})
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "vision_attention_backends.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

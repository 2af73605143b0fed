"""benchmarks/vision_attention_backends.py on SGLang's tiny Gemma3 model (CPU: the SDPA backend only): the backend
swap reaches every vision attention layer, and the plugin's batch gives SGLang's method's features."""

from __future__ import annotations

import json

import sglang_models as sm
import torch

from benchmarks import vision_attention_backends as vab


def test_every_vision_attention_layer_runs_on_the_chosen_backend_and_the_batch_equals_sglangs_method():
    from mm_scheduler_sglang.adapters import tower_for
    from sglang.srt.layers.attention.vision import VisionSdpaAttention

    model = vab.gemma3_model(tiny=True, device=torch.device("cpu"))
    layers = vab.use_backend(model, vab.attention_backends(torch.device("cpu"))["sdpa"])
    assert layers == model.config.vision_config.num_hidden_layers
    assert all(isinstance(m.qkv_backend, VisionSdpaAttention) for m in model.modules() if hasattr(m, "qkv_backend"))
    item = sm.gemma3_image(model, 3, seed=5)
    tower = tower_for(model)
    with torch.inference_mode():
        batch = torch.cat(list(tower.forward(tower.units(item))))
        own = model.get_image_feature([item])
    torch.testing.assert_close(batch, own.reshape(batch.shape), rtol=1e-5, atol=1e-5)


def test_the_cpu_smoke_run_writes_one_row_per_backend_and_crop_count(tmp_path, capsys):
    assert vab.main(["--tiny", "--device", "cpu", "--crops", "1", "2", "--reps", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "vision_attention_backends.json").read_text())
    assert [(r["backend"], r["crops"]) for r in result["rows"]] == [("sdpa", 1), ("sdpa", 2)]
    assert all(r["sglang_ms"] > 0 and r["batch_ms"] > 0 for r in result["rows"])
    assert all(r["batch_vs_sglang_diff_over_max"] < 1e-5 for r in result["rows"])  # fp32 on CPU
    # the plugin's graphs: on CPU none, and the line the plugin would log says why (the SDPA backend passed)
    assert result["graphs"] == {"sdpa": "ViT CUDA graphs off: the tower is not on CUDA"}
    assert not any("graphs_ms" in r for r in result["rows"])
    assert "sdpa" in capsys.readouterr().out

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


class _GraphedTower:
    """What time_replays uses of an adapter: ``use_graphs`` (capturing, declining or raising) and ``forward``, which
    counts a replay while graphs are held (``replay``: whether a call replays)."""

    image_patches = 4

    def __init__(self, capture: str | Exception, replay: bool = True) -> None:
        self.graphs, self.asked, self._capture, self._replay = None, None, capture, replay

    def use_graphs(self, buckets, *, tp_size):
        self.asked = (buckets, tp_size)
        if isinstance(self._capture, Exception):
            raise self._capture
        if self._capture.startswith("ViT CUDA graphs captured"):
            self.graphs = type("Graphs", (), {"replays": 0})()
        return self._capture

    def forward(self, units):
        self.graphs.replays += self._replay
        return [unit * 2 for unit in units]


def _measured():
    return [({"crops": n}, [torch.full((1, 3), float(n))] * n, torch.full((n, 3), 2.0 * n)) for n in (1, 2)]


def test_replays_are_timed_into_their_rows_after_capture_with_how_many_calls_replayed():
    tower, measured = _GraphedTower("ViT CUDA graphs captured for batches of [1, 2] images"), _measured()
    line = vab.time_replays(tower, measured, torch.device("cpu"), reps=3)
    assert line.startswith("ViT CUDA graphs captured") and tower.asked == ([4, 8], 1) and tower.graphs is None
    for row, _, _ in measured:
        assert row["graphs_ms"] >= 0 and row["graphs_calls"] == row["graphs_replays"] == 5  # 2 warm-ups + 3
        assert row["graphs_vs_sglang_diff_over_max"] == 0.0


def test_a_call_the_graphs_declined_shows_in_the_row_and_a_failed_capture_leaves_the_rows_eager():
    tower, measured = _GraphedTower("ViT CUDA graphs captured for batches of [1, 2] images", replay=False), _measured()
    vab.time_replays(tower, measured, torch.device("cpu"), reps=3)
    assert [row["graphs_replays"] for row, _, _ in measured] == [0, 0]  # timed, but not replays: the row says so
    for capture, line in [(RuntimeError("operation not permitted when stream is capturing"),
                           "ViT CUDA graphs off: capture failed (RuntimeError: operation not permitted when stream is "
                           "capturing)"),
                          ("ViT CUDA graphs off: the tower is not on CUDA",) * 2]:
        measured = _measured()
        assert vab.time_replays(_GraphedTower(capture), measured, torch.device("cpu"), reps=1) == line
        assert all(set(row) == {"crops"} for row, _, _ in measured)

"""The real-server harness's SGLang backport (scripts/gpu_serve/sglang_backports): the plugin-off baseline that
runs SGLang's preprocessing flags on 0.5.16 gets 0.5.23's move of features to the tower's device, and nothing else.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BACKPORTS = Path(__file__).resolve().parents[2] / "scripts" / "gpu_serve" / "sglang_backports"
sys.path.insert(0, str(BACKPORTS))
import feature_device  # noqa: E402  (not sitecustomize: that would install the import hook in this process)


def _items(*devices: str) -> list:
    return [SimpleNamespace(feature=torch.zeros(2, 3, device=d)) for d in devices]


def test_features_on_two_devices_are_moved_to_the_towers_before_sglangs_method_runs():
    seen: list[list[str]] = []
    patched = feature_device.on_tower_device(lambda model, items: seen.append([i.feature.device.type for i in items]))
    model = SimpleNamespace(visual=SimpleNamespace(device=torch.device("meta")))
    patched(model, _items("meta", "cpu"))
    assert seen == [["meta", "meta"]]


def test_features_on_one_device_are_left_where_they_are_as_in_0_5_16():
    seen: list[list[str]] = []
    patched = feature_device.on_tower_device(lambda model, items: seen.append([i.feature.device.type for i in items]))
    patched(SimpleNamespace(visual=SimpleNamespace(device=torch.device("meta"))), _items("cpu", "cpu"))
    assert seen == [["cpu", "cpu"]]


def test_a_server_process_with_the_folder_on_its_path_gets_sglangs_qwen3_vl_patched_on_import():
    pytest.importorskip("sglang.srt.models.qwen3_vl")
    code = ("import sys; from sglang.srt.models import qwen3_vl as m; c = m.Qwen3VLForConditionalGeneration;\n"
            "print(all(hasattr(getattr(c, n), '__wrapped__') for n in ('get_image_feature', 'get_video_feature')))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BACKPORTS), os.environ.get("PYTHONPATH", "")]),
           "GPU_SERVE_PATCHES": "feature_device"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1:] == ["True"], out.stderr[-2000:]
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert plain.stdout.strip().splitlines()[-1:] == ["False"], plain.stderr[-2000:]  # no folder, no patch


def test_only_a_backport_server_gets_the_folder_on_its_path():
    sys.path.insert(0, str(BACKPORTS.parent))
    import serve

    backport = serve.VARIANTS["off+tok4ipc+backport"]
    assert backport.patches == ("feature_device",) and not backport.plugin
    env = serve.environment(Path("/prepared"), False, backport.patches)
    assert env["PYTHONPATH"].split(":")[0] == str(BACKPORTS) and env["GPU_SERVE_PATCHES"] == "feature_device"
    for plugin in (False, True):
        assert str(BACKPORTS) not in serve.environment(Path("/prepared"), plugin)["PYTHONPATH"].split(":")


def test_two_copies_of_the_folder_on_the_path_install_each_patch_once_and_hand_over_to_the_next_sitecustomize(
        tmp_path):
    """Each copy's sitecustomize hands over to the next one on the path that is not a copy (two copies used to hand
    over to each other until the recursion limit), and a patch named twice is registered once."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(BACKPORTS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    user = tmp_path / "user"
    user.mkdir()
    (user / "sitecustomize.py").write_text("print('user sitecustomize ran')\n")
    code = ("import sys, on_import; f = [x for x in sys.meta_path if isinstance(x, on_import.PatchOnImport)];\n"
            "print(len(f), sorted(len(v) for v in f[0].targets.values()))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BACKPORTS), str(copy), str(user)]),
           "GPU_SERVE_PATCHES": "free_encoder,free_encoder"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Error in sitecustomize" not in out.stderr, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["user sitecustomize ran", "1 [1, 1, 1, 1]"]

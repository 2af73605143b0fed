"""The YAML's ``sglang:`` section: plugin settings validated by the plugin, ignored by the core."""

from __future__ import annotations

from pathlib import Path

import pytest
from mm_scheduler_sglang import settings

from mm_scheduler import load_config

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_sets_the_plugin_section_and_the_core_still_loads(path, monkeypatch):
    monkeypatch.delenv(settings.ENV_MAX_HELD_MB, raising=False)
    chosen = settings.resolve(False, str(path))
    assert chosen["plugin"] == {"llm_stream_priority": "high", "prefill_wait_ms": 2000.0, "defer_prefill_ms": 0.0}
    assert load_config(path).name == chosen["values"]["name"]


def test_plugin_section_values_reach_the_settings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("budget_bytes: 1048576\nsglang:\n  llm_stream_priority: default\n  prefill_wait_ms: 50\n"
                    "  defer_prefill_ms: 150\n")
    assert settings.resolve(False, str(path))["plugin"] == {"llm_stream_priority": "default", "prefill_wait_ms": 50.0,
                                                            "defer_prefill_ms": 150.0}


@pytest.mark.parametrize("body, named", [
    ("sglang:\n  prefill_wait: 5\n", "prefill_wait"),
    ("sglang:\n  llm_stream_priority: low\n", "llm_stream_priority"),
    ("sglang:\n  prefill_wait_ms: 0\n", "prefill_wait_ms"),
    ("sglang:\n  defer_prefill_ms: -1\n", "defer_prefill_ms"),
    ("sglang: [1]\n", "'sglang' must be a mapping"),
])
def test_a_bad_plugin_setting_names_the_file_and_the_key(tmp_path, body, named):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ValueError) as info:
        settings.resolve(False, str(path))
    assert str(path) in str(info.value) and named in str(info.value)

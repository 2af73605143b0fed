"""Issue 8 item 2: a failure while the plugin starts never takes the scheduler down."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import sglang_models as sm
from mm_scheduler_sglang import adapters, settings, sglang_plugin


@pytest.fixture
def scheduler_of():
    sm.init_sglang_cpu()
    model = sm.qwen2_5_vl()

    from sglang.srt.disaggregation.utils import DisaggregationMode

    def build(chosen: dict):
        server_args = SimpleNamespace(**{settings.ATTR: chosen})
        built = []

        def original(scheduler, *args, **kwargs):  # SGLang's own __init__: builds the worker and model
            scheduler.tp_worker = SimpleNamespace(model_runner=SimpleNamespace(model=model))
            scheduler.tp_size = 1
            scheduler.disaggregation_mode = DisaggregationMode.NULL
            built.append(scheduler)

        return SimpleNamespace(), server_args, original, built

    yield build
    sglang_plugin.stop()


CHOSEN = {"config_path": None, "values": {}, "mode": "auto", "max_held_bytes": 1 << 20,
          "plugin": settings.PLUGIN_DEFAULTS}


def test_an_adapter_that_raises_logs_one_error_and_leaves_sglangs_encoder(scheduler_of, monkeypatch, caplog):
    def broken(self, model):
        raise RuntimeError("adapter exploded")

    monkeypatch.setattr(adapters.QwenVLTower, "__init__", broken)
    scheduler, server_args, original, built = scheduler_of(CHOSEN)
    with caplog.at_level(logging.ERROR, logger="mm_scheduler_sglang.sglang_plugin"):
        sglang_plugin._around_scheduler_init(original, scheduler, server_args=server_args)
    assert built == [scheduler]  # SGLang's scheduler was built and the call returned normally
    assert sglang_plugin.active_service() is None
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "failed to start" in errors[0].getMessage()
    assert "adapter exploded" in caplog.text


def test_a_bad_config_reaching_the_scheduler_is_also_contained(scheduler_of, caplog):
    chosen = {**CHOSEN, "values": {"budget_bytes": -5}}  # invalid: the config check raises
    scheduler, server_args, original, built = scheduler_of(chosen)
    with caplog.at_level(logging.ERROR, logger="mm_scheduler_sglang.sglang_plugin"):
        sglang_plugin._around_scheduler_init(original, scheduler, server_args=server_args)
    assert built == [scheduler] and sglang_plugin.active_service() is None
    assert "failed to start" in caplog.text


def test_the_same_start_succeeds_with_a_working_adapter(scheduler_of):
    scheduler, server_args, original, built = scheduler_of(CHOSEN)
    sglang_plugin._around_scheduler_init(original, scheduler, server_args=server_args)
    assert built == [scheduler]
    assert sglang_plugin.active_service() is not None and sglang_plugin.active_service().mode == "async"

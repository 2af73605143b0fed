"""The version layer (integration/sglang_compat.py) on the installed SGLang, and what it does on others.

CI runs this file on both ends of the supported range (sglang 0.5.23 in .venv, 0.5.16 in .venv-sglang0516):
the accessors must pick the form that really exists on the installed release. Other releases are simulated
by giving the layer another version string, or by removing a hook target from the real classes.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import zlib
from array import array
from types import SimpleNamespace

import pytest
import sglang_models as sm
from mm_scheduler_sglang import epd, sglang_compat, sglang_plugin
from mm_scheduler_sglang.sglang_compat import Compat


def _instance_attr(cls: type, attr: str) -> bool:
    """``attr`` is a field (dataclass, msgspec, annotation) of ``cls`` or set as ``self.attr`` in its code."""
    for klass in cls.__mro__:
        if attr in getattr(klass, "__annotations__", {}) or attr in getattr(klass, "__struct_fields__", ()):
            return True
        try:
            if f"self.{attr} =" in inspect.getsource(klass) or f"self.{attr}:" in inspect.getsource(klass):
                return True
        except (OSError, TypeError):
            continue
    return False


def _runtime_has(name: str, instances: dict[str, object]) -> bool:
    """``name`` resolves in this process: a module attribute, a class attribute, or one of a real instance."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        path = ".".join(parts[:cut])
        for attr in parts[cut:]:
            path = f"{path}.{attr}"
            if hasattr(obj, attr):
                obj = getattr(obj, attr)
            elif path.rpartition(".")[0] in instances and hasattr(instances[path.rpartition(".")[0]], attr):
                obj = getattr(instances[path.rpartition(".")[0]], attr)
            elif isinstance(obj, type) and attr == parts[-1] and _instance_attr(obj, attr):
                return True
            else:
                return False
        return True
    return False


@pytest.fixture(scope="module")
def instances() -> dict[str, object]:
    """Real objects whose instance attributes the layer reads (set in ``__init__``, not on the class)."""
    sm.init_sglang_cpu()
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.runtime_context import get_parallel
    from sglang.srt.sampling.sampling_params import SamplingParams

    return {"sglang.srt.managers.schedule_batch.Req": Req("r", "", array("i", [1, 2, 3]),
                                                          SamplingParams(max_new_tokens=4)),
            "sglang.srt.runtime_context.ParallelContext": get_parallel()}  # 0.5.19+: sizes via __getattr__


@pytest.fixture
def fresh(monkeypatch):
    """Hook registry and the once-per-server log marks restored after the test; returns a setter for the layer."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    saved = {target: list(hooks) for target, hooks in HookRegistry._hooks.items()}
    monkeypatch.delenv(sglang_compat.NOTED_ENV, raising=False)

    def use(version_text: str) -> Compat:
        compat = Compat(version_text)
        monkeypatch.setattr(sglang_compat, "_current", compat)
        return compat

    yield use
    HookRegistry._hooks.clear()
    HookRegistry._hooks.update(saved)


def _registered() -> dict[str, int]:
    from sglang.srt.plugins.hook_registry import HookRegistry

    return {target: len(hooks) for target, hooks in HookRegistry._hooks.items() if hooks}


def test_the_installed_release_is_supported_and_every_hook_target_resolves():
    import sglang

    compat = sglang_compat.current()
    assert compat.version_text == sglang.__version__
    assert compat.supported and compat.problem() is None and compat.missing_targets() == []


def test_each_row_picks_the_form_that_exists_on_the_installed_release(instances):
    compat = sglang_compat.current()
    for row in sglang_compat.ROWS:
        form = compat.form(row.key)
        assert all(_runtime_has(n, instances) for n in form.names), (row.key, form)
        newer = [f for f in row.forms if f.since > form.since]
        if newer:  # the next form is really absent here, else the layer should have picked it
            assert not all(_runtime_has(n, instances) for n in newer[0].names), (row.key, newer[0])


def test_the_names_read_on_every_release_exist_on_the_installed_one(instances):
    missing = [n for n in sglang_compat.SAME if not _runtime_has(n, instances)]
    assert missing == []


def test_accessors_read_the_installed_release(instances):
    from sglang.srt.managers.schedule_batch import Req

    sm.init_sglang_cpu()
    assert sglang_compat.tp_size() == 1 and sglang_compat.pp_rank() == 0
    assert sglang_compat.embedding_cache_module().init_mm_embedding_cache is not None
    assert sglang_compat.cuda_ipc_proxy_class().__name__ == "CudaIpcTensorTransportProxy"
    key = sglang_compat.cuda_ipc_copy_event_key()
    if sglang_compat.current().form("cuda_ipc_copy_event").how is None:
        assert key is None
    else:
        from sglang.srt.multimodal.transport.cuda_ipc import CUDA_IPC_FEATURE_COPY_EVENT_KEY

        assert key == CUDA_IPC_FEATURE_COPY_EVENT_KEY and isinstance(key, str)
    req = instances["sglang.srt.managers.schedule_batch.Req"]
    assert isinstance(req, Req) and sglang_compat.extend_end(req) is None
    if sglang_compat.current().form("extend_end").how == "Req.extend_end":
        req.extend_end = 7
    else:
        from sglang.srt.utils.common import Range

        req.extend_range = Range(2, 7)
    assert sglang_compat.extend_end(req) == 7


@pytest.mark.parametrize("version", ["0.5.15", "0.5.24", "0.6.0", "1.0.0rc1", "unknown"])
def test_an_unsupported_release_gets_no_hook_and_one_log_line(fresh, caplog, version):
    fresh(version)
    before = _registered()
    with caplog.at_level(logging.WARNING, logger="mm_scheduler_sglang.sglang_compat"):
        sglang_plugin.register()
        sglang_plugin.register()  # SGLang's children call it again: still one line per server
    assert _registered() == before
    lines = [r.getMessage() for r in caplog.records if r.name == "mm_scheduler_sglang.sglang_compat"]
    assert len(lines) == 1 and "not supported" in lines[0] and version in lines[0], lines
    assert "(supported: 0.5.16 to 0.5.23)" in lines[0], lines


def test_a_missing_hook_target_gets_no_hook_and_one_log_line(fresh, caplog, monkeypatch):
    import sglang
    from sglang.srt.managers.scheduler import Scheduler

    fresh(sglang.__version__)
    monkeypatch.delattr(Scheduler, "run_batch")  # as if this release had renamed them
    monkeypatch.delattr(Scheduler, "get_next_batch_to_run")
    before = _registered()
    with caplog.at_level(logging.WARNING, logger="mm_scheduler_sglang.sglang_compat"):
        sglang_plugin.register()
    assert _registered() == before
    lines = [r.getMessage() for r in caplog.records if r.name == "mm_scheduler_sglang.sglang_compat"]
    assert lines == [f"mm-coalescer: sglang {sglang.__version__} lacks hook target(s) "
                     "sglang.srt.managers.scheduler.Scheduler.get_next_batch_to_run, "
                     "sglang.srt.managers.scheduler.Scheduler.run_batch; the plugin registers no hooks and SGLang "
                     "runs unchanged"], lines


def test_a_hook_target_whose_module_does_not_import_is_missing(fresh, monkeypatch):
    import sglang

    moved = "sglang.srt.managers.scheduler_renamed.Scheduler.run_batch"  # as if this release had moved the class
    monkeypatch.setitem(sglang_compat.HOOKS, "run_batch", moved)
    compat = fresh(sglang.__version__)
    assert compat.missing_targets() == [moved]
    assert moved in compat.problem()


def test_note_logs_a_line_once_and_keeps_only_its_checksum_for_the_children(monkeypatch, caplog):
    monkeypatch.delenv(sglang_compat.NOTED_ENV, raising=False)
    lines = ["mm-coalescer: one thing", "mm-coalescer: another"]
    with caplog.at_level(logging.WARNING, logger="mm_scheduler_sglang.sglang_compat"):
        assert [sglang_compat.note(line) for line in lines] == [True, True]
        assert [sglang_compat.note(line) for line in lines] == [False, False]  # either line, after both
    assert [r.getMessage() for r in caplog.records if r.name == "mm_scheduler_sglang.sglang_compat"] == lines
    assert os.environ[sglang_compat.NOTED_ENV] == ",".join(f"{zlib.crc32(line.encode()):08x}" for line in lines)


@pytest.mark.parametrize(("version", "degraded"), [
    ("0.5.16", {"abort_release", "epd"}), ("0.5.19", {"abort_release", "epd"}), ("0.5.20", {"abort_release"}),
    ("0.5.21", {"abort_release"}), ("0.5.22", set()), ("0.5.23", set()),
])
def test_the_table_degrades_exactly_the_features_a_release_lacks(version, degraded):
    compat = Compat(version)
    lines = compat.degraded()
    assert {row.key for row in sglang_compat.ROWS if row.degraded and not compat.has(row.key)} == degraded
    assert len(lines) == len(degraded) and all(line.startswith(f"mm-coalescer: sglang {version}: ") for line in lines)


def test_a_missing_abort_hook_is_logged_once_when_the_service_starts(fresh, caplog):
    fresh("0.5.21")  # lacks Req.release_mm_inputs_on_abort
    model = sm.qwen2_5_vl()
    with caplog.at_level(logging.WARNING, logger="mm_scheduler_sglang.sglang_compat"):
        for _ in range(2):  # a restart of the service in the same server logs nothing more
            assert sglang_plugin.start(model, {"config_path": None, "mode": "async", "values": {}}, tp_size=1)
            sglang_plugin.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "mm_scheduler_sglang.sglang_compat"]
    assert lines == ["mm-coalescer: sglang 0.5.21: release on abort falls back to the sweep (about 1 s later)"]


def test_epd_asked_for_without_sglangs_encoder_runtime_logs_one_line_and_hooks_only_the_flag(fresh, caplog,
                                                                                           monkeypatch):
    compat = fresh("0.5.19")  # no usable disaggregation.encoder
    monkeypatch.setenv(epd.ENV_EPD, "1")
    before = _registered()
    with caplog.at_level(logging.WARNING, logger="mm_scheduler_sglang.sglang_compat"):
        epd.register_epd(compat)
        epd._EnableAction(["--mm-coalescer-epd"], "mm_coalescer_epd")(None, type("NS", (), {})(), None)
    added = {t: n - before.get(t, 0) for t, n in _registered().items() if n != before.get(t, 0)}
    assert added == {sglang_compat.HOOKS["add_cli_args"]: 1}  # the flag, not the runtime hook
    lines = [r.getMessage() for r in caplog.records if r.name == "mm_scheduler_sglang.sglang_compat"]
    assert len(lines) == 1 and "EPD batching is unavailable" in lines[0], lines


def test_a_supported_release_registers_its_own_hook_targets(fresh):
    import sglang

    compat = fresh(sglang.__version__)
    before = _registered()
    sglang_plugin.register()
    added = {t for t, n in _registered().items() if n != before.get(t, 0)}
    assert added == set(compat.hook_targets())
    assert ("sglang.srt.managers.schedule_batch.Req.release_mm_inputs_on_abort" in added) == \
        compat.has("abort_release")


def test_releases_before_0_5_22_read_the_older_forms(fresh):
    """Simulated on any release: the older forms' code (0.5.16's real objects run it in CI's .venv-sglang0516)."""
    fresh("0.5.19")
    assert sglang_compat.cuda_ipc_copy_event_key() is None  # no such key before 0.5.20: nothing imported
    fresh("0.5.21")  # Req.extend_range, not Req.extend_end
    assert sglang_compat.extend_end(SimpleNamespace(extend_range=SimpleNamespace(end=7), extend_end=3)) == 7
    assert sglang_compat.extend_end(SimpleNamespace(extend_range=None, extend_end=3)) is None


class _OldRadixCache:
    """The radix cache interface before 0.5.22 (``MatchResult.device_indices``, a tail SWA layouts re-prefill),
    holding ``cached`` under ``extra_key``; matches a key as RadixCache does (its ``limit`` caps the tokens)."""

    def __init__(self, cached: list[int], extra_key: str, tail: int) -> None:
        self.cached, self.extra_key, self.tail = cached, extra_key, tail

    def swa_reprefill_tail_tokens(self) -> int:
        return self.tail

    def match_prefix(self, params):
        import torch

        key = params.key
        ids = list(key.token_ids) if key.limit is None else list(key.token_ids)[:key.limit]
        n = 0
        while key.extra_key == self.extra_key and n < min(len(ids), len(self.cached)) and ids[n] == self.cached[n]:
            n += 1
        return SimpleNamespace(device_indices=torch.arange(n))


@pytest.mark.parametrize(("tail", "matched"), [(0, 5), (2, 3), (9, 0)])
def test_before_0_5_22_the_prefix_is_matched_with_the_key_and_tail_cap_sglang_builds(fresh, tail, matched):
    fresh("0.5.21")
    req = SimpleNamespace(origin_input_ids=array("i", [1, 2, 3, 4, 5]), extra_key="lora-a")
    assert sglang_compat.cached_prefix_len(_OldRadixCache([1, 2, 3, 4, 5], "lora-a", tail), req) == matched
    assert sglang_compat.cached_prefix_len(_OldRadixCache([1, 2, 3, 4, 5], "lora-b", tail), req) == 0


@pytest.mark.parametrize(("value", "on"), [("1", True), ("TRUE", True), (" yes ", True), ("On", True), ("0", False),
                                           ("", False), ("no", False), ("enabled", False)])
def test_epd_is_enabled_by_a_true_environment_value(monkeypatch, value, on):
    monkeypatch.setenv(epd.ENV_EPD, value)
    assert epd.enabled() is on
    monkeypatch.delenv(epd.ENV_EPD)
    assert epd.enabled() is False


def test_epd_hooks_sglangs_parser_and_where_it_has_one_its_encoder_runtime(fresh, monkeypatch):
    import sglang
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    compat = fresh(sglang.__version__)
    monkeypatch.setenv(epd.ENV_EPD, "0")
    before = {target: len(hooks) for target, hooks in HookRegistry._hooks.items()}
    epd.register_epd(compat)
    added = {target: [(kind, hook) for kind, hook, _ in hooks[before.get(target, 0):]]
             for target, hooks in HookRegistry._hooks.items() if len(hooks) > before.get(target, 0)}
    expected = {sglang_compat.HOOKS["add_cli_args"]: [(HookType.AFTER, epd._after_add_cli_args)]}
    if compat.has("epd"):
        expected[compat.hook_target("epd")] = [(HookType.AROUND, epd._around_launch_local_runtime)]
    assert added == expected


def test_the_epd_flag_is_added_to_sglangs_parser_and_sets_the_environment_variable(monkeypatch):
    monkeypatch.setenv(epd.ENV_EPD, "0")
    monkeypatch.setenv(sglang_compat.NOTED_ENV, "")
    parser = argparse.ArgumentParser()
    epd._after_add_cli_args(None, parser)
    assert parser.parse_args([]).mm_coalescer_epd is False and not epd.enabled()
    assert "MM_COALESCER_EPD=1" in parser.format_help()
    assert parser.parse_args(["--mm-coalescer-epd"]).mm_coalescer_epd is True and epd.enabled()

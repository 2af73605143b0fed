"""``mm-scheduler check-config`` refuses exactly what the server refuses, with the same message.

Both run :func:`mm_scheduler_sglang.settings.resolve`: the server through its ``ServerArgs`` hooks
(SGLang's own ``prepare_server_args`` and ``Engine``'s ``resolve_once``, ``check_server_args`` before
0.5.19), the CLI directly. Each bad file below is given to all three; the messages must be identical.
"""

from __future__ import annotations

import logging
import os

import pytest
from mm_scheduler_sglang import settings, sglang_compat, sglang_plugin

from mm_scheduler import cli

BAD = {
    "typo_in_sglang_section": ("sglang:\n  prefill_wait_msx: 10\n", "unknown key(s) ['prefill_wait_msx']"),
    "typo_in_core_key": ("max_wait_msx: 1\n", "unknown key(s) ['max_wait_msx']"),
    "negative_prefill_wait": ("sglang:\n  prefill_wait_ms: -5\n", "sglang.prefill_wait_ms must be"),
    "bad_stream_priority": ("sglang:\n  llm_stream_priority: highest\n", "llm_stream_priority must be 'high'"),
    "nan_max_wait": ("max_wait_ms: .nan\n", "'max_wait_ms' must be a finite number"),
    "inf_prefill_wait": ("sglang:\n  prefill_wait_ms: .inf\n", "prefill_wait_ms must be a finite number"),
    "nan_defer": ("sglang:\n  defer_prefill_ms: .nan\n", "defer_prefill_ms must be a finite number"),
    "unknown_device": ("device: tpu\n", "'device' must be 'cpu', 'cuda' or 'cuda:N'"),
    "budget_below_a_gemma3_crop": ("name: gemma3\nbudget_bytes: 100000000\n",
                                   "cannot hold the smallest gemma3 unit (one 896 px crop: 4096 patches"),
    "budget_below_a_gemma4_image_at_the_set_bytes_per_patch": (
        "name: gemma4\nbudget_bytes: 1000000\nbytes_per_patch: 2000\n", "630 patches x 2000 bytes/patch"),
    "budget_below_a_qwen_merge_window": ("name: qwen2_5_vl\nbudget_bytes: 1000\n",
                                         "cannot hold the smallest qwen2_5_vl unit"),
    "bytes_and_fraction_together": ("budget_bytes: 1048576\nbudget_fraction: 0.1\n",
                                    "set only one of 'budget_bytes'"),
    "not_a_mapping": ("- 1\n", "the top level must be a mapping"),
    "sglang_not_a_mapping": ("sglang: [1]\n", "'sglang' must be a mapping"),
}


@pytest.fixture(scope="module")
def hooks_applied():
    from sglang.srt.plugins.hook_registry import HookRegistry

    sglang_plugin.register()
    HookRegistry.apply_hooks()


@pytest.fixture
def no_plugin_env(monkeypatch):
    for name in (settings.ENV_ENABLE, settings.ENV_CONFIG, settings.ENV_MODE, settings.ENV_MAX_HELD_MB):
        monkeypatch.delenv(name, raising=False)


def _server_refusal(hooks_applied, config: str) -> str:
    """The launcher's message (``launch_server --mm-coalescer-config``), via SGLang's own argument parsing."""
    from sglang.srt.server_args import prepare_server_args

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with pytest.raises(SystemExit) as info:
            prepare_server_args(["--model-path", "dummy", "--mm-coalescer-config", config])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    message = str(info.value)
    assert message.startswith("mm-coalescer: ")
    return message[len("mm-coalescer: "):]


def _engine_refusal(hooks_applied, config: str, monkeypatch) -> str:
    """What ``sglang.Engine`` users get with ``MM_COALESCER_CONFIG``."""
    from sglang.srt.server_args import ServerArgs

    # resolve_once (0.5.19+) or check_server_args (before): the hook the layer picks for this SGLang
    hook = sglang_compat.current().hook_target("engine_settings").rpartition(".")[2]
    monkeypatch.setenv(settings.ENV_CONFIG, config)
    try:
        with pytest.raises(SystemExit) as info:  # (0.5.16's check_server_args needs the two fields a launch sets)
            getattr(ServerArgs(model_path="dummy", served_model_name="dummy", chunked_prefill_size=-1), hook)()
    finally:
        monkeypatch.delenv(settings.ENV_CONFIG)
    return str(info.value)[len("mm-coalescer: "):]


def _cli_refusal(capsys, config: str) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(["check-config", config])
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == "" and len(err.splitlines()) == 1, err
    return err.strip()[len("error: "):]


@pytest.mark.parametrize("case", sorted(BAD))
def test_check_config_and_the_server_refuse_the_same_file_with_the_same_message(
        hooks_applied, no_plugin_env, capsys, monkeypatch, tmp_path, case):
    body, says = BAD[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(body)
    from_cli = _cli_refusal(capsys, str(path))
    assert says in from_cli and str(path) in from_cli
    assert _server_refusal(hooks_applied, str(path)) == from_cli
    assert _engine_refusal(hooks_applied, str(path), monkeypatch) == from_cli


@pytest.mark.parametrize("name", ["default", "qwen2_5_vl", "qwen3_vl", "gemma3", "gemma4"])
def test_every_shipped_config_passes_both_by_name(hooks_applied, no_plugin_env, capsys, name):
    from sglang.srt.server_args import prepare_server_args

    assert cli.main(["check-config", name]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    args = prepare_server_args(["--model-path", "dummy", "--mm-coalescer-config", name])
    assert first == f"OK {settings.settings_of(args)['config_path']}"
    assert os.path.basename(settings.settings_of(args)["config_path"]) == f"{name}.yaml"


def test_a_budget_that_holds_the_smallest_unit_is_accepted(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("name: gemma3\nbudget_bytes: 117702656\n")  # exactly one crop at the declared bytes/patch
    assert settings.resolve(False, str(path))["values"]["budget_bytes"] == 117702656


def test_nan_held_megabytes_are_refused(no_plugin_env, monkeypatch):
    monkeypatch.setenv(settings.ENV_MAX_HELD_MB, "nan")
    with pytest.raises(ValueError, match="finite number >= 0 MB"):
        settings.resolve(True, None)


def test_check_config_is_the_servers_own_function(monkeypatch, capsys):
    """Not a copy of the rules: the CLI calls settings.resolve, the function the ServerArgs hooks call."""
    calls = []
    real = settings.resolve
    monkeypatch.setattr(settings, "resolve", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert cli.main(["check-config", "gemma4"]) == 0
    assert calls == [(True, "gemma4")]
    capsys.readouterr()

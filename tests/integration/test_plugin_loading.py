"""The plugin enters SGLang the official way: entry point, load_plugins(), HookRegistry, its CLI.

Subprocess tests run a fresh interpreter (as SGLang's spawned processes are) that finds the entry
point through package metadata: a throw-away ``mm_scheduler`` dist-info first on PYTHONPATH, so the
tests do not depend on how (or whether) the project itself was pip-installed.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mm_scheduler_sglang import settings, sglang_compat, sglang_plugin

REPO = Path(__file__).resolve().parents[2]
ENTRY_POINT = "mm_scheduler_sglang.sglang_plugin:register"

CHECK_HOOKS = textwrap.dedent("""
    import inspect, json, sys
    from sglang.srt.plugins import load_plugins
    load_plugins()
    from mm_scheduler_sglang import sglang_compat, sglang_plugin as plugin
    from sglang.srt.managers.schedule_batch import MultimodalInputs, Req
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.disaggregation.prefill import SchedulerDisaggregationPrefillMixin
    from sglang.srt.server_args import ServerArgs, prepare_server_args

    def hooked(cls, name, hook):
        fn = inspect.getattr_static(cls, name)
        fn = getattr(fn, "__func__", fn)
        while fn is not None:
            if inspect.getclosurevars(fn).nonlocals.get("hook") is hook:
                return True
            fn = getattr(fn, "__wrapped__", None)
        return False

    report = {
        "add_cli_args": hooked(ServerArgs, "add_cli_args", plugin._after_add_cli_args),
        "from_cli_args": hooked(ServerArgs, "from_cli_args", plugin._around_from_cli_args),
        # resolve_once from 0.5.19, check_server_args before
        "engine_settings": hooked(ServerArgs, sglang_compat.current().hook_target("engine_settings").rpartition(".")[2],
                                  plugin._after_resolve_once),
        "scheduler_init": hooked(Scheduler, "__init__", plugin._around_scheduler_init),
        "next_batch_sweep": hooked(Scheduler, "get_next_batch_to_run", plugin._after_get_next_batch),
        "pd_prefill_sweep": hooked(SchedulerDisaggregationPrefillMixin, "get_next_disagg_prefill_batch_to_run",
                                   plugin._after_get_next_batch),
        "add_request": hooked(Scheduler, "_add_request_to_queue", plugin._around_add_request_to_queue),
        "clear_mm_inputs": hooked(Scheduler, "_maybe_clear_mm_inputs", plugin._before_clear_mm_inputs),
        "run_batch": hooked(Scheduler, "run_batch", plugin._after_run_batch),
        "abort": (hooked(Req, "release_mm_inputs_on_abort", plugin._before_release_on_abort)
                  if sglang_compat.current().has("abort_release")
                  else not hasattr(Req, "release_mm_inputs_on_abort")),  # 0.5.21 and older: nothing to hook
        "release": hooked(MultimodalInputs, "release_features", plugin._before_release_features),
    }
    args = prepare_server_args(["--model-path", "dummy", "--mm-coalescer-config", sys.argv[1]])
    report["settings"] = getattr(args, "_mm_coalescer", None)
    report["prometheus_client_imported"] = "prometheus_client" in sys.modules
    print("REPORT " + json.dumps(report))
""")


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    """Environment of a fresh interpreter that discovers our entry point through package metadata."""
    site = tmp_path_factory.mktemp("site")
    dist = site / "mm_scheduler-0.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mm-scheduler\nVersion: 0.0.0\n")
    (dist / "entry_points.txt").write_text(f"[sglang.srt.plugins]\nmm_coalescer = {ENTRY_POINT}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MM_COALESCER", "SGLANG_PLUGINS"))}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
    env["TORCHDYNAMO_DISABLE"] = "1"
    return env


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "coalescer.yaml"
    path.write_text("max_wait_ms: 3.5\nmax_batch_items: 12\nbudget_bytes: 1073741824\nname: qwen\n")
    return path


def _run(env: dict[str, str], *args: str, timeout: int = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def _report(proc: subprocess.CompletedProcess[str]) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("REPORT "):])


def test_load_plugins_in_a_fresh_process_installs_every_hook(plugin_env, config_file):
    report = _report(_run(plugin_env, "-c", CHECK_HOOKS, str(config_file)))
    hooks = {k: v for k, v in report.items() if k not in ("settings", "prometheus_client_imported")}
    assert all(hooks.values()), hooks
    assert report["settings"]["config_path"] == str(config_file)
    assert report["settings"]["values"]["max_batch_items"] == 12
    # Prometheus' multiprocess directory is set by SGLang after parsing; importing it earlier would
    # silently switch the launcher's own metrics to single-process mode.
    assert report["prometheus_client_imported"] is False


def test_sglang_plugins_allowlist_excluding_us_leaves_sglang_untouched(plugin_env, config_file):
    env = {**plugin_env, "SGLANG_PLUGINS": "some_other_plugin"}
    proc = _run(env, "-c", CHECK_HOOKS, str(config_file))
    assert proc.returncode != 0 and "unrecognized arguments: --mm-coalescer-config" in proc.stderr


def test_launch_server_help_lists_the_flags(plugin_env):
    proc = _run(plugin_env, "-m", "sglang.launch_server", "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--enable-mm-coalescer" in proc.stdout and "--mm-coalescer-config" in proc.stdout


# --- in-process: the same hooks, applied by SGLang's HookRegistry --------------------------------
@pytest.fixture(scope="module")
def hooks_applied():
    from sglang.srt.plugins.hook_registry import HookRegistry

    sglang_plugin.register()
    HookRegistry.apply_hooks()


@pytest.fixture
def parse(hooks_applied, monkeypatch):
    """SGLang's own prepare_server_args (it force-resets root logging: restored afterwards)."""
    from sglang.srt.server_args import prepare_server_args

    for name in (settings.ENV_ENABLE, settings.ENV_CONFIG, settings.ENV_MODE):
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield lambda *argv: prepare_server_args(["--model-path", "dummy", *argv])
    root.handlers[:] = handlers
    root.setLevel(level)


def test_cli_config_survives_pickling_into_the_scheduler(parse, config_file):
    args = parse("--enable-mm-coalescer", "--mm-coalescer-config", str(config_file))
    restored = pickle.loads(pickle.dumps(args))
    chosen = settings.settings_of(restored)
    assert chosen == settings.settings_of(args)
    assert chosen["config_path"] == str(config_file) and chosen["mode"] == "auto"
    from mm_scheduler import config_from_dict

    config = config_from_dict(chosen["values"], source=chosen["config_path"])
    assert (config.max_wait_ms, config.max_batch_items, config.name) == (3.5, 12, "qwen")


def test_no_flag_no_environment_means_plugin_off(parse):
    args = parse()
    assert settings.settings_of(pickle.loads(pickle.dumps(args))) is None


def test_enable_flag_alone_uses_default_settings(parse):
    chosen = settings.settings_of(parse("--enable-mm-coalescer"))
    assert chosen == {"config_path": None, "values": {}, "mode": "auto",
                      "max_held_bytes": int(settings.DEFAULT_MAX_HELD_MB * 2**20), "plugin": settings.PLUGIN_DEFAULTS}


def test_max_held_flag_overrides_environment(parse, monkeypatch):
    monkeypatch.setenv(settings.ENV_MAX_HELD_MB, "64")
    assert settings.settings_of(parse("--enable-mm-coalescer"))["max_held_bytes"] == 64 << 20
    chosen = settings.settings_of(parse("--enable-mm-coalescer", "--mm-coalescer-max-held-mb", "0.5"))
    assert chosen["max_held_bytes"] == 1 << 19


def test_engine_users_enable_through_environment(hooks_applied, monkeypatch, config_file):
    from sglang.srt.server_args import ServerArgs

    hook = sglang_compat.current().hook_target("engine_settings").rpartition(".")[2]

    def resolved_as_engine_does() -> ServerArgs:
        # what Engine(**kwargs) builds (0.5.16's check_server_args needs the fields a GPU launch defaults)
        args = ServerArgs(model_path="dummy", served_model_name="dummy", chunked_prefill_size=-1)
        getattr(args, hook)()  # what Engine's launch does before spawning the scheduler
        return pickle.loads(pickle.dumps(args))

    monkeypatch.setenv(settings.ENV_CONFIG, str(config_file))
    monkeypatch.setenv(settings.ENV_MODE, "lockstep")
    chosen = settings.settings_of(resolved_as_engine_does())
    assert chosen["config_path"] == str(config_file) and chosen["mode"] == "lockstep"
    monkeypatch.delenv(settings.ENV_CONFIG)
    monkeypatch.setenv(settings.ENV_ENABLE, "1")
    assert settings.settings_of(resolved_as_engine_does())["values"] == {}
    monkeypatch.delenv(settings.ENV_ENABLE)
    assert settings.settings_of(resolved_as_engine_does()) is None


def test_the_launcher_suggests_sglangs_preprocessing_flags_only_when_they_are_off(hooks_applied, monkeypatch,
                                                                                  caplog):
    from sglang.srt.server_args import ServerArgs

    hook = sglang_compat.current().hook_target("engine_settings").rpartition(".")[2]
    monkeypatch.setenv(settings.ENV_ENABLE, "1")

    def launch(**flags) -> str:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mm_scheduler_sglang.sglang_plugin"):
            getattr(ServerArgs(model_path="dummy", served_model_name="dummy", chunked_prefill_size=-1, **flags),
                    hook)()
        return caplog.text

    assert "SGLang runs 1 tokenizer worker(s) with cpu feature transport" in launch()
    assert "turn those on first" in launch(tokenizer_worker_num=4)  # the transport is still cpu
    assert "turn those on first" not in launch(tokenizer_worker_num=4, mm_feature_transport="cuda_ipc")
    monkeypatch.delenv(settings.ENV_ENABLE)
    assert "turn those on first" not in launch()  # plugin off: not its business


@pytest.mark.parametrize(("content", "expected"), [
    (None, "config file not found"),
    ("max_wait_ms: [1, 2\n", "not valid YAML"),
    ("max_wait_ms: 2\nmax_wiat_ms: 3\n", "max_wiat_ms"),
    ("max_batch_items: 0\n", "'max_batch_items' must be >= 1"),
])
def test_bad_config_stops_startup_naming_file_and_key(parse, tmp_path, content, expected):
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exc:
        parse("--mm-coalescer-config", str(path))
    message = str(exc.value)
    assert str(path) in message and expected in message


def test_pyproject_declares_the_entry_point_sglang_loads():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project.get("entry-points", {}).get("sglang.srt.plugins") == {"mm_coalescer": ENTRY_POINT}


def test_installed_distribution_exposes_the_entry_point_to_sglangs_own_loader(monkeypatch):
    """What the tests' throw-away dist-info stands in for: the installed project's own metadata."""
    from importlib.metadata import distribution, entry_points

    from sglang.srt.plugins import GENERAL_PLUGINS_GROUP, load_plugins_by_group

    installed = [(ep.name, ep.value) for ep in distribution("mm-scheduler").entry_points
                 if ep.group == GENERAL_PLUGINS_GROUP]
    assert installed == [("mm_coalescer", ENTRY_POINT)], "reinstall the project: pip install -e ."
    assert {ep.value for ep in entry_points(group=GENERAL_PLUGINS_GROUP) if ep.name == "mm_coalescer"} == {ENTRY_POINT}
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    func, dist_name = load_plugins_by_group(GENERAL_PLUGINS_GROUP)["mm_coalescer"]
    assert func is sglang_plugin.register
    assert dist_name is not None and dist_name.replace("_", "-") == "mm-scheduler"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "gemma3", "gemma4"])
def test_model_family_configs_are_valid(family):
    chosen = settings.resolve(False, str(REPO / "configs" / f"{family}.yaml"))
    assert chosen["values"]["name"] == family

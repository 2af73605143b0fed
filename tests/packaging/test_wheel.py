"""The built wheel, installed next to sglang with no checkout in sight, loads as SGLang's plugin and finds its configs.

One module-scoped fixture builds the wheel from a copy of the project's sources (``pip wheel --no-deps
--no-build-isolation``), installs it into a fresh venv and runs the checks from a temporary working
directory. The venv sees the heavy packages (torch, sglang) through a ``.pth`` to a folder of links into
this interpreter's site-packages, minus everything of this project (its editable install, dist-info and
finder), so the only mm-scheduler it can import is the installed wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p.name for p in (REPO / "mm_scheduler" / "configs").glob("*.yaml"))
OURS = ("mm_scheduler", "__editable__", "_mm_scheduler", "integration")

INSTALLED_CHECKS = textwrap.dedent("""
    import importlib.metadata as md, json, os, sys
    repo = os.path.realpath(sys.argv[1])
    report = {}
    import mm_scheduler, mm_scheduler_sglang
    report["files"] = [mm_scheduler.__file__, mm_scheduler_sglang.__file__]
    report["path_in_checkout"] = [p for p in sys.path if os.path.realpath(p or os.getcwd()).startswith(repo)]
    report["dists"] = [str(d.locate_file("")) for d in md.distributions() if d.metadata["Name"] == "mm-scheduler"]
    eps = [ep for ep in md.entry_points(group="sglang.srt.plugins") if ep.name == "mm_coalescer"]
    report["entry_points"] = [ep.value for ep in eps]
    report["entry_point_file"] = sys.modules[eps[0].load().__module__].__file__

    from sglang.srt.plugins import GENERAL_PLUGINS_GROUP, load_plugins, load_plugins_by_group
    func, dist_name = load_plugins_by_group(GENERAL_PLUGINS_GROUP)["mm_coalescer"]
    report["sglang_loader"] = {"file": sys.modules[func.__module__].__file__, "dist": dist_name}
    load_plugins()
    from sglang.srt.server_args import ServerArgs, prepare_server_args
    args = prepare_server_args(["--model-path", "dummy", "--mm-coalescer-config", "qwen2_5_vl"])
    report["flag"] = {k: args._mm_coalescer[k] for k in ("config_path", "plugin")}
    report["flag"]["name"] = args._mm_coalescer["values"]["name"]
    os.environ["MM_COALESCER_CONFIG"] = "gemma3"
    engine_args = ServerArgs(model_path="dummy")  # what Engine(**kwargs) builds, then resolves
    engine_args.resolve_once()
    report["env_config_path"] = engine_args._mm_coalescer["config_path"]
    print("REPORT " + json.dumps(report))
""")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MM_COALESCER", "SGLANG_PLUGINS", "PYTHON", "VIRTUAL_ENV"))}
    return {**env, "PYTHONNOUSERSITE": "1", "TORCHDYNAMO_DISABLE": "1"}


def _heavy_packages(into: Path) -> Path:
    """Links to every entry of this interpreter's site-packages except this project's own files."""
    into.mkdir()
    site_dirs = [Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    for site in site_dirs:
        for entry in site.iterdir():
            name = entry.name
            if name.startswith(OURS) or name.endswith(".pth") or (into / name).exists():
                continue
            (into / name).symlink_to(entry)
    return into


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"  # the sources only: no stale build/ or egg-info of the checkout can reach the wheel
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for package in ("mm_scheduler", "integration"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "--wheel-dir", str(tmp / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300, cwd=tmp)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("mm_scheduler-*.whl")

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "heavy-packages.pth").write_text(f"{_heavy_packages(tmp / 'heavy')}\n")
    env = _clean_env()
    work = tmp / "cwd"  # nothing of the checkout here
    work.mkdir()
    install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                             capture_output=True, text=True, timeout=300, env=env, cwd=work)
    assert install.returncode == 0, install.stderr[-3000:]
    return {"wheel": wheel, "venv": venv, "purelib": purelib, "python": python, "env": env, "cwd": work}


def _run(installed: dict, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300,
                          env=installed["env"], cwd=installed["cwd"])


def test_wheel_carries_every_shipped_config_once_and_the_plugin_package(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("mm_scheduler/configs/")) == SHIPPED
    assert "mm_scheduler_sglang/sglang_plugin.py" in names and "mm_scheduler_sglang/settings.py" in names
    assert not [n for n in names if n.startswith(("integration/", "tests/", "configs/", "benchmarks/"))]
    with zipfile.ZipFile(installed["wheel"]) as whl:
        for name in SHIPPED:  # the very bytes of the repository's one copy
            assert whl.read(f"mm_scheduler/configs/{name}") == (REPO / "configs" / name).read_bytes()


def test_installed_wheel_is_what_sglang_loads_and_configs_resolve_by_name_to_it(installed):
    proc = _run(installed, installed["python"], "-c", INSTALLED_CHECKS, REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])
    print(json.dumps(report, indent=1))
    site = str(installed["purelib"])
    assert report["path_in_checkout"] == []
    assert all(f.startswith(site) for f in report["files"]), report["files"]
    assert report["dists"] == [site], "exactly one mm-scheduler distribution: the installed wheel"
    assert report["entry_points"] == ["mm_scheduler_sglang.sglang_plugin:register"]
    assert report["entry_point_file"] == f"{site}/mm_scheduler_sglang/sglang_plugin.py"
    assert report["sglang_loader"]["file"] == report["entry_point_file"]
    assert report["sglang_loader"]["dist"].replace("_", "-") == "mm-scheduler"
    assert report["flag"]["config_path"] == f"{site}/mm_scheduler/configs/qwen2_5_vl.yaml"
    assert report["flag"]["name"] == "qwen2_5_vl" and report["flag"]["plugin"]["llm_stream_priority"] == "high"
    assert report["env_config_path"] == f"{site}/mm_scheduler/configs/gemma3.yaml"


def test_installed_check_config_accepts_a_shipped_name_and_refuses_a_directory(installed):
    cli = installed["venv"] / "bin" / "mm-scheduler"
    ok = _run(installed, cli, "check-config", "qwen2_5_vl")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[0] == f"OK {installed['purelib']}/mm_scheduler/configs/qwen2_5_vl.yaml"
    assert "  sglang.prefill_wait_ms: 2000.0" in ok.stdout.splitlines()
    bad = _run(installed, cli, "check-config", installed["cwd"])
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.splitlines()) == 1
    assert bad.stderr.startswith(f"error: {installed['cwd']}: is a directory")


def test_interpreter_running_the_tests_can_build_without_isolation():
    """pip wheel --no-build-isolation uses this venv's setuptools; the SPDX license string needs >= 77."""
    from importlib.metadata import version

    assert int(version("setuptools").split(".")[0]) >= 77, "make test installs setuptools>=77 (requirements-test)"

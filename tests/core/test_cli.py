"""``mm-scheduler``: every error is one line on stderr with exit code 2, checked before any work is done."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mm_scheduler import cli, plot
from mm_scheduler.config import SHIPPED_CONFIGS

QUICK = ["--rates", "20", "--seconds", "0.3", "--skip-overhead"]


def _fails(capsys, argv: list[str], code: int = 2) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    _out, err = capsys.readouterr()
    assert info.value.code == code, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Any attempt to start the benchmark fails the test: errors must come before the work."""
    def refuse(*args, **kwargs):
        raise AssertionError("the benchmark started despite a bad argument")

    monkeypatch.setattr(cli.bench, "compare", refuse)
    monkeypatch.setattr(cli.bench, "fake_siglip_tower", refuse)


@pytest.mark.parametrize("argv, says", [
    (["--rates", "0"], "every rate must be a finite number > 0"),
    (["--rates", "-5"], "every rate must be a finite number > 0"),
    (["--rates", "40,nan"], "every rate must be a finite number > 0"),
    (["--rates", "40,fast"], "give comma-separated numbers of requests/s"),
    (["--seconds", "0"], "give a finite number of seconds > 0"),
    (["--seconds", "-1"], "give a finite number of seconds > 0"),
    (["--tower", "tpu"], "invalid choice: 'tpu'"),
])
def test_bad_bench_arguments_are_one_line_exit_2_before_any_work(capsys, no_work, argv, says):
    assert says in _fails(capsys, ["bench", *argv])


def test_an_unwritable_json_path_is_refused_before_any_work(capsys, no_work, tmp_path):
    assert "does not exist; create it first" in _fails(capsys, ["bench", "--json", str(tmp_path / "no" / "x.json")])
    assert "is a directory" in _fails(capsys, ["bench", "--json", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind


def test_a_typo_in_the_bench_config_is_one_line_naming_file_and_key(capsys, no_work, tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("max_batch_itemz: 4\n")
    line = _fails(capsys, ["bench", "--config", str(path)])
    assert str(path) in line and "'max_batch_itemz'" in line and "did you mean 'max_batch_items'" in line


def test_a_typo_in_the_sglang_section_stops_the_bench_too(capsys, no_work, tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("sglang:\n  prefill_wait_msx: 5\n")
    assert "['prefill_wait_msx'] under 'sglang'" in _fails(capsys, ["bench", "--config", str(path)])


def test_check_config_of_a_directory_or_missing_file_is_one_line(capsys, tmp_path):
    assert "is a directory" in _fails(capsys, ["check-config", str(tmp_path)])
    assert "config file not found" in _fails(capsys, ["check-config", str(tmp_path / "missing.yaml")])
    assert "config file not found" in _fails(capsys, ["check-config", "no_such_model"])


def test_unknown_command_or_option_is_one_line(capsys):
    assert "invalid choice" in _fails(capsys, ["benchmark"])
    assert "unrecognized arguments: --fast" in _fails(capsys, ["bench", "--fast"])


def test_check_config_by_name_prints_ok_and_the_effective_values(capsys):
    assert cli.main(["check-config", "qwen2_5_vl"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"OK {SHIPPED_CONFIGS / 'qwen2_5_vl.yaml'}"
    for line in ("  max_batch_items: 32", "  name: 'qwen2_5_vl'", "  sglang.llm_stream_priority: 'high'",
                 "  mode: 'auto'  (MM_COALESCER_MODE)"):
        assert line in out


def test_bench_prints_a_line_per_stage_and_writes_json(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(plot, "have_matplotlib", lambda: False)
    out_json = tmp_path / "cpu.json"
    assert cli.main(["bench", *QUICK, "--rates", "20,30", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    for stage, (mode, rate) in enumerate([("per-request", 20), ("coalescer", 20), ("per-request", 30),
                                          ("coalescer", 30)], start=1):
        assert f"[{stage}/4] {mode} at {rate} req/s" in out
    assert out.count("      done in ") == 4
    assert len(json.loads(out_json.read_text())["results"]) == 4
    hint = [line for line in out.splitlines() if line.startswith("plot:")]
    assert hint == [f"plot: not drawn, matplotlib is not installed (pip install matplotlib, then "
                    f"mm-scheduler plot {out_json})"]
    assert not out_json.with_suffix(".png").exists()


def test_bench_writes_a_png_beside_its_json_when_matplotlib_is_there(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    out_json = tmp_path / "cpu.json"
    assert cli.main(["bench", *QUICK, "--json", str(out_json)]) == 0
    png = out_json.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in capsys.readouterr().out


def test_a_bench_where_every_request_failed_exits_1_and_says_why(capsys, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("budget_bytes: 1000\n")  # a 729-patch image can never fit
    line = _fails(capsys, ["bench", *QUICK, "--config", str(path)], code=1)
    assert "every request failed in 1 of 2 runs (first: coalescer at 20 req/s: InvalidItemError:" in line
    assert "exceeds the budget of 1000 bytes" in line


def test_the_core_bench_does_not_import_matplotlib():
    import subprocess
    import sys

    code = ("import sys, mm_scheduler.cli, mm_scheduler.bench, mm_scheduler.plot; "
            "print('matplotlib' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent)
    assert proc.stdout.strip() == "False", proc.stderr


def test_check_config_needs_no_sglang_and_the_core_does_not_import_the_plugin():
    import subprocess
    import sys

    code = ("import sys; sys.modules['sglang'] = None  # as in an environment without sglang\n"
            "import mm_scheduler, mm_scheduler.cli\n"
            "assert 'mm_scheduler_sglang' not in sys.modules, 'the core imported the plugin'\n"
            "sys.exit(mm_scheduler.cli.main(['check-config', 'qwen2_5_vl']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr
    assert "  sglang.prefill_wait_ms: 2000.0" in proc.stdout.splitlines()


def test_bench_takes_a_shipped_config_by_name(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(plot, "have_matplotlib", lambda: False)
    out_json = tmp_path / "named.json"
    assert cli.main(["bench", *QUICK, "--config", "gemma3", "--json", str(out_json)]) == 0
    capsys.readouterr()
    config = json.loads(out_json.read_text())["config"]
    assert (config["name"], config["max_batch_items"], config["max_wait_ms"]) == ("gemma3", 16, 5.0)

"""Long commands say what they are doing: the soak prints a line per stage and while it runs."""

from __future__ import annotations

from mm_scheduler import soak
from mm_scheduler.soak import SoakSettings, run_soak


async def test_soak_reports_progress_while_it_runs():
    lines: list[str] = []
    settings = SoakSettings(requests=300, clients=30, target_rate=150.0, seed=3, hang_at=None)
    report = await run_soak(settings, progress=lines.append, progress_every_s=0.2)
    assert report["figures"]["lost"] == 0
    assert lines and all(line.strip().endswith(" s)") and "/ 300 requests ended" in line for line in lines)


def test_soak_command_prints_one_line_per_stage(capsys):
    soak.main(["--requests", "150", "--clients", "20", "--rate", "300", "--loop", "asyncio"])  # a run this short
    # may miss a figure check (exit 1); the lines are what is tested here
    out = capsys.readouterr().out
    assert "[1/1] soak on asyncio (mm_scheduler.soak:CoalescerDriver): 150 requests from 20 clients" in out

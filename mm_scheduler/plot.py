"""PNG of a ``mm-scheduler bench`` JSON: latency and throughput vs offered load, both modes.

matplotlib is optional (``pip install "mm-scheduler[plot]"``): it is imported only here, only when a plot
is drawn, so the benchmark itself never needs it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STYLE = {"per-request": ("tab:orange", "one forward per request"), "coalescer": ("tab:blue", "coalescer")}
INSTALL_HINT = "pip install matplotlib"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_report(report: dict[str, Any], out: Path) -> Path:
    """Draw ``report`` (the bench JSON's content) to ``out``; raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, (color, label) in STYLE.items():
        rows = sorted((r for r in report["results"] if r["mode"] == mode), key=lambda r: r["offered_rps"])
        if not rows:
            continue
        rates = [r["offered_rps"] for r in rows]
        lat.plot(rates, [r["p50_ms"] for r in rows], "o-", color=color, label=f"{label} p50")
        lat.plot(rates, [r["p99_ms"] for r in rows], "s--", color=color, alpha=0.6, label=f"{label} p99")
        thr.plot(rates, [r["throughput_rps"] for r in rows], "o-", color=color, label=label)
    rates = sorted({r["offered_rps"] for r in report["results"]})
    thr.plot(rates, rates, color="gray", lw=0.8, ls=":", label="offered")
    lat.set_yscale("log")
    lat.set_title("request latency (scheduled arrival to result)")
    lat.set_ylabel("ms (log)")
    thr.set_title("completed requests/s")
    thr.set_ylabel("req/s")
    for ax in (lat, thr):
        ax.set_xlabel("offered load, req/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    env = report.get("environment", {})
    fig.suptitle(f"mm-scheduler bench: tower {report.get('tower')} on {report.get('device')}, "
                 f"{report.get('seconds')} s per step, torch {env.get('torch', '?')}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_json(path: str | Path) -> Path:
    """Plot a bench JSON file to the PNG beside it (same name, ``.png``)."""
    path = Path(path)
    return plot_report(json.loads(path.read_text()), path.with_suffix(".png"))

"""``mm-scheduler`` command line: the benchmark (main job), a config checker and the bench plot.

Every error the user can fix is one line on stderr and exit code 2 (no traceback); a benchmark in
which every request of a run failed exits 1 and says why.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import platform
import sys
from collections.abc import Coroutine, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import torch

from . import bench
from .config import CoalescerConfig, config_from_dict, load_config


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop when it is installed (it is the loop a server would use), else asyncio's."""
    if _loop_name() == "asyncio":
        return asyncio.run(coro)
    import uvloop

    return uvloop.run(coro)


def _print_table(results: Sequence[bench.RunResult]) -> None:
    header = (f"{'mode':<12} {'offered/s':>9} {'done/s':>8} {'units/s':>8} {'p50 ms':>8} {'p99 ms':>9} "
              f"{'forwards':>8} {'patch/fwd':>9} {'unit/fwd':>8} {'failed':>6}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.mode:<12} {r.offered_rps:>9.1f} {r.throughput_rps:>8.1f} {r.throughput_units_per_s:>8.1f} "
              f"{r.p50_ms:>8.1f} {r.p99_ms:>9.1f} {r.forwards:>8d} {r.mean_patches_per_forward:>9.0f} "
              f"{r.mean_units_per_forward:>8.2f} {r.failed:>6d}")
    by_rate: dict[float, dict[str, bench.RunResult]] = {}
    for r in results:
        by_rate.setdefault(r.offered_rps, {})[r.mode] = r
    for rate, modes in by_rate.items():
        base, co = modes.get("per-request"), modes.get("coalescer")
        if base and co:
            print(f"offered {rate:g} req/s: coalescer / per-request throughput = "
                  f"{co.throughput_rps / base.throughput_rps:.2f}x, p50 latency = {co.p50_ms / base.p50_ms:.2f}x, "
                  f"p99 latency = {co.p99_ms / base.p99_ms:.2f}x")


class CLIError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but every usage error is one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{self.prog}: {message} (see {self.prog} --help)")


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(code)


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give comma-separated numbers of requests/s, e.g. 40,100,200") from None
    bad = [r for r in rates if not (math.isfinite(r) and r > 0)]
    if not rates or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: every rate must be a finite number > 0 requests/s")
    return rates


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number of seconds > 0")
    return value


def _check_writable(path: str, flag: str) -> None:
    """Fail now, before any work, if ``path`` cannot be written (probes by opening it for append)."""
    target = Path(path)
    if target.is_dir():
        raise CLIError(f"{flag} {path}: is a directory; give a file name such as {target / 'bench.json'}")
    if not target.parent.is_dir():
        raise CLIError(f"{flag} {path}: directory {target.parent} does not exist; create it first")
    existed = target.exists()
    try:
        with open(target, "a"):
            pass
    except OSError as exc:
        raise CLIError(f"{flag} {path}: cannot write there ({exc.strerror or exc}); choose a writable path") from None
    if not existed:
        target.unlink()


def load_checked(name_or_path: str) -> tuple[CoalescerConfig, dict[str, Any]]:
    """A config file (or shipped name) validated exactly as the SGLang plugin validates it at start-up.

    Returns the core config and the plugin's settings (``settings.resolve``, imported only here so
    the core stays importable without the plugin); without the plugin package, the core checks only.
    """
    try:
        from mm_scheduler_sglang import settings
    except ImportError:
        return load_config(name_or_path), {}
    chosen = settings.resolve(True, name_or_path)
    return config_from_dict(dict(chosen["values"]), source=chosen["config_path"]), chosen


def _bench(args: argparse.Namespace) -> int:
    # Everything the user can get wrong is checked before the first request is sent.
    config = load_checked(args.config)[0] if args.config else CoalescerConfig()
    if args.json:
        _check_writable(args.json, "--json")
    if args.device.startswith("cuda") and args.tower != "fake" and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: CUDA is not available here; use --device cpu or a CUDA machine")
    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.tower == "fake":
        tower, sample = bench.fake_siglip_tower(), bench.fake_request
    else:
        try:
            from .towers import build_tower
        except ImportError as exc:
            raise CLIError(f"--tower {args.tower} needs transformers ({exc}); "
                           "pip install 'mm-scheduler[towers]'") from None
        print(f"building the {args.tower} tower on {args.device} ...", flush=True)
        tower = build_tower(args.tower, args.device)
        sample = tower.example_request
    config = config.replace(device=str(getattr(tower, "device", args.device)))
    stages = len(args.rates) * len(bench.MODES)
    print(f"mm-scheduler bench: tower={args.tower} device={config.device} rates={args.rates} req/s, "
          f"{args.seconds:g} s of arrivals each ({stages} stages), "
          f"budget={config.budget_bytes or config.budget_fraction}, dispatch={config.dispatch}", flush=True)
    progress = functools.partial(print, flush=True)
    results = _run(bench.compare(tower, sample, args.rates, args.seconds, config, seed=args.seed, progress=progress))
    _print_table(results)
    report: dict[str, Any] = {
        "tower": args.tower, "device": config.device, "seconds": args.seconds, "seed": args.seed,
        "config": {k: getattr(config, k) for k in CoalescerConfig.__dataclass_fields__},
        "results": [asdict(r) for r in results],
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine(), "cpus": os.cpu_count(), "loop": _loop_name(),
                        "date": datetime.now(UTC).isoformat()},
    }
    dead = [r for r in results if r.failed and r.failed == r.requests]
    if not args.skip_overhead and not dead:
        print("[overhead] coalescer CPU cost: no-op tower, 256 clients, best of 3 ...", flush=True)
        overhead = _run(bench.coalescer_overhead())
        report["overhead"] = overhead
        print(f"coalescer CPU cost (no-op tower, {overhead['units_per_request']} units/request, one core): "
              f"{overhead['units_per_s']:,.0f} units/s = {overhead['us_per_unit']:.1f} us/unit")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
        _plot_beside(args.json)
    if dead:
        worst = dead[0]
        _fail(f"every request failed in {len(dead)} of {len(results)} runs (first: {worst.mode} at "
              f"{worst.offered_rps:g} req/s: {worst.first_error}); fix the config or the tower and run again", code=1)
    return 0


def _plot_beside(json_path: str) -> None:
    from . import plot

    if not plot.have_matplotlib():
        print(f"plot: not drawn, matplotlib is not installed ({plot.INSTALL_HINT}, then "
              f"mm-scheduler plot {json_path})")
        return
    print(f"wrote {plot.plot_json(json_path)}")


def _plot(args: argparse.Namespace) -> int:
    from . import plot

    if not plot.have_matplotlib():
        raise CLIError(f"plot needs matplotlib: {plot.INSTALL_HINT}")
    path = Path(args.json)
    if not path.is_file():
        raise CLIError(f"{path}: no such bench JSON file (write one with mm-scheduler bench --json {path})")
    try:
        print(f"wrote {plot.plot_json(path)}")
    except (ValueError, KeyError, TypeError) as exc:
        raise CLIError(f"{path}: not a mm-scheduler bench JSON ({type(exc).__name__}: {exc})") from None
    return 0


def _check(args: argparse.Namespace) -> int:
    config, chosen = load_checked(args.config)
    print(f"OK {chosen.get('config_path', args.config)}")
    for key in CoalescerConfig.__dataclass_fields__:
        print(f"  {key}: {getattr(config, key)!r}")
    if not chosen:
        print("  (the sglang: section was not checked: the plugin package mm_scheduler_sglang is not importable)")
        return 0
    for key, value in chosen["plugin"].items():
        print(f"  sglang.{key}: {value!r}")
    print(f"  mode: {chosen['mode']!r}  (MM_COALESCER_MODE)")
    print(f"  max_held_mb: {chosen['max_held_bytes'] / 2**20:g}  "
          "(--mm-coalescer-max-held-mb, MM_COALESCER_MAX_HELD_MB)")
    return 0


def _read_metrics(source: str) -> str:
    """A saved scrape, or a live ``/metrics`` URL."""
    if source.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(source, timeout=10) as response:
                return response.read().decode()
        except OSError as exc:
            raise CLIError(f"{source}: cannot read the metrics: {exc}") from None
    try:
        return Path(source).read_text()
    except OSError as exc:
        raise CLIError(f"{source}: cannot read the metrics file: {exc.strerror or exc}") from None


def _tune(args: argparse.Namespace) -> int:
    import tempfile

    import yaml

    from . import tune
    from .config import read_config_file

    load_checked(args.config)
    path, values = read_config_file(args.config)
    rules: list[tune.Rule] = []
    try:
        from mm_scheduler_sglang import settings

        rules.append(settings.tune_rules)
    except ImportError:
        pass
    seen, changes = tune.tune(_read_metrics(args.metrics), values, args.coalescer, rules)
    proposed = yaml.safe_dump(tune.apply(values, changes), sort_keys=False)
    with tempfile.TemporaryDirectory() as tmp:  # checked exactly as the server would check it
        (Path(tmp) / "proposed.yaml").write_text(proposed)
        load_checked(str(Path(tmp) / "proposed.yaml"))
    lines = [f"# mm-scheduler tune: {args.metrics} against {path}", *(f"# {line}" for line in tune.summary(seen))]
    lines += [f"# {c.key}: {c.value!r} ({c.why})" for c in changes] or [
        "# no setting bound these forwards: the config is unchanged"]
    text = "\n".join(lines) + "\n" + proposed
    if args.out:
        _check_writable(args.out, "--out")
        Path(args.out).write_text(text)
        print(f"wrote {args.out} ({len(changes)} change(s))")
    else:
        print(text, end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="mm-scheduler", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    b = sub.add_parser("bench", help="open-loop benchmark: per-request forwards vs the coalescer")
    b.add_argument("--tower", default="fake", choices=["fake", "siglip", "siglip-mixed", "qwen2_5_vl"],
                   help="fake: CPU tower with a SigLIP-like latency model (default); others need transformers")
    b.add_argument("--device", default="cpu", help="device for real towers (cuda, cuda:1, cpu)")
    b.add_argument("--rates", type=_rates, default=[40.0, 100.0, 200.0],
                   help="offered loads in requests/s, comma-separated (default: 40,100,200)")
    b.add_argument("--seconds", type=_seconds, default=5.0, help="seconds of arrivals per rate and mode")
    b.add_argument("--config", metavar="NAME|PATH",
                   help="coalescer config: a shipped name (default, qwen2_5_vl, ...) or a YAML file "
                        "(default: built-in defaults)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", help="also write results to this JSON file (and a PNG plot beside it with matplotlib)")
    b.add_argument("--no-cudnn-sdpa", action="store_true",
                   help="disable cuDNN attention: it builds a graph per new batch shape (~90 ms each on H100)")
    b.add_argument("--skip-overhead", action="store_true", help="skip the no-op-tower CPU cost measurement")
    b.set_defaults(func=_bench)
    c = sub.add_parser("check-config", help="validate a config exactly as the SGLang plugin does; print its values")
    c.add_argument("config", metavar="NAME|PATH", help="a shipped config name (qwen2_5_vl, ...) or a YAML file")
    c.set_defaults(func=_check)
    p = sub.add_parser("plot", help="draw the PNG of a bench JSON beside it (needs matplotlib)")
    p.add_argument("json", help="a JSON file written by mm-scheduler bench --json")
    p.set_defaults(func=_plot)
    t = sub.add_parser("tune", help="propose a config from a running coalescer's /metrics (a scrape or a URL)")
    t.add_argument("metrics", help="a saved /metrics scrape, a file with '# before'/'# after' scrapes, or a URL")
    t.add_argument("--config", default="default", metavar="NAME|PATH", help="the config the server ran with")
    t.add_argument("--coalescer", help="the coalescer label to read when the scrape has several")
    t.add_argument("--out", help="write the proposed YAML here instead of printing it")
    t.set_defaults(func=_tune)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ValueError) as exc:  # ConfigError and the plugin's settings errors are ValueErrors
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted", code=130)


if __name__ == "__main__":
    sys.exit(main())

"""``mm-scheduler`` command line: the benchmark (main job) and a config checker."""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
from collections.abc import Coroutine, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import torch

from . import bench
from .config import CoalescerConfig, ConfigError, load_config


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop when it is installed (it is the loop a server would use), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
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


def _bench(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else CoalescerConfig()
    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.tower == "fake":
        tower, sample = bench.fake_siglip_tower(), bench.fake_request
    else:
        from .towers import build_tower

        tower = build_tower(args.tower, args.device)
        sample = tower.example_request
    config = config.replace(device=str(getattr(tower, "device", args.device)))
    print(f"mm-scheduler bench: tower={args.tower} device={config.device} rates={args.rates} req/s, "
          f"{args.seconds:g} s of arrivals each, budget={config.budget_bytes or config.budget_fraction}, "
          f"dispatch={config.dispatch}")
    results = _run(bench.compare(tower, sample, args.rates, args.seconds, config, seed=args.seed))
    _print_table(results)
    report: dict[str, Any] = {
        "tower": args.tower, "device": config.device, "seconds": args.seconds, "seed": args.seed,
        "config": {k: getattr(config, k) for k in CoalescerConfig.__dataclass_fields__},
        "results": [asdict(r) for r in results],
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine(), "date": datetime.now(UTC).isoformat()},
    }
    if not args.skip_overhead:
        overhead = _run(bench.coalescer_overhead())
        report["overhead"] = overhead
        print(f"coalescer CPU cost (no-op tower, {overhead['units_per_request']} units/request, one core): "
              f"{overhead['units_per_s']:,.0f} units/s = {overhead['us_per_unit']:.1f} us/unit")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(config)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mm-scheduler", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="open-loop benchmark: per-request forwards vs the coalescer")
    b.add_argument("--tower", default="fake", choices=["fake", "siglip", "siglip-mixed", "qwen2_5_vl"],
                   help="fake: CPU tower with a SigLIP-like latency model (default); others need transformers")
    b.add_argument("--device", default="cpu", help="device for real towers (cuda, cuda:1, cpu)")
    b.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[40.0, 100.0, 200.0],
                   help="offered loads in requests/s, comma-separated (default: 40,100,200)")
    b.add_argument("--seconds", type=float, default=5.0, help="seconds of arrivals per rate and mode")
    b.add_argument("--config", help="YAML coalescer config (default: built-in defaults)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", help="also write results to this JSON file")
    b.add_argument("--no-cudnn-sdpa", action="store_true",
                   help="disable cuDNN attention: it builds a graph per new batch shape (~90 ms each on H100)")
    b.add_argument("--skip-overhead", action="store_true", help="skip the no-op-tower CPU cost measurement")
    b.set_defaults(func=_bench)
    c = sub.add_parser("check-config", help="validate a YAML config and print the result")
    c.add_argument("path")
    c.set_defaults(func=_check)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

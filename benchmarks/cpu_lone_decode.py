"""Does the plugin slow a lone request's decode? The real ``sglang.Engine`` on CPU, plugin off and on, side by side.

Why: on the H200 a lone Qwen3-VL request decoded at 47 ms a token with the plugin against 23 ms with SGLang's flags
alone (and 36 ms plain off, same run; eager decode, ``--disable-cuda-graph``). Eager decode is bound by the scheduler
thread's Python, so a per-step cost of the plugin's hooks, or its threads taking the GIL, would show on CPU too,
where a decode step of the tiny model is nearly all Python. A gap here points at the plugin's host side; none
points at the GPU side.

Each Engine (one process each, off and on for ``--pairs`` pairs, which goes first alternating; the end-to-end
tests' tiny Qwen2.5-VL and environment) serves one image request with 1 and with ``1 + --tokens`` new tokens,
``--reps`` times after a warm-up; decode time a token is the difference of the medians over ``--tokens``.

    .venv/bin/python -m benchmarks.cpu_lone_decode --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HARNESS = Path(__file__).resolve().parents[1] / "tests" / "e2e" / "harness"
sys.path.insert(0, str(HARNESS))

import media  # noqa: E402 - the e2e harness, put on the path above
import scenario  # noqa: E402

ENGINE_TIMEOUT_S = 300


def serve(label: str, model: str, tokens: int, reps: int) -> dict:
    """In an Engine's own process: time the lone request; the plugin's counters prove it took the image."""
    files = media.write_images(Path(tempfile.mkdtemp(prefix="lone-media-")))
    if label == "on":  # as the README tells Engine users
        os.environ["MM_COALESCER"] = "1"
        os.environ["MM_COALESCER_CONFIG"] = str(scenario.REPO / scenario.PLUGIN_CONFIG)
    metrics_dir = tempfile.mkdtemp(prefix="lone-prom-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    import sglang

    engine = sglang.Engine(model_path=model, **scenario.ENGINE_ARGS)
    image = files[sorted(files)[0]]
    seconds: dict[int, list[float]] = {1: [], 1 + tokens: []}
    try:
        for rep in range(reps + 1):
            for new_tokens in seconds:
                started = time.perf_counter()
                engine.generate(prompt=scenario.prompt(images=1), image_data=[image],
                                sampling_params={"temperature": 0.0, "max_new_tokens": new_tokens, "ignore_eos": True})
                if rep:  # the first round warms up
                    seconds[new_tokens].append(time.perf_counter() - started)
        metrics = scenario.read_multiproc_metrics(metrics_dir)
    finally:
        engine.shutdown()
    first, whole = (statistics.median(seconds[n]) for n in seconds)
    return {"label": label, "first_token_ms": first * 1000, "decode_ms_per_token": (whole - first) / tokens * 1000,
            "coalescer_units": scenario.counter(metrics, "mm_coalescer_units_total"),
            # items the plugin served without falling back (a lone request on an idle coalescer is encoded inline
            # under early_encode_min_waiting: no coalescer unit)
            "plugin_items": scenario.served_by_plugin(metrics)}


def run_engine(cmd: list[str], label: str) -> str:
    """One Engine's process (and SGLang's children, in its own session); its stdout. Exits on failure or timeout."""
    proc = subprocess.Popen(cmd, env=scenario.e2e_environment(), cwd=scenario.REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=ENGINE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        sys.exit(f"Engine (plugin {label}) gave no result within {ENGINE_TIMEOUT_S} s")
    if proc.returncode != 0:
        sys.exit(f"Engine (plugin {label}) failed:\n{out[-2000:]}{err[-3000:]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--serve", nargs=2, metavar=("LABEL", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        print(json.dumps(serve(*args.serve, args.tokens, args.reps)))
        return
    from tiny_qwen import build_checkpoint

    model = build_checkpoint(Path(tempfile.mkdtemp(prefix="lone-model-")))
    runs = []
    for pair in range(args.pairs):
        for label in ("off", "on") if pair % 2 == 0 else ("on", "off"):  # alternate who goes first
            cmd = [sys.executable, "-m", "benchmarks.cpu_lone_decode", "--serve", label, str(model),
                   "--tokens", str(args.tokens), "--reps", str(args.reps)]
            runs.append({"pair": pair, **json.loads(run_engine(cmd, label).strip().splitlines()[-1])})
            print(f"pair {pair} {label:>3}: first token {runs[-1]['first_token_ms']:6.1f} ms, "
                  f"decode {runs[-1]['decode_ms_per_token']:5.2f} ms/token, "
                  f"plugin items {runs[-1]['plugin_items']:.0f} (coalescer units {runs[-1]['coalescer_units']:.0f})",
                  flush=True)
    by_pair = {(run["pair"], run["label"]): run["decode_ms_per_token"] for run in runs}
    ratios = [by_pair[pair, "on"] / by_pair[pair, "off"] for pair in range(args.pairs)]
    print(f"decode on/off per pair: {', '.join(f'{r:.2f}x' for r in ratios)}; median {statistics.median(ratios):.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "cpu_lone_decode.json"
    path.write_text(json.dumps({"runs": runs, "decode_ratio_on_off": ratios, "tokens": args.tokens,
                                "reps": args.reps, "cpu_count": os.cpu_count()}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

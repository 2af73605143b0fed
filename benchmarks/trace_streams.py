"""Encoder forwards in a torch.profiler chrome trace: GPU busy time against wall span, per forward.

Used on ``serving_bench --trace MODE@LOAD`` traces to tell a GPU-bound encoder from a host-launch-bound
one: a forward whose kernels keep the GPU busy for much less than the forward's span, with gaps of
tens of microseconds between kernels, is limited by how fast its thread launches kernels.

    python -m benchmarks.trace_streams serving_trace_plugin_0.5.json.gz
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import itertools
import json
import statistics


def forwards(kernels: list[tuple[float, float]], gap_us: float) -> list[list[tuple[float, float]]]:
    """Split one stream's kernels (start, duration) into forwards at idle gaps longer than ``gap_us``."""
    groups, current = [], [kernels[0]]
    for kernel in kernels[1:]:
        if kernel[0] - (current[-1][0] + current[-1][1]) > gap_us:
            groups.append(current)
            current = []
        current.append(kernel)
    groups.append(current)
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--gap-us", type=float, default=3000.0, help="idle gap that separates two forwards")
    args = parser.parse_args()
    opener = gzip.open if args.trace.endswith(".gz") else open
    with opener(args.trace) as f:
        events = json.load(f)["traceEvents"]
    by_stream: dict[int, list[tuple[float, float]]] = collections.defaultdict(list)
    for event in events:
        if event.get("cat") == "kernel":
            by_stream[event["args"].get("stream")].append((event["ts"], event["dur"]))
    streams = sorted(by_stream, key=lambda s: len(by_stream[s]), reverse=True)
    for stream in streams:
        ks = sorted(by_stream[stream])
        print(f"stream {stream}: {len(ks)} kernels, busy {sum(d for _, d in ks) / 1e3:.1f} ms "
              f"over {(ks[-1][0] + ks[-1][1] - ks[0][0]) / 1e3:.1f} ms")
    if len(streams) < 2:
        return
    llm, encoder = sorted(by_stream[streams[0]]), sorted(by_stream[streams[1]])
    llm_starts = [start for start, _ in llm]
    print(f"\nencoder stream {streams[1]} (the second busiest), one line per forward:")
    for group in forwards(encoder, args.gap_us):
        start, end = group[0][0], group[-1][0] + group[-1][1]
        busy = sum(d for _, d in group)
        lo, hi = bisect.bisect_left(llm_starts, start), bisect.bisect_left(llm_starts, end)
        overlap = sum(min(d, end - s) for s, d in llm[lo:hi])
        gaps = [b[0] - (a[0] + a[1]) for a, b in itertools.pairwise(group)]
        print(f"  {len(group):5d} kernels  span {(end - start) / 1e3:6.1f} ms  GPU busy {busy / 1e3:5.1f} ms  "
              f"LLM-stream kernels inside {overlap / 1e3:5.1f} ms  median gap {statistics.median(gaps or [0]):.0f} us")


if __name__ == "__main__":
    main()

"""Where one tower forward spends host and device time, per batch size.

Host time is how long ``forward`` takes to return (launching kernels); wall time includes waiting
for the GPU. When the two are close the forward is launch-bound and batching is what pays.

    python -m benchmarks.profile_tower --tower qwen2_5_vl --batch 1 --batch 16
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from collections.abc import Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.gpu_bench import Workload
from mm_scheduler.towers import build_tower


def time_forward(tower, units, reps: int) -> tuple[float, float]:
    """Median (host ms, wall ms) of ``reps`` forwards."""
    host, wall = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        tower.forward(units)
        host.append((time.perf_counter() - t) * 1e3)
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - t) * 1e3)
    return statistics.median(host), statistics.median(wall)


def first_use(tower, work: Workload, sizes: Sequence[int]) -> None:
    """Cost of a batch size's first forward on a fresh thread (per-thread caches, e.g. cuDNN SDPA graphs)."""
    for cudnn in (True, False):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        rows = []

        def probe(rows: list[tuple[int, float, float]]) -> None:
            torch.cuda.set_device(tower.device)
            with torch.inference_mode():
                for size in sizes:
                    units = work.batch(random.Random(size), size, 10**9, 0)
                    rows.append((size, *(time_forward(tower, units, 1)[1] for _ in range(2))))

        thread = threading.Thread(target=probe, args=(rows,))
        thread.start()
        thread.join()
        for size, first, second in rows:
            print(f"first-use cudnn_sdp={cudnn} batch {size}: first {first:.1f} ms, again {second:.1f} ms")
    torch.backends.cuda.enable_cudnn_sdp(True)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tower", default="qwen2_5_vl")
    p.add_argument("--batch", type=int, action="append")
    p.add_argument("--attention", action="append", help="qwen2_5_vl only: varlen and/or sdpa")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--first-use", type=int, nargs="*", help="time first forwards of these batch sizes instead")
    args = p.parse_args(argv)
    tower = build_tower(args.tower, "cuda")
    work = Workload(args.tower, tower, tiny=False)
    if args.first_use:
        first_use(tower, work, args.first_use)
        return
    with torch.inference_mode():
        for attention in args.attention or [getattr(tower, "attention", None)]:
            if attention is not None:
                tower.attention = attention
            for size in args.batch or [1, 16]:
                units = work.batch(random.Random(0), size, 10**9, 0)
                for _ in range(3):
                    tower.forward(units)
                host, wall = time_forward(tower, units, args.reps)
                patches = sum(u.num_patches for u in units)
                print(f"\n### {args.tower} attention={attention} batch={len(units)} patches={patches}: "
                      f"host {host:.2f} ms, wall {wall:.2f} ms, {len(units) / wall * 1e3:.1f} units/s")
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    tower.forward(units)
                    torch.cuda.synchronize()
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top)
                print(table)


if __name__ == "__main__":
    main()

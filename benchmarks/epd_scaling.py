"""N encoder processes pushing embeddings to one prefill receiver over loopback pyzmq: bytes/s and messages/s.

Why: past one machine, N ``--encoder-only`` servers feed prefill servers, and the embedding bytes
on the wire (not the encoder batching) can become the limit. This measures that path with SGLang
0.5.23's own socket pattern for the ``zmq_to_scheduler`` transport:

* sender (``MMEncoder._send``, disaggregation/encoder/server.py:1994-2044): a PUSH socket,
  ``config_socket`` options (SNDHWM 0, SNDBUF 0.5 GiB on big hosts, utils/network.py:290-311),
  ``IMMEDIATE``, connected to the receiver; each embedding is ``send_multipart([pickle(metadata),
  buffer], copy=False, track=True)`` with the bytes as a zero-copy frame (``TensorWrapper``), and
  the tracker awaited outside the lock, so sends pipeline;
* receiver (``receiver.py:943-1012`` and ``_extract_embedding_from_buffer`` 1247-1253): a bound
  PULL socket, ``recv_multipart(copy=False)``, unpickle frame 0, materialize frame 1 with a copy.

Each sender is its own process (as each encoder server is); the bytes are a Qwen2.5-VL-7B
embedding (3584 wide, bf16) of ``tokens`` rows, as numpy uint16 (same bytes; no torch import, so
processes start fast). Every configuration moves the same total bytes, split over the N senders.

    python -m benchmarks.epd_scaling                 # N = 1, 2, 4; 1024 and 256 tokens (< 60 s)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import zmq

HIDDEN = 3584  # Qwen2.5-VL-7B LLM hidden size: one embedding row per visual token
BYTES_PER_ELEMENT = 2  # bf16
_BIG_HOST_BUF = int(0.5 * 1024**3)


def _buf_size() -> int:
    """config_socket's buffer size: 0.5 GiB on hosts with > 32 GiB total and > 16 GiB free, else OS default."""
    try:
        pages, free = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_AVPHYS_PAGES")
        size = os.sysconf("SC_PAGE_SIZE")
        return _BIG_HOST_BUF if pages * size > 32 * 1024**3 and free * size > 16 * 1024**3 else -1
    except (ValueError, OSError):
        return -1


def sender(rank: int, endpoint: str, messages: int, tokens: int, window: int, start: Any, out: Any) -> None:
    """One encoder server's rank 0: push ``messages`` embeddings, keeping ``window`` zero-copy sends in flight."""
    ctx = zmq.Context(1)
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.SNDBUF, _buf_size())
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.SNDTIMEO, 60_000)
    sock.connect(endpoint)
    # a few distinct buffers, as consecutive requests' embeddings are distinct tensors
    buffers = [np.full((tokens, HIDDEN), i, dtype=np.uint16) for i in range(max(2, window))]
    start.wait()
    t0 = time.perf_counter()
    trackers = []
    for i in range(messages):
        meta = {"req_id": f"s{rank}-{i}", "sender": rank, "shape": (tokens, HIDDEN), "dtype": "bfloat16",
                "modality": "IMAGE", "sent_at": time.time()}
        frames = [pickle.dumps(meta), memoryview(buffers[i % len(buffers)])]
        trackers.append(sock.send_multipart(frames, copy=False, track=True))
        if len(trackers) >= window:  # buffer ownership back before reusing it (TensorWrapper's lifetime)
            trackers.pop(0).wait(60)
    for tracker in trackers:
        tracker.wait(60)
    out.put({"rank": rank, "messages": messages, "seconds": time.perf_counter() - t0})
    sock.close(linger=5000)
    ctx.term()


def run(n: int, tokens: int, total_messages: int, window: int) -> dict[str, Any]:
    """One configuration: N sender processes, one PULL receiver here; returns receiver and sender rates."""
    ctx = zmq.Context(1)
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 0)
    pull.setsockopt(zmq.RCVBUF, _buf_size())
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    spawn = mp.get_context("spawn")
    start, out = spawn.Event(), spawn.Queue()
    per_sender = [total_messages // n + (1 if r < total_messages % n else 0) for r in range(n)]
    procs = [spawn.Process(target=sender, args=(r, f"tcp://127.0.0.1:{port}", per_sender[r], tokens, window,
                                                start, out), daemon=True) for r in range(n)]
    for proc in procs:
        proc.start()
    time.sleep(0.5)  # let every PUSH connect (IMMEDIATE: nothing is queued to an unconnected peer)
    start.set()
    cpu0 = time.process_time()
    received, nbytes, latencies = [0] * n, [0] * n, []
    first = last = None
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    while sum(received) < total_messages:
        if not poller.poll(30_000):
            raise TimeoutError(f"receiver got {sum(received)} of {total_messages} messages")
        parts = pull.recv_multipart(copy=False)
        now = time.perf_counter()
        first = first if first is not None else now
        last = now
        meta = pickle.loads(parts[0].buffer)
        embedding = np.frombuffer(parts[1].buffer, dtype=np.uint16).reshape(meta["shape"]).copy()  # the clone
        latencies.append((time.time() - meta["sent_at"]) * 1000)
        received[meta["sender"]] += 1
        nbytes[meta["sender"]] += embedding.nbytes
    receiver_cpu = time.process_time() - cpu0  # this process's CPU (receive + unpickle + clone), all threads
    senders = sorted((out.get(timeout=30) for _ in procs), key=lambda s: s["rank"])
    for proc in procs:
        proc.join(timeout=10)
    pull.close(linger=0)
    ctx.term()
    span = max(last - first, 1e-9)
    msg_bytes = tokens * HIDDEN * BYTES_PER_ELEMENT
    lat = sorted(latencies)
    return {"senders": n, "tokens": tokens, "message_mb": msg_bytes / 1e6, "messages": total_messages,
            "recv_gb_per_s": sum(nbytes) / span / 1e9, "recv_msgs_per_s": total_messages / span,
            "per_sender_gb_per_s": [s["messages"] * msg_bytes / s["seconds"] / 1e9 for s in senders],
            "per_sender_msgs_per_s": [s["messages"] / s["seconds"] for s in senders],
            "per_sender_received": received, "receiver_cpu_per_s": receiver_cpu / span,
            "latency_p50_ms": lat[len(lat) // 2], "latency_p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))]}


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--senders", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 256])
    p.add_argument("--total-mb", type=float, default=2000.0, help="bytes moved per configuration")
    p.add_argument("--window", type=int, default=8, help="zero-copy sends in flight per sender")
    args = p.parse_args(argv)
    rows = []
    t0 = time.perf_counter()
    stages = len(args.tokens) * len(args.senders)
    for tokens in args.tokens:
        total = max(args.senders) * max(1, int(args.total_mb * 1e6 / (tokens * HIDDEN * BYTES_PER_ELEMENT)
                                               / max(args.senders)))
        for n in args.senders:
            print(f"[{len(rows) + 1}/{stages}] {n} sender(s), {tokens} tokens/message, {total} messages ...",
                  file=sys.stderr, flush=True)
            rows.append(run(n, tokens, total, args.window))
            print(f"      {rows[-1]['recv_gb_per_s']:.2f} GB/s received", file=sys.stderr, flush=True)
    print(f"# {platform.node()} {os.cpu_count()} CPUs, pyzmq {zmq.__version__} / libzmq {zmq.zmq_version()}, "
          f"{time.perf_counter() - t0:.0f} s")
    print("| N senders | tokens/msg | MB/msg | recv GB/s | recv msgs/s | per-sender GB/s | per-sender msgs/s "
          "| latency p50 / p99 ms | receiver CPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['senders']} | {r['tokens']} | {r['message_mb']:.2f} | {r['recv_gb_per_s']:.2f} | "
              f"{r['recv_msgs_per_s']:.0f} | {' / '.join(f'{v:.2f}' for v in r['per_sender_gb_per_s'])} | "
              f"{statistics.fmean(r['per_sender_msgs_per_s']):.0f} (mean) | "
              f"{r['latency_p50_ms']:.1f} / {r['latency_p99_ms']:.1f} | {r['receiver_cpu_per_s']:.0%} |")
    return rows


if __name__ == "__main__":
    main()

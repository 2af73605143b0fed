"""The real-server harness's load generator wrapper (scripts/gpu_serve/loadgen.py): datasets memoized and shared.

Plugin-off and plugin-on servers must get the very same requests, and a run may take the first n of a pool built
before the servers' capacity was known; datasets built in other processes arrive through a pickle.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "gpu_serve"))
import loadgen


def fake_serving():
    built = []

    def get_dataset(args, tokenizer, model_id=None):
        built.append(args.num_prompts)
        return [f"seed{args.seed}-req{i}" for i in range(args.num_prompts)]

    return SimpleNamespace(get_dataset=get_dataset, get_tokenizer=lambda name, *a, **k: object()), built


def args(**kw) -> argparse.Namespace:
    base = {"seed": 1, "num_prompts": 10, "request_rate": float("inf"), "base_url": "http://x", "image_count": 2}
    return argparse.Namespace(**{**base, **kw})


def test_a_run_takes_the_first_n_of_a_larger_pool_without_rebuilding_it(monkeypatch):
    monkeypatch.setattr(loadgen, "DATASETS", {})
    serving, built = fake_serving()
    loadgen._memoize(serving)
    pool = serving.get_dataset(args(num_prompts=10, base_url="http://127.0.0.1:9"), None)  # primed
    run = serving.get_dataset(args(num_prompts=4, request_rate=3.0), None)  # against a server, at a rate
    assert run == pool[:4] and built == [10]
    assert len(serving.get_dataset(args(num_prompts=12), None)) == 12 and built == [10, 12]  # larger: rebuilt
    assert serving.get_dataset(args(num_prompts=4, seed=2), None) == [f"seed2-req{i}" for i in range(4)]


def test_datasets_built_in_another_process_are_loaded_and_never_shrink(monkeypatch, tmp_path):
    monkeypatch.setattr(loadgen, "DATASETS", {})
    serving, built = fake_serving()
    loadgen._memoize(serving)
    serving.get_dataset(args(num_prompts=3), None)
    dump = tmp_path / "datasets.pkl"
    assert loadgen._run(serving, {"dump": str(dump)}) == 0
    monkeypatch.setattr(loadgen, "DATASETS", {loadgen.dataset_key(args()): ["bigger"] * 5})
    assert loadgen._run(serving, {"load": str(dump)}) == 0
    assert loadgen.DATASETS[loadgen.dataset_key(args())] == ["bigger"] * 5  # the 3-request dump did not replace it
    monkeypatch.setattr(loadgen, "DATASETS", {})
    loadgen._run(serving, {"load": str(dump)})
    assert serving.get_dataset(args(num_prompts=2), None) == ["seed1-req0", "seed1-req1"] and built == [3]

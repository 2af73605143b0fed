"""SGLang's own load generator (``sglang.benchmark.serving``), kept in one process for a whole harness run.

Each ``python -m sglang.benchmark.serving`` call spent 30-50 s before its first request (imports, the
tokenizer, and for the image dataset 600 random JPEGs plus a processor pass to count their tokens) on
runs that last 3-15 s. Here the module is imported once and its ``get_dataset``/``get_tokenizer`` are
memoized, so the plugin-off and plugin-on servers get the very same requests and only the first run of
a dataset pays for it. Everything else is SGLang's ``cli_main`` unchanged.

Datasets are memoized by their arguments without ``--num-prompts``: a run asking for ``n`` requests gets
the first ``n`` of a dataset built at least that large. So a Poisson run whose size depends on the
measured capacity can use a pool built before the capacity was known, while the servers started.

Protocol: one JSON object per stdin line, answered by ``LOADGEN-DONE <exit code>`` on stdout:
``{"argv": [...], "log": "path"}`` runs SGLang's ``cli_main`` with its output in ``log``;
``{"dump": "path"}`` pickles every dataset built so far, ``{"load": "path"}`` adds those of a dump
(several loadgen processes build datasets in parallel, one then loads them all).
"""

from __future__ import annotations

import contextlib
import json
import pickle
import sys
import traceback

_IGNORED = {"base_url", "output_file", "request_rate", "max_concurrency", "disable_tqdm", "host", "port",
            "ready_check_timeout_sec", "num_prompts"}
DATASETS: dict[str, list] = {}


def dataset_key(args) -> str:
    return repr(sorted((k, repr(v)) for k, v in vars(args).items() if k not in _IGNORED))


def _memoize(serving) -> None:
    tokenizers: dict = {}
    get_dataset, get_tokenizer = serving.get_dataset, serving.get_tokenizer

    def cached_dataset(args, tokenizer, model_id=None):
        key = dataset_key(args)
        if len(DATASETS.get(key, ())) < args.num_prompts:
            DATASETS[key] = list(get_dataset(args, tokenizer, model_id))
        return DATASETS[key][:args.num_prompts]

    def cached_tokenizer(name, *args, **kwargs):
        if name not in tokenizers:
            tokenizers[name] = get_tokenizer(name, *args, **kwargs)
        return tokenizers[name]

    serving.get_dataset, serving.get_tokenizer = cached_dataset, cached_tokenizer


def _run(serving, request: dict) -> int:
    if "dump" in request:
        with open(request["dump"], "wb") as f:
            pickle.dump(DATASETS, f)
        return 0
    if "load" in request:
        with open(request["load"], "rb") as f:
            for key, rows in pickle.load(f).items():
                if len(rows) > len(DATASETS.get(key, ())):
                    DATASETS[key] = rows
        return 0
    with open(request["log"], "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        sys.argv = ["sglang.benchmark.serving", *request["argv"]]
        try:
            serving.cli_main()
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        except Exception:
            traceback.print_exc()
            return 1
    return 0


def main() -> None:
    from sglang.benchmark import serving

    _memoize(serving)
    print("LOADGEN-READY", flush=True)
    for line in sys.stdin:
        if line.strip():
            print(f"LOADGEN-DONE {_run(serving, json.loads(line))}", flush=True)


if __name__ == "__main__":
    main()

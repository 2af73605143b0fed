"""SGLang's own load generator (``sglang.benchmark.serving``), kept in one process for a whole harness run.

Each ``python -m sglang.benchmark.serving`` call spent 30-50 s before its first request (imports, the
tokenizer, and for the image dataset 600 random JPEGs plus a processor pass to count their tokens) on
runs that last 3-15 s. Here the module is imported once and its ``get_dataset``/``get_tokenizer`` are
memoized by their arguments, so the plugin-off and plugin-on servers get the very same requests and
only the first run of a dataset pays for it. Everything else is SGLang's ``cli_main`` unchanged.

Protocol: one JSON object per stdin line, ``{"argv": [...], "log": "path"}``; the run's output goes
to ``log`` and this process answers ``LOADGEN-DONE <exit code>`` on stdout.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback

_IGNORED = {"base_url", "output_file", "request_rate", "max_concurrency", "disable_tqdm", "host", "port",
            "ready_check_timeout_sec"}


def _memoize(serving) -> None:
    datasets: dict = {}
    tokenizers: dict = {}
    get_dataset, get_tokenizer = serving.get_dataset, serving.get_tokenizer

    def cached_dataset(args, tokenizer, model_id=None):
        key = repr(sorted((k, repr(v)) for k, v in vars(args).items() if k not in _IGNORED))
        if key not in datasets:
            datasets[key] = get_dataset(args, tokenizer, model_id)
        return list(datasets[key])

    def cached_tokenizer(name, *args, **kwargs):
        if name not in tokenizers:
            tokenizers[name] = get_tokenizer(name, *args, **kwargs)
        return tokenizers[name]

    serving.get_dataset, serving.get_tokenizer = cached_dataset, cached_tokenizer


def main() -> None:
    from sglang.benchmark import serving

    _memoize(serving)
    print("LOADGEN-READY", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        rc = 0
        with open(request["log"], "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            sys.argv = ["sglang.benchmark.serving", *request["argv"]]
            try:
                serving.cli_main()
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except Exception:
                traceback.print_exc()
                rc = 1
        print(f"LOADGEN-DONE {rc}", flush=True)


if __name__ == "__main__":
    main()

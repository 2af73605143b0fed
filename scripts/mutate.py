"""Mutation testing (``make mutate``; not part of ``make test`` or CI): does a one-line bug fail a test?

mutmut (pinned in requirements-test.txt) makes small changes to one module at a time (an operator, a
constant, a dropped argument, ...) and runs the tests of that module (:data:`TESTS_OF`) against each;
a mutant that every test survives is a bug the suite would let through.

Each module runs in its own scratch copy under ``build/mutate/<module>`` (the working tree is never
touched): ``mm_scheduler/`` as is and ``integration/`` under its installed name ``mm_scheduler_sglang/``
(mutmut names mutants after file paths, and tests import the package by that name). Only the test files
mapped to the module are run; mutmut then runs, for each mutant, just the tests that executed the
mutated function. Results: ``build/mutate/<module>/mutants`` (``mutmut browse`` / ``mutmut show NAME``
there) and a summary per module in ``build/mutate/summary.json``.

    .venv/bin/python scripts/mutate.py                          # every mapped module (hours on 2 cores)
    .venv/bin/python scripts/mutate.py service held             # some modules (file stem or path)
    .venv-sglang0516/bin/python scripts/mutate.py token_check   # against SGLang 0.5.16 (transformers 5.12.1)
    .venv/bin/python scripts/mutate.py --max-children 1 modes   # fewer parallel workers
    .venv/bin/python scripts/mutate.py --recheck service        # after adding tests: rerun only the
                                                                # survivors of the last run, with today's tests
    MUTATE_ARGS="service" make mutate
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "mutate"
SI = "tests/integration/"
CORE = "tests/core/"

# Module -> the test files that exercise it. Slow multi-process files are left out where a faster file
# covers the same code. test_epd.py runs its TP=1 scenarios in the test process here (MM_EPD_IN_PROCESS, set
# in main()): mutmut only sees, and so only reruns, tests whose test process calls the mutated function.
TESTS_OF: dict[str, list[str]] = {
    # the SGLang plugin (integration/, imported as mm_scheduler_sglang)
    "integration/held.py": [SI + "test_held.py", SI + "test_service.py"],
    "integration/service.py": [SI + "test_service.py", SI + "test_service_soak.py",
                               SI + "test_early_encoding.py", SI + "test_defer_prefill.py"],
    "integration/sglang_plugin.py": [SI + "test_plugin_hooks.py", SI + "test_early_encoding.py",
                                     SI + "test_defer_prefill.py", SI + "test_startup_guard.py",
                                     SI + "test_service.py", SI + "test_pixel_transport.py"],
    "integration/adapters.py": [SI + "test_adapters.py", SI + "test_equivalence.py", SI + "test_dp_encoder.py",
                                SI + "test_pixel_transport.py"],
    # capture and replay need CUDA (tests/gpu); here: the cut into replays, the buckets, why_not, the static batch
    "integration/uniform_graphs.py": [SI + "test_uniform_graphs.py", SI + "test_vit_graphs.py"],
    "integration/vit_graphs.py": [SI + "test_vit_graphs.py", SI + "test_uniform_graphs.py"],
    "integration/preprocess.py": [SI + "test_preprocess_thread.py"],
    "integration/pixel_transport.py": [SI + "test_pixel_transport.py"],
    # its replacement check runs only on a transformers < 5.17: run it with .venv-sglang0516's python
    "integration/token_check.py": [SI + "test_token_check.py"],
    "integration/vision_attention.py": [SI + "test_vision_attention.py"],
    "integration/position_lookup.py": [SI + "test_position_lookup.py"],
    "integration/norm_lock.py": [SI + "test_norm_lock.py"],
    "integration/modes.py": [SI + "test_modes.py", SI + "test_dp_encoder.py"],
    "integration/settings.py": [SI + "test_plugin_settings.py", SI + "test_plugin_hooks.py",
                                SI + "test_check_config.py"],  # the budget check, as server and CLI report it
    # test_check_versions.py loads integration/sglang_compat.py by path (not the mutated copy);
    # test_plugin_loading.py's checks of the layer run in subprocesses (mutmut sees none of them)
    "integration/sglang_compat.py": [SI + "test_sglang_compat.py", SI + "test_plugin_hooks.py"],
    # TP=2 (rank 0 and its worker spawned) is run once but never per mutant: nothing it calls is in-process
    "integration/epd.py": [SI + "test_epd.py", SI + "test_sglang_compat.py"],
    # the core
    "mm_scheduler/planner.py": [CORE + "test_planner.py"],
    "mm_scheduler/units.py": [CORE + "test_coalescer.py"],
    "mm_scheduler/config.py": [CORE + "test_config.py"],
    "mm_scheduler/coalescer.py": [CORE + "test_coalescer.py", CORE + "test_expedite.py"],
    "mm_scheduler/jobs.py": [CORE + "test_coalescer.py", CORE + "test_expedite.py"],
    "mm_scheduler/executor.py": [CORE + "test_coalescer.py", CORE + "test_reliability.py"],
    "mm_scheduler/lockstep.py": [CORE + "test_lockstep.py"],
}
PLUGIN_UNMAPPED = {
    "integration/soak_driver.py": "a test driver, exercised by the soak",
}
MUTMUT = [sys.executable, "-m", "mutmut"]  # this python's, so .venv-sglang0516 mutates against SGLang 0.5.16
DEFAULT_TIMEOUT_S = 60  # per test, inside a mutant's run: a mutant that makes a test hang fails it instead


def module_names(selected: list[str]) -> list[str]:
    if not selected:
        return list(TESTS_OF)
    chosen = []
    for name in selected:
        hits = [m for m in TESTS_OF if m == name or Path(m).stem == name or m.startswith(name.rstrip("/") + "/")]
        if not hits:
            raise SystemExit(f"mutate: {name!r} names no mapped module; known: {', '.join(TESTS_OF)}")
        chosen += [m for m in hits if m not in chosen]
    return chosen


def refresh_tests(work: Path, module: str) -> None:
    """Today's tests in an existing scratch copy (mutmut copies them into mutants/ when it runs)."""
    shutil.rmtree(work / "tests")
    shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if module.startswith("integration/"):
        with open(work / "tests" / "integration" / "conftest.py", "a") as conftest:
            conftest.write(PRELOAD)


def scratch_copy(module: str, timeout_s: int) -> Path:
    """A copy of the sources and tests with a pyproject whose [tool.mutmut] targets ``module`` only."""
    work = OUT / Path(module).stem
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "mm_scheduler", work / "mm_scheduler", ignore=ignore)
    shutil.copytree(ROOT / "integration", work / "mm_scheduler_sglang", ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    shutil.copytree(ROOT / "configs", work / "configs")
    (work / "scripts" / "gpu_serve").mkdir(parents=True)  # test_pixel_transport builds the harness's tiny Gemma 4
    shutil.copy2(ROOT / "scripts" / "gpu_serve" / "build_model.py", work / "scripts" / "gpu_serve")
    target = module.replace("integration/", "mm_scheduler_sglang/", 1)
    tests = [t for t in TESTS_OF[module] if (ROOT / t).exists()]
    pyproject = (ROOT / "pyproject.toml").read_text()
    pyproject = re.sub(r"(?ms)^\[tool\.mutmut\].*?(?=^\[|\Z)", "", pyproject)  # ours replaces any other
    pyproject += "\n[tool.mutmut]\n" + "\n".join([
        'source_paths = ["mm_scheduler", "mm_scheduler_sglang"]',
        f"only_mutate = [{json.dumps(target)}]",
        'also_copy = ["configs", "scripts"]',
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
        # -m: stress/gpu/e2e tests are out of scope (too slow, or need CUDA); -p no:randomly etc. not needed
        f'pytest_add_cli_args = ["-m", "not stress and not gpu and not e2e", "--timeout={timeout_s}", "-x", "-q"]',
        'process_isolation = "forkserver"',  # torch and the service's threads are not fork-safe
        "use_git_change_detection = false",
        "track_dependencies = false",
    ]) + "\n"
    (work / "pyproject.toml").write_text(pyproject)
    if module.startswith("integration/"):  # import once in mutmut's fork server what tests import lazily
        with open(work / "tests" / "integration" / "conftest.py", "a") as conftest:
            conftest.write(PRELOAD)
    return work


PRELOAD = """
# Added by scripts/mutate.py (this scratch copy only): modules the tests import lazily, imported once in
# mutmut's fork server instead of in every mutant's process (sglang's imports take seconds).
import contextlib  # noqa: E402

with contextlib.suppress(Exception):
    import sglang_models  # noqa: F401
    import transformers  # noqa: F401
    from sglang.srt.managers import mm_utils, schedule_batch  # noqa: F401
    from sglang.srt.models import gemma3_mm, gemma4_mm, qwen2_5_vl, qwen3_vl, qwen3_vl_moe  # noqa: F401
    from sglang.srt.plugins import hook_registry  # noqa: F401
    from sglang.srt.sampling import sampling_params  # noqa: F401
"""


def summarize(work: Path, module: str) -> dict:
    """``mutmut results --all true``: every mutant's status, counted."""
    out = subprocess.run([*MUTMUT, "results", "--all", "true"], cwd=work,
                         capture_output=True, text=True, check=False).stdout
    statuses: dict[str, str] = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep:
            statuses[name] = status
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status] = counts.get(status, 0) + 1
    tested = sum(n for s, n in counts.items() if s not in ("not checked", "skipped"))
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    return {"module": module, "tests": TESTS_OF[module], "counts": counts,
            "score": round(killed / tested, 4) if tested else None,
            "survivors": sorted(n for n, s in statuses.items() if s in ("survived", "no tests", "suspicious"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help="module paths or stems (default: every mapped module)")
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutant workers (default 2)")
    parser.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT_S, help="per-test timeout, s")
    parser.add_argument("--recheck", action="store_true",
                        help="rerun only the last run's surviving mutants, with the current tests")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    summary_path = OUT / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "PYTHONDONTWRITEBYTECODE": "1", "MM_EPD_IN_PROCESS": "1"}
    for module in module_names(args.modules):
        started = time.monotonic()
        names: list[str] = []
        if args.recheck:
            work = OUT / Path(module).stem
            if not (work / "mutants").is_dir():
                raise SystemExit(f"mutate: no earlier run of {module} in {work} to recheck")
            names = summarize(work, module)["survivors"]
            refresh_tests(work, module)
            print(f"== recheck {module}: {len(names)} survivors", flush=True)
            if not names:
                continue
        else:
            work = scratch_copy(module, args.timeout)
            print(f"== mutate {module}: tests {' '.join(TESTS_OF[module])}", flush=True)
        rc = subprocess.run([*MUTMUT, "run", "--max-children", str(args.max_children), *names],
                            cwd=work, env=env, check=False).returncode
        result = summarize(work, module)
        result["seconds"] = round(time.monotonic() - started)
        result["mutmut_exit_code"] = rc
        summary[module] = result
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"== {module}: {result['counts']} score {result['score']} ({result['seconds']} s)", flush=True)
        for name in result["survivors"]:
            print(f"   survived: {name}")
    print(f"summary: {summary_path}")
    for module, result in summary.items():
        print(f"{module:36} {result['score']!s:8} {result['counts']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Check the plugin's version layer (integration/sglang_compat.py) against every SGLang release, statically.

For each version (default 0.5.16 .. 0.5.23) it downloads the wheel (``pip download --no-deps``), unpacks its
Python files and, reading them with ``ast`` (nothing is imported), checks that:

* every name in ``SAME`` and ``CUDA_ONLY`` (hook targets and what the plugin reads on all releases) is defined;
* for every row of ``ROWS``, the form the layer picks for that version has all its names defined, and the
  next newer form's names do not all exist yet (else the layer should have picked it);
* versions outside the range are not checked (the plugin registers nothing there).

A name ``pkg.module.Class.attr`` is found when ``module`` defines (or imports) ``Class`` and the class body,
a ``self.attr = ...`` in one of its methods, or a base class defines ``attr``. Prints one table (markdown) and
exits 1 on any disagreement. Usage: python scripts/check-sglang-versions.py [--cache DIR] [0.5.16 ...]
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VERSIONS = [f"0.5.{n}" for n in range(16, 24)]


def load_layer():
    spec = importlib.util.spec_from_file_location("sglang_compat", REPO / "integration" / "sglang_compat.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["sglang_compat"] = module
    spec.loader.exec_module(module)
    return module


def unpack(version: str, cache: Path) -> Path:
    root = cache / version
    if (root / "sglang").is_dir():
        return root
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = list(wheels.glob(f"sglang-{version}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", f"sglang=={version}",
                        "-d", str(wheels)], check=True)
        found = list(wheels.glob(f"sglang-{version}-*.whl"))
    with zipfile.ZipFile(found[0]) as wheel:
        wheel.extractall(root, [n for n in wheel.namelist() if n.startswith("sglang/") and n.endswith(".py")])
    return root


class Tree:
    """Definitions in one release's source tree, found by reading files with ``ast``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._modules: dict[str, ast.Module | None] = {}

    def module(self, dotted: str) -> ast.Module | None:
        if dotted not in self._modules:
            base = self.root.joinpath(*dotted.split("."))
            paths = [p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()]
            self._modules[dotted] = ast.parse(paths[0].read_text(encoding="utf-8")) if paths else None
        return self._modules[dotted]

    def is_package(self, dotted: str) -> bool:
        return (self.root.joinpath(*dotted.split(".")) / "__init__.py").is_file()

    def top_level(self, module: str, name: str, depth: int = 0) -> tuple[str, ast.AST] | None:
        """``(module, node)`` defining ``name`` in ``module``, following ``from x import name``."""
        tree = self.module(module)
        if tree is None or depth > 8:
            return None
        found = None  # the last binding, but a class or function over a later re-assignment of it
        for node in tree.body:
            bound = self._binds(module, node, name, depth)
            if bound and not (found and isinstance(found[1], (ast.ClassDef, ast.FunctionDef))
                              and isinstance(node, ast.Assign)):
                found = bound
        if found is None and self.is_package(module) and self.module(f"{module}.{name}") is not None:
            return f"{module}.{name}", self.module(f"{module}.{name}")
        return found

    def _binds(self, module: str, node: ast.AST, name: str, depth: int):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return module, node
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return module, node
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return module, node
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    source = self._absolute(module, node)
                    if source.partition(".")[0] != module.partition(".")[0]:  # another package (sgl_kernel): not here
                        return module, node
                    return self.top_level(source, alias.name, depth + 1) or \
                        (self.module(f"{source}.{alias.name}") and (f"{source}.{alias.name}", None))
        if isinstance(node, (ast.If, ast.Try)):
            for child in [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", []),
                          *(h for handler in getattr(node, "handlers", []) for h in handler.body)]:
                found = self._binds(module, child, name, depth)
                if found:
                    return found
        return None

    def _absolute(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = module if self.is_package(module) else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        return f"{package}.{node.module}" if node.module else package

    def class_has(self, module: str, cls: ast.ClassDef, attr: str, depth: int = 0) -> bool:
        """``attr`` in the class body, as ``self.attr`` set in a method, or in a base class."""
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == attr:
                return True
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == attr for t in targets):
                return True
        for node in ast.walk(cls):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Attribute) and t.attr == attr and isinstance(t.value, ast.Name)
                   and t.value.id == "self" for t in targets):
                return True
        if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in cls.body) and \
                self._string_constant(module, attr):
            return True  # answered by __getattr__ from a table naming it (e.g. ParallelContext's fields)
        if depth > 8:
            return False
        for base in cls.bases:
            if isinstance(base, ast.Name):
                found = self.top_level(module, base.id)
                if found and isinstance(found[1], ast.ClassDef) and self.class_has(*found, attr, depth + 1):
                    return True
        return False

    def _string_constant(self, module: str, text: str) -> bool:
        return any(isinstance(n, ast.Constant) and n.value == text for n in ast.walk(self.module(module)))

    def has(self, dotted: str) -> bool:
        """Whether ``dotted`` (module path, then a top-level name, then class attributes) is defined."""
        parts = dotted.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:cut])
            if self.module(module) is None:
                continue
            return self._has_in(module, parts[cut:])
        return False

    def params(self, dotted: str) -> tuple[str, ...] | None:
        """Parameter names of a function or method (a hook target), None if it is not one found here."""
        node = self.find(dotted)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return None
        args = node.args
        return tuple(a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]) + \
            tuple(f"*{a.arg}" for a in (args.vararg, args.kwarg) if a is not None)

    def find(self, dotted: str) -> ast.AST | None:
        parts = dotted.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:cut])
            if self.module(module) is not None:
                found = self.top_level(module, parts[cut])
                if found is None or len(parts) - cut > 2 or not isinstance(found[1], ast.ClassDef):
                    return found[1] if found and len(parts) - cut == 1 else None
                return next((n for n in found[1].body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                             and n.name == parts[-1]), None)
        return None

    def _has_in(self, module: str, rest: list[str]) -> bool:
        found = self.top_level(module, rest[0])
        if found is None:
            return False
        where, node = found
        for attr in rest[1:]:
            if isinstance(node, ast.Module):  # a submodule
                found = self.top_level(where, attr)
                if found is None:
                    return False
                where, node = found
                continue
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) \
                    and isinstance(node.value.func, ast.Name):  # an instance: ``envs = Envs()``
                found = self.top_level(where, node.value.func.id)
                if found is None:
                    return False
                where, node = found
            if not isinstance(node, ast.ClassDef) or not self.class_has(where, node, attr):
                return False
            node = None  # deeper attributes of an attribute are not followed
        return True


def check(layer, version: str, tree: Tree) -> tuple[dict[str, str], list[str]]:
    parsed = layer.parse_version(version)
    cells, problems = {}, []
    for row in layer.ROWS:
        form = row.form(parsed)
        cell = form.how or "absent"
        missing = [n for n in form.names if not tree.has(n)]
        if missing:
            problems.append(f"{version} {row.key}: picked '{form.how}' but missing {missing}")
            cell += " **MISSING**"
        newer = [f for f in row.forms if f.since > form.since]
        if newer and newer[0].names and all(tree.has(n) for n in newer[0].names):
            problems.append(f"{version} {row.key}: '{newer[0].how}' already exists, the layer picks '{form.how}'")
            cell += " **NEWER EXISTS**"
        cells[row.key] = cell
    for row in layer.ROWS:
        form = row.form(parsed)
        if row.hook and form.names:
            cells[f"params:{form.names[0]}"] = tree.params(form.names[0])
    for target in layer.HOOKS.values():
        cells[f"params:{target}"] = tree.params(target)
    same = (*layer.SAME, *layer.CUDA_ONLY)
    missing_same = [n for n in same if not tree.has(n)]
    if missing_same:
        problems.append(f"{version}: names read on every version but missing here: {missing_same}")
    cells["same"] = f"{len(same) - len(missing_same)}/{len(same)}"
    return cells, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="*", default=DEFAULT_VERSIONS)
    parser.add_argument("--wide", action="store_true", help="one column per version")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mm-scheduler-sglang-wheels")
    args = parser.parse_args()
    layer = load_layer()
    results, problems = {}, []
    for version in args.versions:
        parsed = layer.parse_version(version)
        if parsed is None or not layer.OLDEST <= parsed <= layer.NEWEST:
            print(f"{version}: outside the supported range, not checked (the plugin registers nothing there)")
            continue
        cells, found = check(layer, version, Tree(unpack(version, args.cache)))
        results[version], problems = cells, problems + found
    hooks_same = "leading parameters the hooks read are the same in all"
    versions = list(results)
    signatures: dict[str, dict[str, tuple]] = {}
    for version in versions:
        for key, value in results[version].items():
            if key.startswith("params:"):
                signatures.setdefault(key[len("params:"):], {})[version] = value
    for target, by_version in signatures.items():  # hooks read SGLang's leading arguments as they are passed
        lead = layer.PARAMS[target]
        bad = {v: p for v, p in by_version.items() if p is None or p[:len(lead)] != lead}
        if bad:
            problems.append(f"hook target {target}: parameters do not start with {lead} in {bad}")
    if args.wide:
        print("| read by the plugin | " + " | ".join(versions) + " |")
        print("|---|" + "---|" * len(versions))
        for row in layer.ROWS:
            print(f"| {row.what} | " + " | ".join(results[v][row.key] for v in versions) + " |")
        print("| hook targets and names the same on all (present) | "
              + " | ".join(results[v]["same"] for v in versions) + " |")
    else:  # one line per row: each form with the checked versions that use it
        print("| read by the plugin | where, by version (checked) |")
        print("|---|---|")
        for row in (*layer.ROWS, "same"):
            cells = [results[v]["same" if row == "same" else row.key] for v in versions]
            spans = []
            for version, cell in zip(versions, cells, strict=True):
                if spans and spans[-1][2] == cell:
                    spans[-1][1] = version
                else:
                    spans.append([version, version, cell])
            what = "hook targets and names the same on all (present)" if row == "same" else row.what
            print(f"| {what} | " + "; ".join(f"{a}{'-' + b if b != a else ''}: {c}" for a, b, c in spans) + " |")
    if not any("parameters do not" in p for p in problems):
        print(f"Hook targets ({len(signatures)}): {hooks_same} checked versions.")
    for problem in problems:
        print("DISAGREES:", problem)
    print(f"{len(versions)} versions checked, {len(problems)} disagreements")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

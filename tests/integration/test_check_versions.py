"""scripts/check-sglang-versions.py finds what the layer names, statically, and reports disagreements.

A synthetic two-release source tree stands in for SGLang's wheels (the script itself downloads them; run it by
hand, its output is in the README).
"""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check-sglang-versions.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("check_sglang_versions", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root: Path, files: dict[str, str]):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_names_are_found_through_classes_instances_imports_bases_and_getattr_tables(script, tmp_path):
    tree = script.Tree(_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/base.py": "class Base:\n    def inherited(self): ...\n",
        "pkg/mod.py": """
            from pkg.base import Base
            from .other import Moved as Alias
            FIELDS = {"dynamic_size"}
            class Req(Base):
                field: int = 0
                def __init__(self):
                    self.extend_end: int | None = None
                    self.plain = 1
            class Ctx:
                def __getattr__(self, name): ...
            envs = Req()
            if True:
                CONDITIONAL = 1
            """,
        "pkg/other.py": "class Moved:\n    x = 1\n",
    }))
    for name in ("pkg.mod.Req", "pkg.mod.Req.field", "pkg.mod.Req.extend_end", "pkg.mod.Req.plain",
                 "pkg.mod.Req.inherited", "pkg.mod.Alias.x", "pkg.mod.Ctx.dynamic_size", "pkg.mod.envs.plain",
                 "pkg.mod.CONDITIONAL", "pkg.other.Moved"):
        assert tree.has(name), name
    for name in ("pkg.mod.Req.missing", "pkg.mod.Nope", "pkg.gone.Req", "pkg.mod.Ctx.not_in_any_table"):
        assert not tree.has(name), name
    assert tree.params("pkg.base.Base.inherited") == ("self",)


def test_a_row_disagreeing_with_the_code_is_reported(script, tmp_path):
    layer = script.load_layer()
    # A 0.5.16 tree that already has 0.5.22's extend_end: the layer's choice (extend_range) is then wrong twice.
    tree = script.Tree(_tree(tmp_path, {
        "sglang/__init__.py": "", "sglang/srt/__init__.py": "", "sglang/srt/managers/__init__.py": "",
        "sglang/srt/managers/schedule_batch.py": "class Req:\n    def __init__(self):\n        self.extend_end = 0\n",
    }))
    _, problems = script.check(layer, "0.5.16", tree)
    assert any("extend_end: picked 'Req.extend_range.end' but missing" in p for p in problems)
    assert any("extend_end: 'Req.extend_end' already exists" in p for p in problems)
    assert any("names read on every version but missing" in p for p in problems)

"""The core stays a small library: under 1,500 lines of code, no import of any plugin, and no
import cycle between its modules (function-level and TYPE_CHECKING imports counted too, so a
cycle cannot hide inside a function)."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "meshcore"
MAX_LINES = 1500


def lines_of_code(source: str) -> int:
    """Lines holding code: not blank, not only a comment, not part of a docstring."""
    tree = ast.parse(source)
    docs: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                docs.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    code: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            code.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in docs)
    return len(code)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, wherever the import statement stands."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def core_modules() -> dict[str, Path]:
    return {f"meshcore.{p.stem}" if p.stem != "__init__" else "meshcore": p
            for p in sorted(CORE.glob("*.py"))}


def test_line_counter_counts_code_only() -> None:
    source = '"""Doc\nstring."""\n\n# comment\nx = 1  # trailing\n\ndef f():\n    """Doc."""\n' \
             '    return (1,\n            2)\n'
    assert lines_of_code(source) == 4  # x = 1, def, return (two lines)


def test_core_is_under_1500_lines_of_code() -> None:
    counts = {p.name: lines_of_code(p.read_text()) for p in CORE.glob("*.py")}
    total = sum(counts.values())
    biggest = sorted(counts.items(), key=lambda kv: -kv[1])[:5]
    assert total < MAX_LINES, f"meshcore/ has {total} lines of code (largest: {biggest})"


def test_core_imports_no_plugin() -> None:
    offenders = {name: sorted(m for m in imports_of(path)
                              if m.split(".")[0].startswith(("meshcore_", "mesh_llm")))
                 for name, path in core_modules().items()}
    assert not {k: v for k, v in offenders.items() if v}


def test_core_has_no_import_cycle() -> None:
    modules = core_modules()
    graph = {name: {m for m in imports_of(path) if m in modules and m != name}
             for name, path in modules.items()}
    for name, deps in graph.items():  # "from meshcore import x" names the module x too
        if name != "meshcore":
            deps.discard("meshcore")
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        seen[name] = 1
        for dep in sorted(graph[name]):
            if seen.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, name, dep]))
            if dep not in seen:
                visit(dep, [*path, name])
        seen[name] = 2

    for name in graph:
        if name not in seen:
            visit(name, [])


def test_cycle_finder_finds_a_cycle(tmp_path: Path) -> None:
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    import meshcore.b\n")
    b.write_text("from meshcore import a\n")
    assert "meshcore.b" in imports_of(a) and "meshcore.a" in imports_of(b)

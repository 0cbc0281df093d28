"""The test suite's layout: fixtures several modules share live in ``conftest.py`` and shared helpers in plain modules
beside ``tiny.py`` (``references.py``, ``runs.py``), so no test module imports another (importing one runs its
module-level code and re-collects nothing, and an imported fixture shadows conftest's without a trace)."""
import ast
import pathlib

TESTS = pathlib.Path(__file__).resolve().parent


def imported_modules(path: pathlib.Path):
    """Every module ``path`` imports, at any depth (imports inside functions included)."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module


def test_no_test_module_imports_another():
    modules = sorted(TESTS.glob("test_*.py"))
    assert len(modules) > 30  # the glob found the suite
    offenders = {path.name: sorted({m for m in imported_modules(path) if m.split(".")[0].startswith("test_")})
                 for path in modules}
    assert {name: found for name, found in offenders.items() if found} == {}

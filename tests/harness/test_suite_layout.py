"""The test suite's layout: test modules live in three folders by layer, ``tests/core`` (the library ``lacache_core``
alone), ``tests/harness`` (the harness and benchmark folders, scripts, docs) and ``tests/vllm_plugin`` (the vLLM
plugin, collected where vLLM is installed; its helper ``engines.py`` and conftest sit beside it); fixtures several modules share live
in ``tests/conftest.py`` (``tests/core/conftest.py`` holds the one fixture only tests/core takes) and shared helpers in
plain modules beside ``tiny.py`` (``references.py``, ``runs.py``), so no test module imports another (importing one
runs its module-level code and re-collects nothing, and an imported fixture shadows conftest's without a trace)."""
import ast
import pathlib

TESTS = pathlib.Path(__file__).resolve().parent.parent
FOLDERS = ("core", "harness", "vllm_plugin")
HELPERS = {"conftest.py", "references.py", "runs.py", "tiny.py"}


def imported_modules(path: pathlib.Path):
    """Every module ``path`` imports, at any depth (imports inside functions included)."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module


def test_no_test_module_imports_another():
    modules = sorted(path for folder in FOLDERS for path in (TESTS / folder).glob("test_*.py"))
    assert len(modules) > 30  # the glob found the suite
    offenders = {path.name: sorted({m for m in imported_modules(path) if m.split(".")[0].startswith("test_")})
                 for path in modules}
    assert {name: found for name, found in offenders.items() if found} == {}
    # every test module lives directly in one of FOLDERS (none at tests/ or deeper), so the glob above
    # saw them all
    everywhere = sorted(path.relative_to(TESTS).as_posix() for path in TESTS.rglob("test_*.py"))
    assert everywhere == sorted(path.relative_to(TESTS).as_posix() for path in modules)
    assert [p for p in everywhere if p.split("/")[0] not in FOLDERS or p.count("/") != 1] == []
    # module names stay unique across the folders (pytest imports each by its bare name: no __init__.py packages)
    names = [p.split("/")[-1] for p in everywhere]
    assert len(names) == len(set(names))
    assert sorted(path.name for path in TESTS.glob("*.py")) == sorted(HELPERS)
    assert not list(TESTS.rglob("__init__.py"))

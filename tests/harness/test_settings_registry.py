"""Quantizers and sparse readers registered like methods (issue 29): today's folder names, result hashes and
errors pinned, the library naming settings (``KIVI.bits``) where the harness names flags, no import cycle."""
import ast
import re
from pathlib import Path

import pytest

from harness.flags import add_method_flags, as_flags, method_identity, method_tag, parser, setting_flags
from harness.identity import digest
from lacache_core import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "lacache_core"

#: (method, flags, folder tag, hash of the method's identity), computed by the hand-written quant/read flags of
#: git 9e5245d (harness/flags.py before the registries; its quant/read code as at abf5887 and 5e5631d): each must
#: come out the same.
PINNED = [
    ("lacache", "", "lacache_c256_S16_O0", "763db33c"),
    ("full", "", "full", "a2a38389"),
    ("streamingllm", "--key_rotation every_step", "streamingllm_c256_revery_step", "0225fb4d"),
    ("lacache", "--quant kivi", "lacache_c256_S16_O0_kivi2", "c3192d02"),
    ("lacache", "--quant kivi --quant_bits 4", "lacache_c256_S16_O0_kivi4", "37327938"),
    ("lacache", "--quant kivi --quant_group 16 --quant_residual 64", "lacache_c256_S16_O0_kivi2g16r64", "e27a9509"),
    ("full", "--quant kivi --quant_key_order post_rope", "full_kivi2_postrope", "bbd009ac"),
    ("full", "--quant kivi --quant_schedule reference", "full_kivi2_refschedule", "843d4894"),
    ("full", "--quant kivi --quant_bits 8 --quant_key_order post_rope --quant_schedule reference --quant_residual 32",
     "full_kivi8g32r32_postrope_refschedule", "dc6368fb"),
    ("full", "--quant kivi --quant_group 32 --quant_residual 32", "full_kivi2g32r32", "37a161cd"),
    ("lacache", "--quant gear", "lacache_c256_S16_O0_gear2rank2", "bd73f36c"),
    ("snapkv", "--quant gear --quant_rank 4 --quant_bits 4", "snapkv_c256_gear4rank4", "8730ce62"),
    ("full", "--quant gear --quant_group 16 --quant_residual 16 --quant_rank 3 --quant_key_order post_rope",
     "full_gear2rank3g16r16_postrope", "273b3f98"),
    ("lacache", "--read quest", "lacache_c256_S16_O0_quest1024", "6b8e646f"),
    ("full", "--read quest --quest_budget 256", "full_quest256", "4a9dc94e"),
    ("lacache", "--read quest --quest_page_size 8 --quest_dense_layers 0", "lacache_c256_S16_O0_quest1024p8d0",
     "1d092283"),
    ("full", "--read quest --quest_dense_layers 1", "full_quest1024p16d1", "2822be96"),
    ("full", "--read quest --quest_rule kvcache_factory", "full_quest1024_kvcf0", "19832c6c"),
    ("full", "--read quest --quest_rule kvcache_factory --quest_recent_size 4 --quest_budget 64", "full_quest64_kvcf4",
     "34866a7e"),
    ("lacache", "--quant kivi --quant_bits 4 --read quest --quest_budget 128", "lacache_c256_S16_O0_kivi4_quest128",
     "56a850cc"),
    ("full", "--quant gear --read quest --quest_page_size 4 --quest_rule kvcache_factory",
     "full_gear2rank2_quest1024p4d2_kvcf0", "531c1368"),
    ("lacache", "--quant_bits 2 --quest_budget 1024", "lacache_c256_S16_O0", "763db33c"),  # defaults: no option needed
]

#: (flags, the one-line error of git 9e5245d); the library's own errors now name settings, said as flags here.
ERRORS = [
    ("--quant_rank 4", "--quant_rank 4 needs --quant gear; --quant none does not use it"),
    ("--quant kivi --quant_rank 4", "--quant_rank 4 needs --quant gear; --quant kivi does not use it"),
    ("--quant_bits 4", "--quant_bits 4 needs --quant kivi or gear; --quant none does not use it"),
    ("--quant_group 16", "--quant_group 16 needs --quant kivi or gear; --quant none does not use it"),
    ("--quant_residual 64", "--quant_residual 64 needs --quant kivi or gear; --quant none does not use it"),
    ("--quant_key_order post_rope", "--quant_key_order post_rope needs --quant kivi or gear; --quant none does not use it"),
    ("--quant_schedule reference", "--quant_schedule reference needs --quant kivi or gear; --quant none does not use it"),
    ("--quest_budget 5", "--quest_budget 5 needs --read quest; --read none does not use it"),
    ("--quest_page_size 8", "--quest_page_size 8 needs --read quest; --read none does not use it"),
    ("--quest_dense_layers 0", "--quest_dense_layers 0 needs --read quest; --read none does not use it"),
    ("--quest_rule kvcache_factory", "--quest_rule kvcache_factory needs --read quest; --read none does not use it"),
    ("--quest_recent_size 3", "--quest_recent_size 3 needs --read quest; --read none does not use it"),
    ("--read quest --quest_recent_size 3",
     "--quest_recent_size 3 needs --quest_rule kvcache_factory; --quest_rule quest has no recent window"),
    ("--quant kivi --quant_bits 3", "--quant_bits must be 2, 4 or 8, got 3"),
    ("--quant gear --quant_schedule reference",
     "--quant_schedule reference is KIVI's alone: --quant gear takes --quant_schedule block"),
    ("--quant gear --quant_rank 64", "--quant_rank must be between 1 and --quant_group 32, got 64"),
    ("--quant gear --quant_rank 0", "--quant_rank must be between 1 and --quant_group 32, got 0"),
    ("--quant kivi --quant_residual 30", "--quant_residual must be a multiple of --quant_group 32 (>= 0), got 30"),
    ("--quant kivi --quant_residual -32", "--quant_residual must be a multiple of --quant_group 32 (>= 0), got -32"),
    ("--quant kivi --quant_group 0", "--quant_group must be >= 1, got 0"),
    ("--quant kivi --quant_schedule reference --quant_residual 0",
     "--quant_schedule reference quantizes keys --quant_residual at a time: --quant_residual must be at least "
     "--quant_group 32, got 0"),
    ("--read quest --quest_budget 0", "--quest_budget must be >= 1, got 0"),
    ("--read quest --quest_page_size 0", "--quest_page_size must be >= 1, got 0"),
    ("--read quest --quest_dense_layers -1", "--quest_dense_layers must be >= 0, got -1"),
    ("--read quest --quest_recent_size -1 --quest_rule kvcache_factory", "--quest_recent_size must be >= 0, got -1"),
    ("--quant kivi --quest_budget 5", "--quest_budget 5 needs --read quest; --read none does not use it"),
    ("--read quest --quant_bits 4", "--quant_bits 4 needs --quant kivi or gear; --quant none does not use it"),
]


def parse(method: str, flags: str):
    p, groups = parser("pinned")
    add_method_flags(groups["method"], cache_size=256, start_size=4)
    p.add_argument("--dtype", default="float32")
    return p.parse_args(["--method", method, *flags.split()])


@pytest.mark.parametrize("method, flags, tag, hashed", PINNED)
def test_folder_names_and_hashes_of_every_quant_and_read_setting_are_those_recorded(method, flags, tag, hashed):
    args = parse(method, flags)
    assert method_tag(args, method) == tag
    assert digest(method_identity(args, method)) == hashed


@pytest.mark.parametrize("flags, message", ERRORS)
def test_bad_quant_and_read_flags_give_the_recorded_error_and_the_library_names_settings(flags, message):
    from harness.flags import quant_setting, read_setting

    with pytest.raises(ConfigError) as err:
        args = parse("full", flags)
        quant_setting(args), read_setting(args)
    assert as_flags(str(err.value)) == message
    if " needs --quant " not in message and " needs --read " not in message:  # raised by the library
        assert "--" not in str(err.value) and re.search(r"\b(KIVI|GEAR|Quest)\.\w+", str(err.value))


def test_settings_are_said_as_flags_in_one_place():
    assert as_flags("LaCache.overlap must be in [0, 3], got 4") == "--overlap must be in [0, 3], got 4"
    assert as_flags("make_cache.method think prunes channels: with make_cache.quant kivi use KIVI.key_order "
                    "post_rope") == "--method think prunes channels: with --quant kivi use --quant_key_order post_rope"
    assert as_flags("Quest.token_budget must be >= 1; GEAR.rank; build_policy.cache_size 4") == \
        "--quest_budget must be >= 1; --quant_rank; --cache_size 4"
    assert as_flags("see lacache_core.quant.KIVIStore and 2.5, x.KIVI.bits") == \
        "see lacache_core.quant.KIVIStore and 2.5, x.KIVI.bits"  # a dotted path that merely contains one: as is


def _config_error_texts():
    """``(file:line, literal text)`` of every ``raise ConfigError(...)`` in the library (f-string holes left out)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and \
                    getattr(node.exc.func, "id", None) == "ConfigError":
                text = "".join(part.value for arg in node.exc.args for part in ast.walk(arg)
                               if isinstance(part, ast.Constant) and isinstance(part.value, str))
                yield f"{path.relative_to(ROOT)}:{node.lineno}", text


def test_library_errors_name_settings_and_every_setting_they_name_has_a_flag():
    names = setting_flags()
    texts = list(_config_error_texts())
    assert len(texts) > 50
    for where, text in texts:
        flags = re.findall(r"(?<![\w-])--\w+", text.replace("python scripts/head_scores.py --model_name_or_path", ""))
        assert not flags, f"{where} names flags {flags}: name the setting (Class.field) instead"
        for owner in re.findall(r"\b(?:make_cache|build_policy|prefill|from_pretrained)\.\w+(?: True)?", text):
            assert owner in names, f"{where}: {owner} has no flag in harness.flags.setting_flags"


# ------------------------------------------------------------------------------------------- import graph
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """The modules ``path`` imports, module level and inside functions alike; left out: ``if TYPE_CHECKING:``
    blocks (never run)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skipped = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skipped.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            yield target
            yield from (f"{target}.{alias.name}" for alias in node.names)  # kept where it is a module


def import_graph() -> dict:
    """Module -> the ``lacache_core`` modules importing it runs: each target and the packages above it that are not
    above the importer (those are already being imported)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        edges = set()
        for target in _imports(path):
            parts = target.split(".")
            edges.update(m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
                         if m in modules and m not in own and m != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict):
    """A cycle of ``graph`` as a list of modules, or ``None``."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    return next((c for c in (visit(n) for n in sorted(graph) if n not in state) if c), None)


def test_no_import_cycle_anywhere_in_lacache_core():
    graph = import_graph()
    assert {"lacache_core.quantizers.kivi", "lacache_core.readers.quest", "lacache_core.quant"} <= set(graph)
    assert "lacache_core.quant" in graph["lacache_core.quantizers.kivi"]  # the config names its store ...
    assert not graph["lacache_core.quant"] & {"lacache_core.quantizers", "lacache_core.quantizers.kivi"}  # ... not back
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the finder finds one


def test_cache_names_no_quantizer_or_reader():
    source = (PACKAGE / "cache.py").read_text()
    for name in ("KIVIStore", "KIVI", "GEAR", "Quest", "selected_tokens", "store_class"):
        assert not re.search(rf"\b{name}\b(?!')", re.sub(r'""".*?"""|#.*', "", source, flags=re.S)), name

"""The package's import structure, read from the source (ast; nothing heavy imported): no import
cycle among requant's modules, the quantizer's layers pointing one way (core → mtp → stage, the
entry points above them), and the torch-free modules staying torch-free."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("capture", "hooks", "storage", "orchestrator", "quantizer")   # requant.<name> lives in <name>/
LAYERS = ("core", "mtp", "stage")                                         # requant.quantizer.<layer>


def _modules() -> dict[str, Path]:
    out = {}
    for top in PACKAGES:
        for p in sorted((ROOT / top).rglob("*.py")):
            parts = ["requant", top, *p.relative_to(ROOT / top).with_suffix("").parts]
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, bool]]:
    """(requant module imported, whether at module level) for every import statement of ``name``;
    an import inside a function runs only when called, one in a class body at import."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def resolve(target: str) -> str | None:
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        return target if target and target != name else None

    def visit(nodes, top: bool) -> None:
        for n in nodes:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(n.body, False)
                continue
            if isinstance(n, ast.Import):
                found.extend((m, top) for a in n.names if (m := resolve(a.name)))
            elif isinstance(n, ast.ImportFrom):
                base = n.module or ""
                if n.level:
                    pkg = package
                    for _ in range(n.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                for a in n.names:  # `from pkg import submodule` imports the submodule
                    m = resolve(f"{base}.{a.name}") or resolve(base)
                    if m:
                        found.append((m, top))
            for child in ast.iter_child_nodes(n):
                if isinstance(child, ast.stmt) or hasattr(child, "body"):
                    visit([child], top)

    visit(ast.parse(path.read_text()).body, True)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module → modules it imports), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (c := dfs(w)):
                return c
        state[v] = 2
        stack.pop()
        return None

    for v in sorted(graph):
        if v not in state and (c := dfs(v)):
            return c
    return None


def _graph(module_level_only: bool, within: str = "requant") -> dict[str, set[str]]:
    return {m: {t for t, top in _imports(m) if (top or not module_level_only) and t.startswith(within)}
            for m in MODULES if m.startswith(within)}


def test_the_reader_sees_the_package():
    assert "requant.quantizer.core.gptq" in MODULES and "requant.storage.reader" in MODULES
    assert ("requant.quantizer.core.quant", True) in _imports("requant.quantizer.core.pack")
    # the checks can fail: a cycle is found where there is one
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    assert _cycle(_graph(module_level_only=True)) is None
    # the quantizer has none even through the imports its functions make
    assert _cycle(_graph(module_level_only=False, within="requant.quantizer")) is None


def test_quantizer_layers_point_one_way():
    """core imports no mtp or stage, mtp no stage — not even inside a function."""
    bad = []
    for m in MODULES:
        parts = m.split(".")
        if parts[:2] != ["requant", "quantizer"] or len(parts) < 3 or parts[2] not in LAYERS:
            continue
        level = LAYERS.index(parts[2])
        for t, _ in _imports(m):
            tp = t.split(".")
            if t == "requant.quantizer":
                bad.append(f"{m} → {t} (the public API, above the layers)")
            elif tp[:2] == ["requant", "quantizer"] and len(tp) > 2 and tp[2] not in LAYERS:
                bad.append(f"{m} → {t} (an entry point above the layers)")
            elif tp[:2] == ["requant", "quantizer"] and len(tp) > 2 and LAYERS.index(tp[2]) > level:
                bad.append(f"{m} → {t}")
    assert not bad, bad


def test_limits_and_memory_import_without_torch():
    """The CLI and benchmarks/dp_cost_model.py read them on machines without torch."""
    code = ("import sys; import requant.quantizer, requant.quantizer.core.limits, requant.quantizer.core.memory; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_api_names_resolve():
    import importlib

    import requant.quantizer as q

    for name in q.__all__:
        obj = getattr(q, name)
        assert obj is getattr(importlib.import_module(f"requant.quantizer.{q._API[name]}"), name), name

"""The shape of the code: short functions, train.py and sample.py apart, concept files copyable."""
import ast
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONCEPTS = {"data": {"numpy", "PIL", "torch"}, "fid": {"numpy", "scipy", "torch"}, "vqgan": {"torch"}, "nat": {"torch"},
            "samplers": {"torch"}, "policy": {"torch"}, "ppo": {"torch"}, "reward": {"torch"}, "autonat": {"torch"},
            "simclr": {"torch"}, "flow_net": {"torch"}}


def modules() -> dict:
    """Project module name -> path (top-level files and the experiments package)."""
    paths = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "experiments", "*.py"))
    out = {}
    for p in paths:
        rel = os.path.relpath(p, ROOT)[:-3].replace(os.sep, ".")
        if rel != "conftest":
            out[rel.removesuffix(".__init__")] = p
    return out


def imports(path: str) -> set:
    """Every module a file imports (at any depth of the file), as dotted names."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def project_graph() -> dict:
    mods = modules()
    return {m: {i for i in imports(p) if i in mods} for m, p in mods.items()}


def reachable(graph: dict, start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_function_over_80_lines():
    long = []
    for m, p in modules().items():
        for node in ast.walk(ast.parse(open(p).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{m}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long


def test_nothing_imports_an_entry_script():
    """train.py and sample.py are entry scripts: no module imports them (train.py finds an experiment's
    stages by name, importlib, only when one is asked for), so they never import each other either."""
    graph = project_graph()
    assert not {m for m, deps in graph.items() if deps & {"train", "sample"}}
    import train
    graph["train"] |= set(train.EXPERIMENT_STAGES.values())
    assert "sample" not in reachable(graph, "train") and "train" not in reachable(graph, "sample")


def test_concept_files_import_no_project_module_and_only_their_packages():
    mods = modules()
    for m, allowed in CONCEPTS.items():
        for i in imports(mods[m]):
            top = i.split(".")[0]
            assert top not in mods, f"{m}.py imports the project module {i}"
            assert top in sys.stdlib_module_names or top in allowed, f"{m}.py imports {i}"


LONGER = {"train": 600, "sample": 300}     # train.py reads as the method top to bottom (README, "Files")


def test_line_budgets():
    """No module over 450 lines but train.py (the method, <= 600); sample.py stays short (<= 300)."""
    lines = {m: len(open(p).read().splitlines()) for m, p in modules().items()}
    assert not {m: n for m, n in lines.items() if n > LONGER.get(m, 450)}


def test_no_block_of_6_lines_repeated_between_modules():
    """The same 6 consecutive non-blank lines (stripped) in two modules means code written twice."""
    seen, repeated = {}, []
    for m, p in modules().items():
        text = [s.strip() for s in open(p).read().splitlines()                # imports and quotes repeat by nature
                if s.strip() and not s.strip().startswith(("import ", "from ", '"""', "#"))]
        for i in range(len(text) - 5):
            key = "\n".join(text[i:i + 6])
            if seen.setdefault(key, m) != m:
                repeated.append(f"{seen[key]} and {m}: {text[i]!r}")
    assert not repeated, repeated[:5]

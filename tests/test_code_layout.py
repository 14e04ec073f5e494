"""The shape of the code, kept: one place knows ERNIE, imports point down without cycles, recipes stay short,
the README's layout section is the tree."""

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "src" / "ernie_lora"
ERNIE_NAMES = re.compile(r"\b(self_attention|x_embedder|adaLN_[a-z]+|final_linear|final_norm|text_proj|time_embedding|"
                         r"linear_fc2|gate_proj|up_proj|to_out\.0|to_q|to_k|to_v|norm_q|norm_k)\b|\.layers\b")
MAX_RECIPE_FUNCTION = 80


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules ``name`` imports, wherever in the file (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule; `from pkg import name` the package itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rsplit(".", 1)[0] if "." in target else ""
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return cycles


def test_the_cycle_finder_finds_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles_in_the_package():
    edges = graph()
    # a package's __init__ importing its own submodules is how a package exposes them, not a cycle
    for name in edges:
        edges[name] = {t for t in edges[name] if not t.startswith(name + ".")}
    cycles = find_cycles(edges)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_data_imports_nothing_above_it():
    allowed = ("ernie_lora.data", "ernie_lora.errors", "ernie_lora.io", "ernie_lora.models")
    for name, targets in graph().items():
        if name.startswith("ernie_lora.data"):
            above = sorted(t for t in targets if not t.startswith(allowed) and t != "ernie_lora")
            assert not above, f"{name} imports {above}"


def test_only_models_names_ernie_modules_or_diffusers_private_helpers():
    for name, path in modules().items():
        text = path.read_text()
        if name.startswith("ernie_lora.models"):
            continue
        assert not ERNIE_NAMES.findall(text), f"{path} names ERNIE module paths; ask models.family instead"
        private = re.findall(r"ErnieImage\w*\._\w+|from diffusers[\w.]* import _\w+", text)
        assert not private, f"{path} uses diffusers' private helpers {private}"
    for path in PACKAGE.rglob("*.py"):  # models/ neither
        assert not re.findall(r"ErnieImage\w*\._\w+", path.read_text()), path


def test_recipe_functions_stay_short():
    for path in (PACKAGE / "recipes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= MAX_RECIPE_FUNCTION, f"{path.name}:{node.lineno} {node.name} is {length} lines"


def test_readme_layout_section_is_the_tree():
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed = {m.group(1) for m in re.finditer(r"^\s{2}(\S+?)/?\s", block, re.MULTILINE)}
    listed_sub = {m.group(1) for m in re.finditer(r"^\s{4}(\S+?)/?\s", block, re.MULTILINE)}
    actual = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
              if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").exists())}
    assert {n.removesuffix(".py") for n in listed} == actual
    sub = {f"{p.parent.name}/{p.stem}" for p in PACKAGE.glob("*/*.py") if p.name != "__init__.py"}
    assert {n.removesuffix(".py") for n in listed_sub} == {s.split("/", 1)[1] for s in sub}


def test_commands_that_only_read_answer_without_torch(tmp_path):
    """--help, a config error, lora info and lora verify never import torch (1.5 s here before anything
    else); checked in a fresh interpreter, so what the test session loaded does not count."""
    import subprocess
    import sys

    from test_generate import make_lora

    lora = make_lora(tmp_path / "l.safetensors")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    probe = ("import sys\nfrom ernie_lora.cli import main\nsys.argv = ['ernie-lora', *sys.argv[1:]]\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)")
    for args in (["--help"], ["train", str(bad)], ["lora", "info", str(lora)], ["lora", "verify", str(lora)]):
        done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60)
        assert done.stderr.strip().endswith("NO-TORCH"), (args, done.stderr[-300:])
    assert ": OK: header, layout and tensor hash" in done.stdout  # verify did its whole check

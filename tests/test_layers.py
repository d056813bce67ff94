"""The layers of the code, enforced on its import graph (docs/design.md §1).

`runtime` is the ground floor, `unify` stands on it, `eval` on both; `recipes` is data plus its loader. Every import
statement of every .py file counts, those inside functions and under `if TYPE_CHECKING:` too (an arrow that only
runs sometimes is still an arrow), plus `importlib.import_module("...")` with a literal name. Rules:

  layers    runtime imports nothing of unify, eval, recipes; unify nothing of eval; recipes nothing of runtime,
            unify, eval
  private   no module takes another module's underscore name: `from x import _y`, `x._y` through a name bound to a
            module of ours (`import x`, `from pkg import mod`), `Name._y` through a class or function imported from
            one, or a module `_m` imported from outside its package (dunder names are public)
  cycles    the graph among our modules has no cycle. `from pkg import name` is an arrow to the submodule pkg.name
            when that is a module, else to pkg itself (its __init__): so a package __init__ that imports a submodule
            which imports back from the package is a cycle.

The checker is plain `ast` over the source tree; test_checker_finds_* feed it small trees that break each rule.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "unify", "recipes", "eval")
FORBIDDEN = {"runtime": ("unify", "eval", "recipes"), "unify": ("eval",), "recipes": ("runtime", "unify", "eval")}
# The public API of namedtuples, underscored so it cannot clash with field names.
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_field_defaults", "_make"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, dotted
    file: str  # its path relative to the tree's root
    line: int
    target: str  # the module of ours it imports (a submodule where the name is one, else the package)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _owner(module: str) -> str:
    """The package a module belongs to: runtime.kernels.remap -> runtime.kernels."""
    return module.rpartition(".")[0]


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _private_module_owner(target: str, importer: str) -> str | None:
    """The package whose private module `target` is (or lies under), when `importer` is outside that package."""
    parts = target.split(".")
    for i, part in enumerate(parts):
        if _private(part) and not _inside(importer, ".".join(parts[:i])):
            return ".".join(parts[:i])
    return None


class Tree:
    """The modules of `packages` under `root` and every import among them."""

    def __init__(self, root: Path, packages=PACKAGES):
        self.root = Path(root)
        self.packages = tuple(packages)
        self.files: dict[str, Path] = {}  # module -> file
        for pkg in self.packages:
            for path in sorted((self.root / pkg).rglob("*.py")):
                rel = path.relative_to(self.root)
                if any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
                    continue
                parts = list(rel.with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts.pop()
                self.files[".".join(parts)] = path
        self.imports: list[Import] = []
        self.private_uses: list[str] = []
        for module, path in self.files.items():
            self._scan(module, path)

    # -- resolution ----------------------------------------------------------------------------------------------

    def is_package(self, module: str) -> bool:
        return self.files.get(module, Path()).name == "__init__.py"

    def _ours(self, dotted: str) -> str | None:
        """The longest prefix of `dotted` that is a module of ours (None: not ours)."""
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            name = ".".join(parts[:n])
            if name in self.files:
                return name
        return None

    def _absolute(self, module: str, name: str | None, level: int) -> str | None:
        """The dotted name an import statement in `module` refers to (relative levels resolved); None beyond top."""
        if level == 0:
            if name is None:
                return None
            first = name.split(".")[0]
            if first not in self.packages:
                # a script's own folder is on sys.path[0]: `import sibling` names the file next to it
                here = _owner(module) if not self.is_package(module) else module
                sibling = f"{here}.{first}" if here else first
                if sibling in self.files:
                    return f"{here}.{name}"
            return name
        base = module.split(".") if self.is_package(module) else module.split(".")[:-1]
        if level - 1 > len(base) - 1:
            return None
        base = base[:len(base) - (level - 1)]
        return ".".join(base + ([name] if name else []))

    # -- scanning ------------------------------------------------------------------------------------------------

    def _scan(self, module: str, path: Path) -> None:
        rel = str(path.relative_to(self.root))
        tree = ast.parse(path.read_text(), filename=rel)
        bound_modules: dict[str, str] = {}  # local name -> module of ours
        bound_objects: dict[str, tuple[str, str]] = {}  # local name -> (module of ours, name in it)

        def add(target: str | None, line: int) -> str | None:
            ours = self._ours(target) if target else None
            if ours is not None:
                self.imports.append(Import(module, rel, line, ours))
                if _private_module_owner(ours, module) is not None:
                    self.private_uses.append(f"{rel}:{line}: {module} imports the private module {ours}")
            return ours

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    ours = add(self._absolute(module, alias.name, 0), node.lineno)
                    if ours is None:
                        continue
                    if alias.asname:
                        bound_modules[alias.asname] = ours
                    else:  # `import a.b.c` binds `a`
                        first = alias.name.split(".")[0]
                        bound_modules[first] = self._ours(self._absolute(module, first, 0))
            elif isinstance(node, ast.ImportFrom):
                base = self._absolute(module, node.module, node.level)
                if base is None or self._ours(base) is None:
                    continue
                for alias in node.names:
                    local = alias.asname or alias.name
                    sub = f"{base}.{alias.name}"
                    if sub in self.files:  # a submodule
                        bound_modules[local] = add(sub, node.lineno)
                        continue
                    ours = add(base, node.lineno)
                    if alias.name == "*":
                        continue
                    if _private(alias.name) and ours != module:
                        self.private_uses.append(f"{rel}:{node.lineno}: {module} imports {ours}.{alias.name}")
                    bound_objects[local] = (ours, alias.name)
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                fn = node.func
                fname = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
                if fname in ("import_module", "__import__"):
                    add(node.args[0].value, node.lineno)

        def module_of(expr: ast.expr) -> str | None:
            if isinstance(expr, ast.Name):
                return bound_modules.get(expr.id)
            if isinstance(expr, ast.Attribute):
                parent = module_of(expr.value)
                if parent is not None and f"{parent}.{expr.attr}" in self.files:
                    return f"{parent}.{expr.attr}"
            return None

        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not _private(node.attr):
                continue
            owner = module_of(node.value)
            if owner is not None and owner != module:
                if f"{owner}.{node.attr}" in self.files and _inside(module, owner):
                    continue  # a private submodule, used inside its own package
                self.private_uses.append(f"{rel}:{node.lineno}: {module} reads {owner}.{node.attr}")
            elif isinstance(node.value, ast.Name) and node.value.id in bound_objects \
                    and node.attr not in NAMEDTUPLE_API:
                src, name = bound_objects[node.value.id]
                if src != module:
                    self.private_uses.append(f"{rel}:{node.lineno}: {module} reads {src}.{name}.{node.attr}")

    # -- rules ---------------------------------------------------------------------------------------------------

    def layer_violations(self, forbidden=FORBIDDEN) -> list[str]:
        out = []
        for imp in self.imports:
            low, high = imp.source.split(".")[0], imp.target.split(".")[0]
            if high in forbidden.get(low, ()):
                out.append(f"{imp.file}:{imp.line}: {imp.source} imports {imp.target} "
                           f"({low} must import nothing of {', '.join(forbidden[low])})")
        return list(dict.fromkeys(out))  # `from x import a, b` is one line

    def private_violations(self) -> list[str]:
        return sorted(set(self.private_uses))

    def cycles(self) -> list[str]:
        """One line per strongly connected set of modules: a cycle through it, each arrow with its file:line."""
        graph = nx.DiGraph()
        where: dict[tuple[str, str], str] = {}
        for imp in self.imports:
            if imp.source != imp.target:
                graph.add_edge(imp.source, imp.target)
                where.setdefault((imp.source, imp.target), f"{imp.file}:{imp.line}")
        out = []
        for scc in nx.strongly_connected_components(graph):
            if len(scc) < 2:
                continue
            cycle = nx.find_cycle(graph.subgraph(scc), source=min(scc))
            out.append(f"import cycle among {sorted(scc)}: "
                       + " -> ".join(f"{a} ({where[a, b]})" for a, b in cycle) + f" -> {cycle[0][0]}")
        return sorted(out)


@pytest.fixture(scope="module")
def tree():
    return Tree(ROOT)


def test_the_tree_has_our_modules(tree):
    # a guard on the checker itself: it sees the packages and their imports
    assert {"runtime", "runtime.kernels.fused_moe", "unify.cli", "recipes"} <= set(tree.files)
    assert any(i.source == "runtime.kernels.fused_moe" and i.target == "runtime.kernels.configs"
               for i in tree.imports)


def test_no_import_runs_from_a_lower_layer_to_a_higher_one(tree):
    bad = tree.layer_violations()
    assert not bad, "imports against the layers (docs/design.md §1):\n" + "\n".join(bad)


def test_no_module_takes_another_modules_private_names(tree):
    bad = tree.private_violations()
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_the_import_graph_has_no_cycle(tree):
    bad = tree.cycles()
    assert not bad, "\n".join(bad)


# -- the checker catches what it is for --------------------------------------------------------------------------

def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


BAD_TREE = {
    "runtime/__init__.py": "from .attach import attach\nfrom .c import h\n\nVERSION = 1\n",
    # a back-arrow inside a function, and a cycle attach <-> distributed
    "runtime/attach.py": "from . import distributed\n\ndef attach():\n    from unify.checkpoint import save\n",
    "runtime/distributed.py": "import typing\n\ndef shard():\n    from .attach import attach\n",
    # takes a name of the package __init__, which imports it: a cycle runtime <-> runtime.c (`from . import attach`
    # names the submodule runtime.attach, no arrow to the __init__)
    "runtime/c.py": "from . import VERSION\nfrom . import attach\n\nh = 1\n",
    "runtime/kernels/__init__.py": "",
    "runtime/kernels/fused.py": "def _start():\n    pass\n\nclass Op:\n    def _check(self):\n        pass\n",
    "runtime/kernels/remap.py": "from .fused import _start\n",
    "unify/__init__.py": "",
    "unify/checkpoint.py": "import runtime.kernels.fused as f\nfrom runtime.kernels.fused import Op\n"
                           "import importlib\n\n"
                           "def save():\n    f._start()\n    Op._check(None)\n"
                           "    importlib.import_module('eval.study')\n",
    "unify/_helpers.py": "",
    "recipes/__init__.py": "from ..runtime import nothing\nfrom runtime.kernels import fused\n",
    "eval/__init__.py": "",
    "eval/study.py": "import unify._helpers\nfrom unify import _helpers\n",
}


def test_checker_finds_back_arrows(tmp_path):
    bad = Tree(_write(tmp_path, BAD_TREE)).layer_violations()
    assert any(v.startswith("runtime/attach.py:4: runtime.attach imports unify.checkpoint") for v in bad), bad
    assert any(v.startswith("unify/checkpoint.py:8: unify.checkpoint imports eval.study") for v in bad), bad
    assert any(v.startswith("recipes/__init__.py:2: recipes imports runtime.kernels.fused") for v in bad), bad
    assert len(bad) == 3, bad  # `from ..runtime` beyond the top package is no import of ours


def test_checker_finds_private_names(tmp_path):
    bad = Tree(_write(tmp_path, BAD_TREE)).private_violations()
    assert bad == sorted([
        "eval/study.py:1: eval.study imports the private module unify._helpers",
        "eval/study.py:2: eval.study imports the private module unify._helpers",
        "runtime/kernels/remap.py:1: runtime.kernels.remap imports runtime.kernels.fused._start",
        "unify/checkpoint.py:6: unify.checkpoint reads runtime.kernels.fused._start",
        "unify/checkpoint.py:7: unify.checkpoint reads runtime.kernels.fused.Op._check",
    ]), bad


def test_checker_finds_cycles(tmp_path):
    bad = Tree(_write(tmp_path, BAD_TREE)).cycles()
    assert bad == [
        "import cycle among ['runtime', 'runtime.c']: runtime (runtime/__init__.py:2) -> "
        "runtime.c (runtime/c.py:1) -> runtime",
        "import cycle among ['runtime.attach', 'runtime.distributed']: runtime.attach (runtime/attach.py:1) -> "
        "runtime.distributed (runtime/distributed.py:4) -> runtime.attach",
    ], bad


def test_checker_passes_a_clean_tree(tmp_path):
    clean = {
        "runtime/__init__.py": "from .attach import attach\n__all__ = ['attach']\n",
        "runtime/attach.py": "from . import kernels\nfrom .kernels import fused\n\ndef attach():\n"
                             "    return fused.start(), fused.__name__\n",
        "runtime/version.py": "__version__ = '1'\n",
        "runtime/kernels/__init__.py": "from . import fused\nfrom ._impl import go\n",
        "runtime/kernels/_impl.py": "def go():\n    pass\n",
        "runtime/kernels/fused.py": "from ._impl import go\nfrom ..version import __version__\n\ndef start():\n"
                                    "    return go, __version__\n",
        "unify/__init__.py": "import runtime\nfrom runtime.attach import attach\nfrom runtime import version\n"
                             "x = version.__version__\n",
        "recipes/__init__.py": "import yaml\n",
        "eval/__init__.py": "import unify\nimport runtime.kernels.fused as f\nf.start()\n",
    }
    t = Tree(_write(tmp_path, clean))
    assert len(t.imports) >= 10
    assert (t.layer_violations(), t.private_violations(), t.cycles()) == ([], [], [])

"""The shape of the code: asyncwsgi's modules import one another without a cycle, and no module
of the package or of the benchmarks is over :data:`MAX_LINES` lines.

The import graph is read from the source with :mod:`ast`, not by importing it, so it holds every
import statement wherever it stands: at the top of a module, inside a function (an import
deferred to break a cycle at run time is still a cycle in the design), and under
``if TYPE_CHECKING:``. Imports for annotations count too: a module whose signatures name a type
of another module depends on that module, and a cycle there is as hard to untangle as any other.

``from . import name`` is an edge to the submodule ``name`` when there is one, else to the
package itself (``asyncwsgi/__init__.py``): the package imports the public modules, so a module
that imports a name from the package closes a cycle through it. The implicit import of a
package by the import of one of its submodules is not an edge (every module would otherwise
depend on ``asyncwsgi``).
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "asyncwsgi"
#: The longest a module may be, in lines.
MAX_LINES = 600


def module_name(path: Path) -> str:
    """The dotted name of the module in ``path`` (``asyncwsgi.contrib.django.apps``)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(path): path for path in sorted((ROOT / PACKAGE).rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that the module ``name`` (in ``path``) imports, anywhere in it.

    Relative imports are resolved against the module's package; an imported name that is a
    submodule (``from . import strict``) is an edge to that submodule.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            # ``from pkg import name``: the submodule ``pkg.name`` if there is one, else ``pkg``.
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            # The longest known module the dotted name starts with (``asyncwsgi.x.y`` when
            # ``y`` is no module is the module ``asyncwsgi.x``).
            parts = target.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()
            if parts:
                found.add(".".join(parts))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """Each asyncwsgi module and the asyncwsgi modules it imports."""
    modules = package_modules()
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        cycle = exc.args[1]
        pytest.fail(f"import cycle among asyncwsgi modules: {' -> '.join(reversed(cycle))}")


def test_the_import_graph_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The reader resolves relative and absolute imports, finds them inside functions and under
    ``TYPE_CHECKING``, and tells a submodule imported from its package apart from a name the
    package defines."""
    (tmp_path / "__init__.py").write_text("from .a import f\nVERSION = '1'\n")
    (tmp_path / "a.py").write_text(
        "import pkg.b\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from .c import C\n"
        "def f():\n"
        "    from . import d\n"
    )
    (tmp_path / "e.py").write_text("from . import VERSION\n")
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.e"}
    assert imported_modules("pkg", tmp_path / "__init__.py", known) == {"pkg.a"}
    assert imported_modules("pkg.a", tmp_path / "a.py", known) == {"pkg.b", "pkg.c", "pkg.d"}
    assert imported_modules("pkg.e", tmp_path / "e.py", known) == {"pkg"}


def test_the_import_graph_covers_the_package() -> None:
    graph = import_graph()
    assert {"asyncwsgi", "asyncwsgi.config", "asyncwsgi.contrib"} <= graph.keys()
    assert "asyncwsgi.config" in graph["asyncwsgi"]


def test_a_cycle_is_found(tmp_path: Path) -> None:
    """A module that imports, inside a function, one that imports it back is a cycle."""
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n")
    (tmp_path / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n"
    )
    known = {"pkg.a", "pkg.b"}
    graph = {name: imported_modules(name, tmp_path / f"{name[4:]}.py", known) for name in known}
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    with pytest.raises(graphlib.CycleError):
        tuple(graphlib.TopologicalSorter(graph).static_order())


def test_no_module_is_over_the_line_limit() -> None:
    paths = sorted((ROOT / PACKAGE).rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
    long = {
        str(path.relative_to(ROOT)): count
        for path in paths
        # Not what a run installs or leaves (benchmarks/.venv): only the project's own modules.
        if not any(part.startswith(".") for part in path.relative_to(ROOT).parts)
        and (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"

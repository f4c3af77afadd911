"""The repository is self-contained: tests, benchmarks and the package read nothing outside it,
and a test that needs an external program skips (or, under ``CI=true``, fails) when it is
missing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .helpers import require_program

ROOT = Path(__file__).resolve().parents[1]
CORPUS_NAME = "gunicorn-requests.json"
SCANNED = ("asyncwsgi", "tests", "benchmarks")
SUFFIXES = frozenset({".py", ".lua", ".toml", ".cfg", ".ini", ".sh", ".json", ".txt"})

#: Text that names a place outside the repository: a ``shared`` folder beside the checkout, an
#: absolute path into the machine's work area, a relative path that climbs out of the tree.
OUTSIDE = re.compile(
    r"""\.\./+shared|["']shared["']|/work/|(?:["'/]|^)(?:\.\./){2,}""",
    re.MULTILINE,
)
#: ``Path(__file__)....parents[N]``: checked against how deep the file is.
PARENTS = re.compile(r"__file__\)(?:\.resolve\(\)|\.absolute\(\))?\.parents\[(\d+)\]")


def scanned_files() -> list[Path]:
    this = Path(__file__).resolve()
    return [
        path
        for top in SCANNED
        for path in sorted((ROOT / top).rglob("*"))
        if path.suffix in SUFFIXES
        and path.is_file()
        and path.resolve() != this
        and ".venv" not in path.relative_to(ROOT).parts
        and "results" not in path.relative_to(ROOT).parts
    ]


def names_outside(line: str, depth: int) -> bool:
    """Whether ``line`` of a file ``depth`` folders below the root names a place outside."""
    return any(int(n) > depth for n in PARENTS.findall(line)) or bool(OUTSIDE.search(line))


def outside_references(path: Path) -> list[str]:
    """The references to places outside the repository in ``path``, as ``file:line: text``."""
    relative = path.relative_to(ROOT)
    depth = len(relative.parts) - 1  # Path(__file__).parents[depth] is the root
    text = path.read_text(encoding="utf-8", errors="replace")
    return [
        f"{relative}:{number}: {line.strip()}"
        for number, line in enumerate(text.splitlines(), 1)
        if names_outside(line, depth)
    ]


def test_nothing_reads_outside_the_repository() -> None:
    files = scanned_files()
    assert any(path.name == "test_corpus.py" for path in files)  # the scan sees the tests
    found = [reference for path in files for reference in outside_references(path)]
    assert not found, "paths outside the repository:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "line",
    [
        # Built from pieces, so that the repository itself holds no such path.
        "Path(__file__).resolve().parents[2] / " + '"sha' + 'red" / "corpus.json"',
        "open('../" + "shared/corpus/gunicorn-requests.json')",
        'CORPUS = "/work/shared/x.json"',
        'os.path.join(here, "../../data")',
    ],
)
def test_outside_references_are_recognised(line: str) -> None:
    assert names_outside(line, depth=1)  # a file in tests/


@pytest.mark.parametrize(
    "line",
    [
        'Path(__file__).resolve().parents[1] / "asyncwsgi"',  # the repository root, from tests/
        'Path(__file__).resolve().parent / "data" / "gunicorn-requests.json"',
        "shared = connection_environ(config)",
        'open("../README.md")',
    ],
)
def test_references_inside_are_not_flagged(line: str) -> None:
    assert not names_outside(line, depth=1)


def test_the_corpus_is_in_the_repository() -> None:
    from . import test_corpus, test_proxy

    assert test_corpus.CORPUS == test_proxy.CORPUS == ROOT / "tests" / "data" / CORPUS_NAME
    assert test_corpus.CORPUS.is_file()
    licence = (ROOT / "tests" / "data" / "LICENSE-gunicorn").read_text(encoding="utf-8")
    assert "Benoît Chesneau" in licence
    assert "Permission is hereby granted, free of charge" in licence


def test_require_program_finds_an_installed_program() -> None:
    assert Path(require_program("sh")).name == "sh"


def test_require_program_skips_without_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-program-x is not installed"):
        require_program("no-such-program-x")


def test_require_program_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-such-program-x is not installed"):
        require_program("no-such-program-x")


def test_the_slow_lists_name_tests_that_exist() -> None:
    from .conftest import SLOW_FILES, SLOW_TESTS

    for name in SLOW_FILES:
        assert (ROOT / "tests" / name).is_file(), name
    for entry in SLOW_TESTS:
        file, _, function = entry.partition("::")
        assert f"def {function}(" in (ROOT / "tests" / file).read_text(encoding="utf-8"), entry

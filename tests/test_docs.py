"""Tests of the documentation site (mkdocs.yml, docs/) and the guide scripts (examples/guides/).

* the site builds with ``mkdocs build --strict`` (a broken reference, snippet, link or anchor
  fails), and the rendered pages hold no raw reStructuredText, unrendered maths or unresolved
  cross-references;
* every public name of ``bual_losses.__all__`` (and of the public submodules' ``__all__``) has
  an entry in the API reference;
* every guide script runs a couple of steps (``--steps 2``) in a subprocess;
* the docstring examples of every public module (module attributes included) and the ``pycon``
  examples of the pages run as doctests;
* the package's docstrings are Markdown (no reStructuredText: the docs build converts nothing).
"""

from __future__ import annotations

import ast
import doctest
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import bual_losses

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GUIDES = sorted((ROOT / "examples" / "guides").glob("*.py"))

#: The modules the API reference renders (diagnostics and plotting are imported explicitly).
PUBLIC_MODULES = [
    "bual_losses.losses",
    "bual_losses.bidirectional",
    "bual_losses.modules",
    "bual_losses.fused",
    "bual_losses.engines",
    "bual_losses.uncertainty",
    "bual_losses.pseudo",
    "bual_losses.schedules",
    "bual_losses.regions",
    "bual_losses.distributed",
    "bual_losses.diagnostics",
    "bual_losses.plotting",
]

#: Extra arguments of a guide in the test (on top of ``--steps 2``).
GUIDE_ARGS = {
    "uncertainty_estimators.py": ["--repeats", "1", "--size", "32"],
    "ddp_amp.py": ["--world-size", "2", "--size", "16"],
    "monai_loop.py": ["--size", "16"],
}

DOCTEST_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    env["NO_MKDOCS_2_WARNING"] = "1"  # mkdocs-material's banner, not a build warning
    return env


# --------------------------------------------------------------------------------------------
# the site


def _build(out: Path) -> None:
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--clean",
           "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"


def _text(html: str) -> str:
    """Visible text of a page: scripts, code blocks and tags removed."""
    html = re.sub(r"<(script|style|pre|code)\b.*?</\1>", " ", html, flags=re.DOTALL)
    return re.sub(r"<[^>]+>", " ", html)


def _check_pages(site: Path) -> list[str]:
    """No reST leftovers, raw ``$$``, unresolved ``[x][y]`` references or doctest quotes."""
    problems = []
    pages = {p.relative_to(site).as_posix() for p in site.rglob("*.html")}
    expected = {"index.html", "quickstart.html", "method.html", "distributed.html",
                "diagnostics.html", "benchmarks.html", "migration.html", "api/index.html",
                "guides/ssl4mis.html", "guides/monai.html", "guides/ddp-amp.html",
                "guides/uncertainty.html"}  # fmt: skip
    problems += [f"{page}: missing" for page in sorted(expected - pages)]
    # maths is rendered by arithmatex (MathJax is only loaded by the browser)
    if 'class="arithmatex"' not in (site / "method.html").read_text(encoding="utf-8"):
        problems.append("method.html: no arithmatex maths")
    for page in sorted(site.rglob("*.html")):
        html = page.read_text(encoding="utf-8")
        text = _text(html)
        name = page.relative_to(site).as_posix()
        for pattern, what in [
            (r"\.\. math::", "raw reST math directive"),
            (r":(?:func|class|mod|meth|attr|data|math):`", "raw reST role"),
            (r"\$\$", "unrendered $$ block"),
            (r"\]\[[\w.]*\]", "unresolved cross-reference"),
            (r"--8<--", "unexpanded snippet"),
        ]:
            if re.search(pattern, text):
                problems.append(f"{name}: {what}")
        if "<!-- bual:" in html:
            problems.append(f"{name}: unexpanded docs marker")
        if re.search(r"<blockquote>\s*<blockquote>\s*<blockquote>", html):
            problems.append(f"{name}: doctest rendered as nested block quotes")
    return problems


def _public_names() -> list[tuple[str, str]]:
    """``(module, name)`` for each public module's ``__all__``."""
    names = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        names += [(module_name, n) for n in getattr(module, "__all__", [])]
    return names


def _check_api_reference(site: Path) -> list[str]:
    api = "\n".join(p.read_text(encoding="utf-8") for p in (site / "api").glob("*.html"))
    anchors = set(re.findall(r'id="(bual_losses\.[\w.]+)"', api))
    problems = [f"{m}.{n}: not in the API reference" for m, n in sorted(_public_names())
                if f"{m}.{n}" not in anchors]  # fmt: skip
    # every name of the package root, under the module that defines it
    leaves = {anchor.rsplit(".", 1)[-1] for anchor in anchors}
    problems += [f"bual_losses.{n}: no API entry" for n in bual_losses.__all__ if n not in leaves]
    return problems


def test_strict_build_and_api_reference(tmp_path: Path) -> None:
    """One build (the checks share it, whatever worker runs them): ``mkdocs build --strict``
    passes, the pages are clean, and every public name has its entry in the API reference."""
    _build(tmp_path / "site")
    problems = _check_pages(tmp_path / "site") + _check_api_reference(tmp_path / "site")
    assert not problems, "\n".join(problems)


def test_api_overview_lists_the_package_root() -> None:
    overview = (DOCS / "api" / "index.md").read_text(encoding="utf-8")
    missing = [n for n in bual_losses.__all__ if f"[`{n}`]" not in overview]
    assert not missing, f"docs/api/index.md does not list {missing}"


# --------------------------------------------------------------------------------------------
# guide scripts


def test_every_guide_is_documented() -> None:
    pages = "\n".join(p.read_text(encoding="utf-8") for p in DOCS.rglob("*.md"))
    undocumented = [g.name for g in GUIDES if f"examples/guides/{g.name}" not in pages]
    assert GUIDES and not undocumented, undocumented


@pytest.mark.parametrize("script", GUIDES, ids=[g.stem for g in GUIDES])
def test_guide_script_runs(script: Path) -> None:
    cmd = [sys.executable, str(script), "--steps", "2", *GUIDE_ARGS.get(script.name, [])]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip(), "a guide should print what it did"


# --------------------------------------------------------------------------------------------
# doctests


def _run(tests: list[doctest.DocTest]) -> str:
    runner = doctest.DocTestRunner(optionflags=DOCTEST_FLAGS)
    report: list[str] = []
    for test in tests:
        runner.run(test, out=report.append)
    return "".join(report) if runner.failures else ""


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_docstring_examples(module_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLBACKEND", "Agg")
    module = importlib.import_module(module_name)
    tests = [t for t in doctest.DocTestFinder().find(module) if t.examples]
    failures = _run(tests)
    assert not failures, failures


_PYCON = re.compile(r"^(?P<indent>[ \t]*)```pycon[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)
PAGES_WITH_EXAMPLES = sorted(p for p in DOCS.rglob("*.md") if "```pycon" in p.read_text("utf-8"))


@pytest.mark.parametrize(
    "page", PAGES_WITH_EXAMPLES, ids=[p.relative_to(DOCS).as_posix() for p in PAGES_WITH_EXAMPLES]
)
def test_page_examples(page: Path) -> None:
    """The ``pycon`` blocks of a page, in order, sharing one namespace."""
    text = page.read_text(encoding="utf-8")
    parser = doctest.DocTestParser()
    globs: dict[str, object] = {}
    tests = []
    for k, block in enumerate(_PYCON.finditer(text)):
        body = "\n".join(line[len(block["indent"]) :] for line in block["body"].splitlines())
        line = text[: block.start()].count("\n") + 1
        tests.append(parser.get_doctest(body, globs, f"{page.name}[{k}]", str(page), line))
    assert tests
    failures = _run(tests)
    assert not failures, failures


def _page_example_lines() -> str:
    lines = []
    for page in PAGES_WITH_EXAMPLES:
        for block in _PYCON.finditer(page.read_text(encoding="utf-8")):
            lines += [
                ln for ln in block["body"].splitlines() if ln.lstrip().startswith((">>>", "..."))
            ]
    return "\n".join(lines)


def test_every_public_name_has_an_example() -> None:
    """Each name of ``bual_losses.__all__`` is exercised by a doctest: in its docstring or in a
    ``pycon`` example of the pages (for the few objects whose docstring has none)."""
    finder = doctest.DocTestFinder(recurse=False)
    in_pages = _page_example_lines()
    missing = []
    for name in bual_losses.__all__:
        obj = getattr(bual_losses, name)
        try:
            own = any(t.examples for t in finder.find(obj, name, globs={}))
        except (TypeError, ValueError):  # not a function / class / module: no docstring
            own = False
        if not own and not re.search(rf"\b{re.escape(name)}\b", in_pages):
            missing.append(name)
    assert not missing, f"public names without a runnable example: {missing}"


# --------------------------------------------------------------------------------------------
# docstring conventions: Markdown, rendered as written (the docs build converts nothing)

_RST_IDIOMS = re.compile(
    r"^[ \t]*\.\. [\w-]+::"  # a directive such as ``.. math::``
    r"|:(?:py:)?(?:func|class|mod|meth|attr|data|obj|exc|math):`"  # a role
    r"|^[ \t]*#:"  # a Sphinx attribute comment, which griffe does not read
    r"|^[ \t]*Example:[ \t]*$",  # an admonition, not the ``Examples:`` section of doctests
    re.MULTILINE,
)


def test_docstrings_are_markdown() -> None:
    """No reStructuredText in the package: maths is ``$...$`` / ``$$``, references are
    ``[name][bual_losses.module.name]``, attributes are documented by a string right after the
    assignment, and doctests sit in ``Examples:`` sections (else they render as block quotes)."""
    problems = []
    for path in sorted((ROOT / "bual_losses").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for match in _RST_IDIOMS.finditer(text):
            line = text[: match.start()].count("\n") + 1
            problems.append(f"bual_losses/{path.name}:{line}: {match.group(0).strip()!r}")
    assert not problems, "reStructuredText idioms in docstrings:\n" + "\n".join(problems)


def _attribute_docstrings(module: Any) -> list[tuple[str, str, int]]:
    """``(name, docstring, line)`` of each module-level assignment followed by a string: the
    attribute docstrings griffe renders, which ``doctest`` does not collect."""
    body = ast.parse(Path(module.__file__).read_text(encoding="utf-8")).body
    found = []
    for stmt, after in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign):
            target: Any = stmt.target
        elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
        else:
            continue
        if (
            isinstance(target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            found.append((target.id, after.value.value, after.lineno))
    return found


def test_attribute_docstring_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    """The examples in the docstrings of module attributes (``SSL4MIS_DICE``, ...) run too."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    parser = doctest.DocTestParser()
    tests = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name, text, line in _attribute_docstrings(module):
            globs = dict(vars(module))
            test = parser.get_doctest(text, globs, f"{module_name}.{name}", module.__file__, line)
            tests += [test] if test.examples else []
    assert any(t.name == "bual_losses.losses.SSL4MIS_DICE" for t in tests)
    failures = _run(tests)
    assert not failures, failures


def test_sharp_edges_page_cites_tests_that_exist() -> None:
    """Each test the sharp-edges page names as proof exists, so the page cannot drift."""
    text = (DOCS / "sharp-edges.md").read_text(encoding="utf-8")
    cited = set(re.findall(r"`(?:tests/\w+\.py::)?(test_\w+)`", text))
    assert len(cited) >= 20
    defined = {
        m
        for path in Path(__file__).parent.glob("test_*.py")
        for m in re.findall(r"^def (test_\w+)\(", path.read_text(encoding="utf-8"), re.M)
    }
    assert cited <= defined, sorted(cited - defined)

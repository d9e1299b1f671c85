"""MkDocs hooks of the docs build: content that exists only once other parts of the repo exist.

The strict build must pass at every commit, while the benchmark results, the figures of the
real-MRI experiment and the diagnostics module arrive at different times. Pages therefore use
three HTML-comment markers that this hook expands in ``on_page_markdown``:

* ``<!-- bual:benchmark-results -->``: the committed result tables, every
  ``benchmarks/results/*.md`` except ``*-quick.md`` smoke runs, newest name first; a note when
  there is none yet;
* ``<!-- bual:figure src="assets/NAME.png" caption="..." -->``: the image (path relative to
  ``docs/``) with its caption when the file exists, else a note naming the file and how it is
  produced (``how="..."``);
* ``<!-- bual:api bual_losses.MODULE -->``: the mkdocstrings block ``::: bual_losses.MODULE``
  when ``bual_losses/MODULE.py`` exists, else a note.

Markers inside fenced code blocks are not expanded (the docs show them as examples).
"""

from __future__ import annotations

import html
import re
import shlex
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"

_MARKER = re.compile(r"^<!-- bual:(?P<kind>[a-z-]+)(?P<args>[^\n]*?)-->[ \t]*$", re.MULTILINE)
_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)


def _note(kind: str, title: str, text: str) -> str:
    body = "\n".join(f"    {line}" if line else "" for line in text.splitlines())
    return f'!!! {kind} "{title}"\n\n{body}\n'


def _benchmark_results() -> str:
    files = sorted(
        (p for p in RESULTS.glob("*.md") if not p.name.endswith("-quick.md")),
        key=lambda p: p.name,
        reverse=True,
    )
    if not files:
        return _note(
            "info",
            "No committed results yet",
            "Run `python benchmarks/bench_losses.py` and commit the Markdown file it writes "
            "to `benchmarks/results/`;\nit appears here on the next build.",
        )
    parts = []
    for path in files:
        text = path.read_text(encoding="utf-8").strip()
        # a leading HTML comment (provenance notes added by hand) is shown, not hidden
        notes = []
        while text.startswith("<!--") and "-->" in text:
            comment, text = text[4:].split("-->", 1)
            notes.append(comment.strip())
            text = text.strip()
        # the file's own headings go below this page's "## Results": "#" -> "###", ...
        text = re.sub(r"^(#{1,4}) ", lambda m: "#" * (len(m.group(1)) + 2) + " ", text,
                      flags=re.MULTILINE)  # fmt: skip
        if notes:
            # after the file's title line, before its body
            title, _, body = text.partition("\n")
            note = _note("info", "Provenance", "\n\n".join(notes))
            text = f"{title}\n\n{note}\n{body}" if title.startswith("#") else f"{note}\n{text}"
        parts.append(f"{text.strip()}\n\n_Source: `benchmarks/results/{path.name}`._\n")
    return "\n".join(parts)


def _args(raw: str) -> dict[str, str]:
    out = {}
    for token in shlex.split(raw):
        key, _, value = token.partition("=")
        out[key] = value
    return out


def _figure(raw: str, page_src: str) -> str:
    args = _args(raw)
    src, caption = args.get("src", ""), args.get("caption", "")
    how = args.get("how", "the real-MRI experiment")
    docs = ROOT / "docs"
    target = (docs / Path(page_src).parent / src).resolve()
    if target.is_file():
        alt = html.escape(caption or Path(src).stem, quote=True)
        return (
            f'<figure markdown="span">\n  ![{alt}]({src})\n'
            f"  <figcaption>{caption}</figcaption>\n</figure>\n"
        )
    rel = target.relative_to(ROOT) if target.is_relative_to(ROOT) else target
    return _note(
        "note",
        "Figure not generated yet",
        f"{caption}\n\nExpected at `{rel}`, produced by {how}.",
    )


def _api(raw: str) -> str:
    module = raw.strip()
    parts = module.split(".")
    source = ROOT.joinpath(*parts).with_suffix(".py")
    if source.is_file() or (ROOT.joinpath(*parts) / "__init__.py").is_file():
        return f"::: {module}\n"
    return _note(
        "note",
        f"`{module}` is not available yet",
        f"Its reference appears here once `{source.relative_to(ROOT)}` exists.",
    )


def expand(markdown: str, page_src: str) -> str:
    """Expand the markers of one page (``page_src`` relative to ``docs/``)."""
    fences = [(m.start(), m.end()) for m in _FENCE.finditer(markdown)]

    def replace(match: re.Match[str]) -> str:
        if any(a <= match.start() < b for a, b in fences):
            return match.group(0)
        kind, raw = match.group("kind"), match.group("args")
        if kind == "benchmark-results":
            return _benchmark_results()
        if kind == "figure":
            return _figure(raw, page_src)
        if kind == "api":
            return _api(raw)
        raise ValueError(f"{page_src}: unknown docs marker bual:{kind}")

    return _MARKER.sub(replace, markdown)


def on_page_markdown(markdown: str, *, page: Any, **kwargs: Any) -> str:
    return expand(markdown, page.file.src_uri)


def on_serve(server: Any, **kwargs: Any) -> Any:
    server.watch(str(RESULTS))
    server.watch(str(ROOT / "bual_losses"))
    return server

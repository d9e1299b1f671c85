"""Griffe extension of the docs build: a few reStructuredText idioms rendered as Markdown.

Some docstrings of the package (losses, fused, bidirectional, distributed, modules) use Sphinx
habits; the docs are Markdown. Instead of rewriting the sources, the docstrings are converted
when griffe loads them (the package is not changed):

* ``.. math::`` blocks become ``$$ ... $$`` blocks (one per blank-line separated equation), which
  ``pymdownx.arithmatex`` renders;
* ``:math:`x``` becomes ``$x$``;
* ``:func:`` / ``:class:`` / ``:mod:`` / ``:data:`` / ``:meth:`` / ``:attr:`` roles become
  autorefs cross-references when the target is rendered in the API reference (a public object),
  else inline code, so the strict build never meets a dangling reference;
* a module attribute without a docstring gets the text of its ``#:`` comment lines (the Sphinx
  convention used for ``SSL4MIS_DICE``, ``Schedule``, ``CHUNK_ELEMENTS``, ...).
"""

from __future__ import annotations

import ast
import re
from typing import Any, Optional

from griffe import Alias, Attribute, Docstring, Extension, Module, Object, ObjectNode

_MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*$")
_MATH_ROLE = re.compile(r":math:`(?P<body>[^`]+)`")
_XREF_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|data|meth|attr|obj|exc):`(?P<target>[^`]+)`")


def convert_math_blocks(text: str) -> str:
    """``.. math::`` directives (with their indented body) to ``$$`` blocks."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _MATH_DIRECTIVE.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        indent = match.group("indent")
        body: list[str] = []
        i += 1
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
        ):
            body.append(lines[i])
            i += 1
        # a blank line of the body that really ends it belongs to the text after it
        trailing = 0
        while body and not body[-1].strip():
            body.pop()
            trailing += 1
        nonblank = [line for line in body if line.strip()]
        margin = min((len(line) - len(line.lstrip()) for line in nonblank), default=0)
        equations: list[list[str]] = [[]]
        for line in body:
            if line.strip():
                equations[-1].append(line[margin:].rstrip())
            elif equations[-1]:
                equations.append([])
        for k, equation in enumerate(eq for eq in equations if eq):
            if k:
                out.append("")
            out.append(f"{indent}$$")
            out.extend(f"{indent}{line}" for line in equation)
            out.append(f"{indent}$$")
        out.extend([""] * trailing)
    return "\n".join(out)


_LIST_ITEM = re.compile(r"^(?P<indent>[ \t]*)(?P<marker>(?:\d+[.)]|[*+-])[ \t]+)\S")


def widen_lists(text: str) -> str:
    """Indent the continuation of list items to 4 columns, as Python-Markdown needs.

    reST (and CommonMark) accept continuation lines aligned with the item text (2 columns after
    ``* ``, 3 after ``1. ``); Python-Markdown needs 4, otherwise a nested block such as an
    equation leaves the list. An item that holds several blocks is also separated from the next
    item by a blank line, so the next marker does not read as a lazy continuation.
    """
    out: list[str] = []
    item_indent: Optional[int] = None
    width = 0
    blocks = False
    for line in text.splitlines():
        match = _LIST_ITEM.match(line)
        if match is not None and (item_indent is None or len(match.group("indent")) <= item_indent):
            if item_indent is not None and blocks and out and out[-1].strip():
                out.append("")
            item_indent = len(match.group("indent"))
            width = len(match.group("marker"))
            blocks = False
        elif item_indent is not None and not line.strip():
            blocks = True
        elif item_indent is not None:
            indent = len(line) - len(line.lstrip())
            if indent <= item_indent:
                item_indent = None
            elif width < 4 and indent >= item_indent + width:
                line = " " * (4 - width) + line
        out.append(line)
    return "\n".join(out)


def fence_doctests(text: str) -> str:
    """Wrap each doctest block (``>>>`` up to the next blank line) in a ``pycon`` fence.

    Griffe only turns doctests into code inside an ``Examples:`` section; under the singular
    ``Example:`` heading used by the package they would render as nested block quotes.
    """
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        stripped = lines[i].lstrip()
        if not stripped.startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        indent = lines[i][: len(lines[i]) - len(stripped)]
        out.append(f"{indent}```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append(f"{indent}```")
    return "\n".join(out)


def _rendered(obj: Any) -> bool:
    """Whether the API reference renders ``obj``: it and all its parents are public."""
    while obj is not None and not (isinstance(obj, Module) and obj.parent is None):
        if obj.name.startswith("_") and not (obj.name.startswith("__") and obj.name.endswith("__")):
            return False
        if not obj.is_public:
            return False
        obj = obj.parent
    return True


def _lookup(root: Module, path: str) -> Optional[Object]:
    """The object at the dotted ``path`` (aliases followed), or None."""
    if path != root.path and not path.startswith(root.path + "."):
        return None
    obj: Any = root
    for part in path.split(".")[1:]:
        try:
            obj = obj.members[part]
        except (KeyError, AttributeError):
            return None
        seen = 0
        while isinstance(obj, Alias):
            obj = _lookup(root, obj.target_path)
            seen += 1
            if obj is None or seen > 10:
                return None
    return obj


def _resolve(root: Module, owner: Object, name: str) -> Optional[Object]:
    """Resolve a role target as Sphinx would: in the owner's scopes first, then absolutely."""
    scopes = []
    scope: Any = owner
    while scope is not None:
        scopes.append(scope.path)
        scope = scope.parent
    for prefix in scopes:
        found = _lookup(root, f"{prefix}.{name}")
        if found is not None:
            return found
    return _lookup(root, name)


def convert_roles(text: str, root: Module, owner: Object) -> str:
    """Inline maths and cross-reference roles to Markdown."""
    text = _MATH_ROLE.sub(lambda m: f"${m.group('body').strip()}$", text)

    def xref(match: re.Match[str]) -> str:
        target = match.group("target").strip()
        explicit = re.fullmatch(r"(?P<label>.+?)\s*<(?P<path>[^>]+)>", target)
        if explicit:
            label, path = explicit.group("label"), explicit.group("path")
        else:
            path = target.lstrip("~.")
            label = path.rsplit(".", 1)[-1] if target.startswith("~") else path
        obj = _resolve(root, owner, path)
        if obj is None or not _rendered(obj):
            return f"`{label}`"
        return f"[`{label}`][{obj.path}]"

    return _XREF_ROLE.sub(xref, text)


def _comment_docstring(attr: Attribute) -> Optional[str]:
    """Text of the ``#:`` comment lines right above the attribute's assignment."""
    if attr.lineno is None:
        return None
    try:
        lines = attr.lines_collection[attr.filepath]  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return None
    comment: list[str] = []
    index = attr.lineno - 2
    while index >= 0 and lines[index].strip().startswith("#:"):
        comment.insert(0, lines[index].strip()[2:].strip())
        index -= 1
    return " ".join(comment) if comment else None


class RstToMarkdown(Extension):
    """Rewrite the docstrings of a loaded package (see the module docstring)."""

    def on_attribute_instance(
        self,
        *,
        node: ast.AST | ObjectNode,
        attr: Attribute,
        agent: Any,
        **kwargs: Any,
    ) -> None:
        if attr.docstring is None and isinstance(attr.parent, Module):
            text = _comment_docstring(attr)
            if text:
                attr.docstring = Docstring(text, lineno=attr.lineno, parent=attr)

    def on_package(self, *, pkg: Module, **kwargs: Any) -> None:
        self._walk(pkg, pkg)

    def _walk(self, root: Module, obj: Object) -> None:
        if obj.docstring is not None:
            value = obj.docstring.value
            new = fence_doctests(convert_roles(widen_lists(convert_math_blocks(value)), root, obj))
            if new != value:
                obj.docstring.value = new
        for member in obj.members.values():
            if isinstance(member, Alias) or member.parent is not obj:
                continue
            self._walk(root, member)

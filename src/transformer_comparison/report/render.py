"""The report's building blocks, rendered as Markdown and as one self-contained HTML page (Jinja2).

    blocks = [Heading("Ranking"), Para("Sorted by ..."), Table(headers, rows, best={(0, 3)}), Image(...)]
    markdown, page = render(title, blocks)

Text may hold `code` and **bold** spans; the templates (templates/report.md.j2, report.html.j2)
escape everything else. Images are PNG bytes: report.md links plots/<file>, report.html embeds them
as base64 data, so the page needs nothing beside it.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup, escape


@dataclass
class Heading:
    text: str
    level: int = 2
    kind: str = "heading"


@dataclass
class Para:
    text: str  # `code` and **bold** spans allowed
    note: bool = False  # a highlighted note (smoke scale, caveats)
    kind: str = "para"


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    best: set[tuple[int, int]] = field(default_factory=set)  # (row, column) cells to mark
    kind: str = "table"


@dataclass
class Image:
    filename: str  # under DIR/plots/ (or ../bench/ for a benchmark's own plot)
    caption: str
    png: bytes
    kind: str = "image"

    @property
    def data(self) -> str:
        return base64.b64encode(self.png).decode("ascii")


@dataclass
class Code:
    text: str
    language: str = ""
    kind: str = "code"


Block = Heading | Para | Table | Image | Code
WRAP_AT = 60  # table cells longer than this wrap in HTML


def md_inline(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def html_inline(text: str) -> Markup:
    escaped = str(escape(text))
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return Markup(re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped))


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("transformer_comparison.report", "templates"),
                      autoescape=select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["md_inline"] = md_inline
    env.filters["html_inline"] = html_inline
    env.globals["WRAP_AT"] = WRAP_AT
    return env


def render(title: str, blocks: list[Block]) -> tuple[str, str]:
    """(report.md, report.html) of the blocks."""
    env = _environment()
    markdown = env.get_template("report.md.j2").render(title=title, blocks=blocks)
    page = env.get_template("report.html.j2").render(title=title, blocks=blocks)
    return markdown, page

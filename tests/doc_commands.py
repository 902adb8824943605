"""Extract the shell commands the documentation shows: README.md and docs/*.md (```bash blocks and
inline `code` that starts with a program and has arguments), the usage comments of scripts/*.sh,
scripts/*.sbatch and configs/**/*.yaml, and the indented example lines of Python module docstrings
(llmstack/, scripts/).

A command written with an abbreviation (`...`, `<name>`, an upper-case placeholder such as DIR or
`8|4` alternatives) is a synopsis, not something to run: `DocCommand.synopsis` says so, and the
docs test reports how many it saw.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

# a command starts with one of these (after optional VAR=value assignments)
PROGRAMS = ("llmstack", "python", "torchrun", "deepspeed", "make", "sbatch", "wandb", "scripts/", ".venv/bin/", "pip")
_ASSIGN = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")
_FENCE = re.compile(r"^\s*```(\w*)\s*$")
_INLINE = re.compile(r"`([^`\n]+)`")
_SHELL_LANGS = {"bash", "sh", "shell", "console"}


@dataclass
class DocCommand:
    text: str
    where: list[str] = field(default_factory=list)  # "file:line" of every place that shows it
    expect_error: str | None = None  # the doc shows it failing: "llmstack: error: ..."

    @property
    def argv(self) -> list[str]:
        import shlex
        return shlex.split(self.text)

    @property
    def synopsis(self) -> bool:
        if "..." in self.text or re.search(r"<[\w-]+>", self.text):
            return True
        for tok in self.argv:
            if re.fullmatch(r"[A-Z][A-Z_]+", tok) or re.fullmatch(r"[\w.-]+\|[\w.|-]+", tok):
                return True
        return False


def _program_line(text: str, *, needs_args: bool) -> bool:
    words = text.split()
    while words and _ASSIGN.match(words[0]):
        words = words[1:]
    # in prose `llmstack generate` names a command; an example has arguments after the subcommand
    min_words = (3 if words[:1] == ["llmstack"] else 2) if needs_args else 1
    return bool(words) and words[0].startswith(PROGRAMS) and len(words) >= min_words


def _split_comment(line: str) -> tuple[str, str]:
    """(command, trailing comment): a '#' after whitespace, outside quotes, starts a comment."""
    quote = None
    for i, ch in enumerate(line):
        if ch in "'\"" and (quote is None or quote == ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def _clean(text: str) -> str:
    """Drop optional `[...]` groups of usage syntax (`[--flag]`, `[a b ...]`) and a trailing (parenthetical)."""
    text = re.sub(r"\s\[(?:-[^\]]*|[^\]]*\s[^\]]*)\]", "", text)
    text = re.sub(r"\s{2,}\(.*\)\s*$", "", text)
    return " ".join(text.split())


def _add(found: dict, text: str, where: str, comment: str = "", *, inline: bool = False) -> None:
    """Record a command; an inline `span` in prose counts only with arguments (`scripts/x.sh` alone
    names a file)."""
    text = _clean(text)
    if not _program_line(text, needs_args=inline):
        return
    cmd = found.setdefault(text, DocCommand(text))
    cmd.where.append(where)
    if comment.startswith("llmstack: error"):
        cmd.expect_error = comment.split("...")[0].strip()


def _join_continuations(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for n, line in lines:
        if pending is not None:
            pending = (pending[0], pending[1] + " " + line.strip())
        else:
            pending = (n, line)
        if pending[1].rstrip().endswith("\\"):
            pending = (pending[0], pending[1].rstrip()[:-1])
            continue
        out.append(pending)
        pending = None
    if pending is not None:
        out.append(pending)
    return out


def from_markdown(path: Path, root: Path, found: dict) -> None:
    rel = path.relative_to(root).as_posix()
    lang, block, para = None, [], []

    def prose_done():
        if para:  # inline spans may wrap across lines: one paragraph at a time
            for span in _INLINE.findall(" ".join(text for _, text in para)):
                _add(found, span, f"{rel}:{para[0][0]}", inline=True)
            para.clear()

    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = _FENCE.match(line)
        if m and lang is None:
            prose_done()
            lang, block = m.group(1).lower(), []
        elif m:
            if lang in _SHELL_LANGS:
                for start, text in _join_continuations(block):
                    cmd, comment = _split_comment(text.strip())
                    if cmd:
                        _add(found, cmd, f"{rel}:{start}", comment)
            lang = None
        elif lang is not None:
            block.append((n, line))
        elif line.lstrip().startswith("|"):  # a table row: its spans name commands, a table shows no examples
            prose_done()
        elif line.strip():
            para.append((n, line.strip()))
        else:
            prose_done()
    prose_done()


def from_comments(path: Path, root: Path, found: dict) -> None:
    """Usage lines in the comments of a shell script or YAML file: `#   cmd args  # note`."""
    rel = path.relative_to(root).as_posix()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = re.match(r"^\s*#(?![!A-Z])\s*(?:[\w -]{1,20}:\s+)?(.*)$", line)
        if m:
            cmd, comment = _split_comment(m.group(1))
            _add(found, cmd, f"{rel}:{n}", comment)


def from_docstring(path: Path, root: Path, found: dict) -> None:
    """Indented example lines of a Python module docstring (synopses in prose are left alone)."""
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
    rel = path.relative_to(root).as_posix()
    for n, line in enumerate(doc.splitlines(), 1):
        if line.startswith("    "):
            cmd, comment = _split_comment(line.strip())
            _add(found, cmd, f"{rel}:docstring+{n}", comment)


def extract(root: Path) -> list[DocCommand]:
    found: dict[str, DocCommand] = {}
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        from_markdown(path, root, found)
    for path in sorted([*(root / "scripts").glob("*.sh"), *(root / "scripts").glob("*.sbatch"),
                        *(root / "configs").rglob("*.yaml")]):
        from_comments(path, root, found)
    for path in sorted([*(root / "llmstack").rglob("*.py"), *(root / "scripts").glob("*.py")]):
        from_docstring(path, root, found)
    return list(found.values())

"""A Dockerfile subset: the image-definition format of images/<name>/Dockerfile.

Supported: FROM <ref> | FROM scratch, RUN, COPY [--chmod=MODE] <src>... <dest>, ENV, ARG,
WORKDIR, USER, CMD, ENTRYPOINT, LABEL, with `\\` line continuations, `#` comments, and shell or
JSON (exec) forms for RUN/CMD/ENTRYPOINT. One sbx extension starts an image from Debian
packages:

    FROM scratch
    DEBIAN bookworm python3,dash      # mmdebstrap --variant=extract, the tar is the base layer

`${NAME}` / `$NAME` refer to ARG values and earlier ENV values (Docker's rules, minus the
`${NAME:-default}` modifiers). Parsing is pure: this module reads text and returns Structs.
"""

from __future__ import annotations

import json
import re

import msgspec

from sandbox.errors import InvalidSpec

KEYWORDS = ("FROM", "RUN", "COPY", "ENV", "ARG", "WORKDIR", "USER", "CMD", "ENTRYPOINT",
            "LABEL", "DEBIAN")
LAYER_KEYWORDS = ("RUN", "COPY", "DEBIAN")
"""Instructions that add a filesystem layer; the others change only the image config."""

_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_FLAG = re.compile(r"^--([a-z-]+)=(\S+)$")


class Instruction(msgspec.Struct, frozen=True):
    """One instruction. `exec_form` holds the JSON array form when one was written."""

    keyword: str
    args: str
    line: int
    flags: tuple[tuple[str, str], ...] = ()
    exec_form: tuple[str, ...] | None = None

    @property
    def text(self) -> str:
        """Canonical text (used in cache keys and image history)."""
        flags = "".join(f"--{k}={v} " for k, v in self.flags)
        body = json.dumps(list(self.exec_form)) if self.exec_form is not None else self.args
        return f"{self.keyword} {flags}{body}".strip()


def _logical_lines(text: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    buf, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped, as Docker does
        if not buf:
            start = number
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        buf += raw
        out.append((start, buf.strip()))
        buf = ""
    if buf.strip():
        out.append((start, buf.strip()))
    return out


def _json_array(args: str, line: int) -> tuple[str, ...] | None:
    if not args.startswith("["):
        return None
    try:
        value = json.loads(args)
    except ValueError:
        return None  # Docker treats a malformed array as shell form
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not value:
        raise InvalidSpec(f"line {line}: exec form must be a non-empty JSON array of strings",
                          field="Dockerfile")
    return tuple(value)


def parse(text: str) -> list[Instruction]:
    """Parse a Dockerfile; raise InvalidSpec naming the line for anything unsupported."""
    out: list[Instruction] = []
    for line, logical in _logical_lines(text):
        keyword, _, args = logical.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword not in KEYWORDS:
            raise InvalidSpec(f"line {line}: unsupported instruction {keyword}", field="Dockerfile")
        flags: list[tuple[str, str]] = []
        if keyword == "COPY":
            while args.startswith("--"):
                token, _, args = args.partition(" ")
                m = _FLAG.match(token)
                if not m or m.group(1) != "chmod" or not re.fullmatch(r"[0-7]{3,4}", m.group(2)):
                    raise InvalidSpec(f"line {line}: unsupported COPY flag {token}",
                                      field="Dockerfile")
                flags.append((m.group(1), m.group(2)))
                args = args.strip()
        exec_form = _json_array(args, line) if keyword in ("RUN", "CMD", "ENTRYPOINT") else None
        if not args:
            raise InvalidSpec(f"line {line}: {keyword} needs arguments", field="Dockerfile")
        out.append(Instruction(keyword, args, line, tuple(flags), exec_form))
    if not out or out[0].keyword not in ("FROM", "ARG"):
        raise InvalidSpec("a Dockerfile starts with FROM (ARGs may come before it)",
                          field="Dockerfile")
    froms = [i for i in out if i.keyword == "FROM"]
    if len(froms) != 1:
        raise InvalidSpec("exactly one FROM is supported (no multi-stage builds)",
                          field="Dockerfile")
    for prev, ins in zip(out, out[1:]):
        if ins.keyword == "DEBIAN" and not (prev.keyword == "FROM" and prev.args == "scratch"):
            raise InvalidSpec(f"line {ins.line}: DEBIAN must directly follow FROM scratch",
                              field="Dockerfile")
    return out


def substitute(text: str, variables: dict[str, str]) -> str:
    """Expand $NAME and ${NAME}; unknown names become empty, as in Docker."""
    return _VAR.sub(lambda m: variables.get(m.group(1) or m.group(2), ""), text)


def split_words(text: str, line: int) -> list[str]:
    """Split COPY/ARG arguments on whitespace, honouring a JSON array form."""
    if text.startswith("["):
        arr = _json_array(text, line)
        if arr is not None:
            return list(arr)
    return text.split()


def parse_env(args: str, line: int) -> list[tuple[str, str]]:
    """`ENV A=1 B="two words"` or the legacy `ENV A value with spaces`."""
    import shlex
    first = args.split(None, 1)
    if first and "=" not in first[0]:
        if len(first) < 2:
            raise InvalidSpec(f"line {line}: ENV {first[0]} needs a value", field="Dockerfile")
        return [(first[0], first[1])]
    pairs = []
    try:
        words = shlex.split(args, posix=True)
    except ValueError as exc:
        raise InvalidSpec(f"line {line}: {exc}", field="Dockerfile") from None
    for word in words:
        key, eq, value = word.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise InvalidSpec(f"line {line}: bad ENV/ARG/LABEL item {word!r}", field="Dockerfile")
        pairs.append((key, value))
    return pairs

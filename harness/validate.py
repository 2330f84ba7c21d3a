"""One validation layer for every verb's command line: argparse `type=` helpers.

Each helper turns a string into a checked value or raises `argparse.ArgumentTypeError` with a
short reason; the CLI's parser prints it as one line naming the argument, and exits with code 2
(`harness.cli`). Numbers are finite and in range, names are known, files are what they claim to
be (a text file, not a folder, not binary; a folder, not a file).

    parser.add_argument("--gpu-memory-utilization", type=finite_float(min=0, max=1, min_open=True))
    parser.add_argument("--max-num-seqs", type=positive_int)
    parser.add_argument("--dtype", type=choice_of(["auto", "float16", "bfloat16"], "dtype"))
    parser.add_argument("file", type=text_file)
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

_SNIFF_BYTES = 8192


def finite_float(
    min: float | None = None, max: float | None = None, *, min_open: bool = False, max_open: bool = False
) -> Callable[[str], float]:
    """A finite number within [min, max] (`min_open`/`max_open`: the bound itself is excluded)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if min is not None and (value < min or (min_open and value == min)):
            raise argparse.ArgumentTypeError(f"{text} is too small: must be {'>' if min_open else '>='} {min:g}")
        if max is not None and (value > max or (max_open and value == max)):
            raise argparse.ArgumentTypeError(f"{text} is too large: must be {'<' if max_open else '<='} {max:g}")
        return value

    parse.__name__ = "number"  # argparse names the type in its own messages
    return parse


def int_in(min: int | None = None, max: int | None = None) -> Callable[[str], int]:
    """A whole number within [min, max]."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if min is not None and value < min:
            raise argparse.ArgumentTypeError(f"{text} is too small: must be >= {min}")
        if max is not None and value > max:
            raise argparse.ArgumentTypeError(f"{text} is too large: must be <= {max}")
        return value

    parse.__name__ = "whole number"
    return parse


positive_int = int_in(min=1)


def choice_of(names: Iterable[str], what: str = "value") -> Callable[[str], str]:
    """One of `names` (exact); the error lists them."""
    known = list(names)

    def parse(text: str) -> str:
        if text not in known:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; known: {', '.join(known)}")
        return text

    parse.__name__ = what
    return parse


def is_binary(head: bytes) -> bool:
    """Does this start of a file look like binary data rather than text (logs, YAML, JSON)?"""
    if b"\0" in head:
        return True
    text = head.decode("utf-8", errors="replace")
    odd = sum(1 for c in text if c == "\ufffd" or (ord(c) < 32 and c not in "\t\n\r\x0c\x1b"))
    return odd > max(2, len(text) // 20)


def text_file(text: str) -> Path:
    """An existing, non-empty text file."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"{text}: no such file") from None
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text}: cannot read it ({exc.strerror})") from None
    if not head:
        raise argparse.ArgumentTypeError(f"{text} is empty")
    if is_binary(head):
        raise argparse.ArgumentTypeError(f"{text} is binary data, not a text file")
    return path


def folder(text: str) -> Path:
    """An existing folder."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return path


def out_folder(text: str) -> Path:
    """A folder to write into: it may not exist yet, but must not be a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty folder name")
    return path


def out_file(text: str) -> Path:
    """A file to write: it may not exist yet, but must not be a folder."""
    path = Path(text)
    if not text.strip() or text.endswith(os.sep) or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    return path

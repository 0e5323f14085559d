"""Text that did not come from UTF-8: arguments, environment variables, JSON escapes.

Python decodes command-line arguments and environment variables that are not UTF-8
with surrogate escapes (byte 0xff becomes ``'\\udcff'``), and JSON may spell a lone
surrogate (``"\\ud800"``). Neither can be written to MongoDB, Chroma or a UTF-8
terminal; syncd refuses such text where it comes in, naming it readably.
"""

from __future__ import annotations


def is_text(value: str) -> bool:
    """Whether ``value`` is encodable as UTF-8 (no lone or escaped surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(value: str) -> str:
    """``value`` quoted for a message, the bytes that are not UTF-8 as ``\\xff``."""
    try:
        raw = value.encode("utf-8", "surrogateescape")  # what the user typed
    except UnicodeEncodeError:  # a lone surrogate, not an escaped byte
        return ascii(value)
    return "'" + raw.decode("utf-8", "backslashreplace") + "'"

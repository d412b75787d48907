"""Reading the text files users hand us (configs, dataset TOML, captions) whatever Windows editor wrote them.

Windows PowerShell 5 writes UTF-16 with a byte-order mark by default (`>`, `Out-File`), Notepad writes UTF-8
with one; both must read like plain UTF-8. One helper, used for every JSON, TOML and caption file we read.
"""

from __future__ import annotations

import codecs
from pathlib import Path

# Longest first: the UTF-32 LE mark begins with the UTF-16 LE one.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def encoding_of(data: bytes) -> str:
    """The encoding its byte-order mark names; UTF-16 LE for mark-less text with a NUL after each ASCII byte;
    else UTF-8."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return encoding
    if len(data) >= 2 and len(data) % 2 == 0 and data[1::2].count(0) > len(data) // 4 and 0 not in data[::2]:
        return "utf-16-le"
    return "utf-8"


def decode_text(data: bytes) -> str:
    """`data` decoded by `encoding_of`; raises UnicodeDecodeError when it is not valid in that encoding."""
    return data.decode(encoding_of(data))


def read_text(path: str | Path) -> str:
    """The text of `path` (any of the encodings above); OSError / UnicodeDecodeError as open() would raise."""
    return decode_text(Path(path).read_bytes())

"""SHA-256 checksums of an export's files, in a `SHA256SUMS` file beside them.

The format is `sha256sum`'s ("<64 hex digits>  <file name>" per line), so a copy can also be
checked by hand: `cd <export folder> && sha256sum -c SHA256SUMS`. `cascade train` writes it into
every export (cascade/train.py `export`), and `load_export` (cascade/stages/common.py) verifies it when
it is there: a weights file changed or half-copied since its export is a one-line error naming
the file, never a model that samples noise. An export from before checksums has no SHA256SUMS and
loads as it did.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

CHECKSUMS = "SHA256SUMS"
_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")   # text (two spaces) or binary (" *") mode


class ChecksumError(ValueError):
    """An export file that is not the one its export wrote (changed, half-copied, missing); one line."""


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """The SHA-256 of a file's bytes, as hex, read in chunks (no whole-file copy in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_checksums(folder: str | Path, names: list[str] | None = None) -> Path:
    """folder/SHA256SUMS for the files `names` (default: every plain, not hidden file in the
    folder), sorted; written under a temporary name and renamed, so it is whole or absent."""
    folder = Path(folder)
    if names is None:
        names = [p.name for p in folder.iterdir()
                 if p.is_file() and not p.name.startswith(".") and p.name != CHECKSUMS]
    lines = [f"{file_sha256(folder / n)}  {n}\n" for n in sorted(names)]
    tmp = folder / f".{CHECKSUMS}.tmp"
    tmp.write_text("".join(lines))
    tmp.replace(folder / CHECKSUMS)
    return folder / CHECKSUMS


def verify_checksums(folder: str | Path) -> bool:
    """Check every file folder/SHA256SUMS lists against its recorded SHA-256: True when all
    match, False when the folder has no SHA256SUMS (an older export), else a ChecksumError
    naming the first file that is missing or differs."""
    folder = Path(folder)
    sums = folder / CHECKSUMS
    if not sums.is_file():
        return False
    try:
        text = sums.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ChecksumError(f"{sums}: cannot be read ({e}); export or download it again") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.fullmatch(line)
        if m is None or os.path.basename(m[2]) != m[2] or m[2] in (".", ".."):
            raise ChecksumError(f"{sums}:{lineno}: not a '<sha256>  <file name>' line of a file "
                                f"in the folder; export or download it again")
        path = folder / m[2]
        if not path.is_file():
            raise ChecksumError(f"{path}: listed in {sums} but missing: the export is incomplete; "
                                f"export or download it again")
        if file_sha256(path) != m[1].lower():
            raise ChecksumError(f"{path}: checksum does not match {CHECKSUMS}: the file was "
                                f"changed or half-copied; export or download it again")
    return True

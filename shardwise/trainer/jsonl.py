"""metrics.jsonl written one whole line at a time, surviving a full disk.

Each record is encoded first and written with one unbuffered write, so a reader (or a crash) never sees
half a record from buffering. When the write fails or comes up short (ENOSPC, EDQUOT, EIO), the file is cut
back to its length before the record, the record is dropped, a warning is logged once, and training goes
on: losing a few metric lines is better than losing the run over them. Writes resume by themselves when
space comes back.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, BinaryIO, Optional

log = logging.getLogger("shardwise")


class JsonlWriter:
    """Appends JSON records to `path` as whole lines (or to an already open binary file object `file`)."""

    def __init__(self, path: Path, file: Optional[BinaryIO] = None):
        self.path = Path(path)
        self._f = file if file is not None else open(self.path, "ab", buffering=0)
        try:
            self._size = os.fstat(self._f.fileno()).st_size
        except (OSError, AttributeError, ValueError):
            self._size = 0
        self.dropped = 0
        self._warned = False

    def write(self, record: dict[str, Any]) -> bool:
        """True when the line was written; False when it was dropped (warned about once)."""
        line = (json.dumps(record) + "\n").encode()
        try:
            written = self._f.write(line)
            if written is not None and written != len(line):
                raise OSError(f"short write ({written} of {len(line)} bytes)")
            self._size += len(line)
            return True
        except OSError as e:
            self._drop(e)
            return False

    def _drop(self, err: OSError) -> None:
        self.dropped += 1
        try:
            self._f.truncate(self._size)  # no half line stays behind
        except OSError:
            pass
        if not self._warned:
            self._warned = True
            log.warning("cannot write %s (%s): metric lines are dropped until it works again; training "
                        "continues. Free space on that file system.", self.path, getattr(err, "strerror", None) or err)

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass

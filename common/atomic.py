"""Atomic file writes: a reader sees either the old file or the complete new one, never a half-written one.

`atomic_write` writes into a temporary file in the target's folder (same file system, so the rename is
atomic) and `os.replace`s it onto the target; a failed write leaves the target untouched and removes the
temporary file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _current_umask() -> int:
    # os.umask can only be read by setting it; done once at import, not per write, because the umask is
    # process-wide and briefly setting it to 0 would race with files created by other threads.
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: The mode `open()` gives a new file under the umask: mkstemp's temporary files are 0600, and os.replace
#: keeps the mode, so without a chmod every result file would be private to its owner.
_FILE_MODE = 0o666 & ~_current_umask()


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None], *, suffix: str = "") -> Path:
    """Create or replace ``path`` with what ``write(tmp)`` writes into a temporary file; returns ``path``.

    The temporary file sits next to ``path`` (hidden: ``.<name>.XXXX<suffix>``); pass ``suffix`` when the
    writer infers the format from the extension (matplotlib's ``savefig``). Missing parent folders are
    created. The final file gets the mode a plain ``open()`` would give it under the process umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path

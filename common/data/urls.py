"""URL sources (`https://…/file.jsonl.gz`): downloaded once into a cache folder, checksummed, then read as local files.

The cache is `<HF_HOME>/moescope/urls/` (HF_HOME defaults to ~/.cache/huggingface), or `MOESCOPE_URL_CACHE`
(`--cache_dir` sets it). Each URL becomes `<sha256(url)[:16]>-<file name>` with a `.json` record beside it (URL, size,
SHA-256, time). A cached file is used without touching the network, and its size and checksum are verified first
(a damaged entry is fetched again, or refused when offline). A download goes to a temporary file, is retried when the
connection drops, and is renamed into the cache only when complete (Content-Length bytes): a failed download never
leaves a cache entry. Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, or the host unreachable), a URL not in the cache
is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

from common.errors import InputError

ATTEMPTS = 3  # a dropped connection is retried this many times in all
TIMEOUT_S = 30.0
_CHUNK = 1 << 20


def is_url(source: str) -> bool:
    return source.startswith(("https://", "http://"))


def cache_root() -> Path:
    explicit = os.environ.get("MOESCOPE_URL_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "moescope" / "urls"


def file_name(url: str) -> str:
    """The URL's last path component (its format comes from it), e.g. 'valid.jsonl.gz'."""
    name = unquote(Path(urlparse(url).path).name)
    return name or "download"


def cache_path(url: str) -> Path:
    return cache_root() / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{file_name(url)}"


def _offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _intact(path: Path) -> bool:
    """The cached file exists and matches its record (size and SHA-256)."""
    record = path.with_name(path.name + ".json")
    try:
        meta = json.loads(record.read_text())
        return path.stat().st_size == meta["size"] and _sha256(path) == meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def cached(url: str) -> Path | None:
    """The intact cached copy of `url`, or None."""
    path = cache_path(url)
    return path if path.is_file() and _intact(path) else None


def fetch(url: str) -> Path:
    """The local copy of `url`: from the cache, or downloaded into it (InputError in one line when impossible)."""
    path = cached(url)
    if path is not None:
        return path
    if _offline():
        raise InputError(f"--data {url!r}: not in the download cache ({cache_root()}) and offline mode is set "
                         "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); run once with the network to cache it")
    path = cache_path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    error = None
    for attempt in range(ATTEMPTS):
        try:
            digest, size = _download(url, path)
            break
        except _Dropped as err:  # the connection broke mid-file: try again from the start
            error = err
            time.sleep(min(2.0, 0.25 * 2**attempt))
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", None) or err
            if isinstance(err, urllib.error.HTTPError):
                reason = f"HTTP {err.code} {err.reason}"
            raise InputError(f"--data {url!r}: cannot download it ({reason}); check the address and the network, or "
                             "use a local copy of the file") from None
    else:
        raise InputError(f"--data {url!r}: the download broke off {ATTEMPTS} times ({error}); nothing was cached, "
                         "try again later or use a local copy") from None
    record = {"url": url, "size": size, "sha256": digest, "downloaded": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.with_name(path.name + ".json").write_text(json.dumps(record, indent=2) + "\n")
    return path


class _Dropped(Exception):
    """Fewer bytes arrived than the server announced."""


def _download(url: str, target: Path) -> tuple[str, int]:
    """Download `url` to `target` through a temporary file beside it; (SHA-256, size)."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    digest, size = hashlib.sha256(), 0
    request = urllib.request.Request(url, headers={"User-Agent": "moescope"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, open(partial, "wb") as out:
            expected = response.headers.get("Content-Length")
            try:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
            except (ConnectionError, TimeoutError, urllib.error.URLError, OSError) as err:
                raise _Dropped(f"{size} bytes read: {err}") from None
            except Exception as err:  # http.client.IncompleteRead and the like
                raise _Dropped(f"{size} bytes read: {type(err).__name__}") from None
            if expected is not None and size != int(expected):
                raise _Dropped(f"{size} of {expected} bytes")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return digest.hexdigest(), size

"""Is the Hugging Face hub reachable? Asked once, in a few seconds, before anything tries it.

Without this, an offline machine spends 35-45 s in huggingface_hub's retries (printing a dozen lines of noise)
before a hub id fails. With it: `HF_HUB_OFFLINE=1` (or an unreachable hub) means the local cache only, and a model
or dataset missing from it is refused at once, in one line.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}


def offline_requested() -> bool:
    return any(os.environ.get(name, "").lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


@functools.cache
def reachable() -> bool:
    """Whether a TCP connection to the hub endpoint opens within PROBE_TIMEOUT_S (False when offline is requested)."""
    if offline_requested():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def unreachable_reason() -> str:
    return "HF_HUB_OFFLINE is set" if offline_requested() else "the Hugging Face hub is unreachable from this machine"

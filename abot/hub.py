"""Whether the Hugging Face Hub can be reached, known in about a second instead of after ~23 s of retries.

Used before any Hub download (datasets: abot.data.sources; models: abot.models.hf), so that offline a Hub
name fails at once with a message that says how to point at local files instead.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 1.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def flag(name: str) -> bool:
    """An environment variable set to a true value (HF_HUB_OFFLINE=1 and its spellings)."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def unreachable(*offline_flags: str) -> str | None:
    """Why the Hub cannot be reached, or None when it answers (or when a proxy is set: a direct probe says
    nothing then). The first of `offline_flags` that is set answers without a probe."""
    for name in offline_flags:
        if flag(name):
            return f"{name} is set"
    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    return probe(host, endpoint.port or (80 if endpoint.scheme == "http" else 443), PROBE_TIMEOUT_S)


def probe(host: str, port: int, timeout: float) -> str | None:
    """None if a TCP connection to host:port opens within `timeout` seconds, else why not.

    Runs in a daemon thread because name resolution ignores socket timeouts and can block for many seconds.
    """
    result: list[str | None] = ["no answer within %.0f s" % timeout]

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result[0] = None
        except OSError as err:
            result[0] = f"{host}:{port}: {err}"

    thread = threading.Thread(target=connect, daemon=True, name="abot-hub-probe")
    thread.start()
    thread.join(timeout)
    return result[0]

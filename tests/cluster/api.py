"""A minimal HTTPS client for the readiness checks and node creation: stdlib only, no process spawn per call."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


class Api:
    """Talks to the apiserver as the admin client cert, verifying the server against the cluster CA."""

    def __init__(self, url: str, ca: Path, cert: Path, key: Path) -> None:
        self.url = url
        self._ctx = ssl.create_default_context(cafile=str(ca))
        self._ctx.load_cert_chain(str(cert), str(key))

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                timeout: float = 5.0) -> tuple[int, str]:
        """Return (HTTP status, body text); HTTP errors are returned, connection errors raise OSError."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, context=self._ctx, timeout=timeout) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def get_json(self, path: str) -> dict[str, Any] | None:
        """GET a JSON object, or None on any non-200 answer."""
        status, text = self.request("GET", path)
        return json.loads(text) if status == 200 else None


def probe(url: str, timeout: float = 2.0) -> bool:
    """True if ``url`` answers 200 (http or https).

    NOTE: the controller-manager and scheduler serve /healthz with self-signed certs they generate at start (their
    trust is not what is under test), so this health probe alone skips verification; it only ever dials 127.0.0.1.
    """
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, context=ctx if url.startswith("https") else None, timeout=timeout) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False

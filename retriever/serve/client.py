"""Query a running `retriever serve` from Python or the CLI, with the standard library only."""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from retriever.errors import UserError
from retriever.search import SearchResult


def is_url(text: str) -> bool:
    return bool(re.match(r"https?://", str(text), re.IGNORECASE))


def split_server_url(url: str) -> tuple[str, str | None]:
    """(base URL, index name or None): `http://h:8000` or `http://h:8000/v1/indexes/NAME`."""
    parts = urlsplit(url)
    m = re.fullmatch(r"/*v1/indexes/([^/]+)/*", parts.path)
    base = urlunsplit((parts.scheme, parts.netloc, "" if m else parts.path.rstrip("/"), "", ""))
    return base, (m.group(1) if m else None)


def remote_search(
    url: str,
    text: str | None = None,
    image: str | Path | None = None,
    k: int = 10,
    modality: str = "image",
    index: str | None = None,
    api_key: str | None = None,
    timeout: float = 60.0,
) -> list[SearchResult]:
    """Search a server; results as SearchResult with `path` set to the hit's absolute image URL.

    url: the server (`http://127.0.0.1:8000`) or one index on it (`…/v1/indexes/NAME`).
    api_key: sent as `Authorization: Bearer KEY` when given.
    """
    base, from_url = split_server_url(url)
    body: dict = {"k": k, "modality": modality}
    if index or from_url:
        body["index"] = index or from_url
    if text is not None:
        body["text"] = text
    elif image is not None:
        try:
            body["image"] = base64.b64encode(Path(image).read_bytes()).decode()
        except OSError as e:
            raise UserError(f"Could not read the query image {image}: {e.strerror}.") from None
    reply = _post_json(f"{base}/v1/search", body, api_key, timeout)
    return [
        SearchResult(h["rank"], h["id"], h["score"], base + h["image_url"], h.get("caption")) for h in reply["hits"]
    ]


def _post_json(url: str, body: dict, api_key: str | None, timeout: float) -> dict:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (the user's own server URL)
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error") or e.reason
        except (ValueError, AttributeError):
            message = e.reason
        raise UserError(f"The server at {url} answered {e.code}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(
            f"Could not reach a retriever server at {url} ({reason}); is `retriever serve` running?"
        ) from None

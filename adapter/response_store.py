"""The responses the Responses API keeps (its `store`, true unless asked otherwise, as OpenAI's), so that a client
may continue one (`previous_response_id`), read it again (`GET /v1/responses/{id}`), list what it was answered from
(`.../input_items`) or delete it. They are kept in memory only, MAX_STORED of them within MAX_STORED_BYTES (the
least recently used go first), and forgotten when the server stops; each is found only with the API key that
asked for it (a page's own key on the app: another page's responses stay its own)."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

MAX_STORED = 1000  # responses kept at once
MAX_STORED_BYTES = 64 * 2**20  # their JSON (pictures as their data: URLs), counted per response


@dataclass(frozen=True)
class StoredResponse:
    """A response as it was answered, and every item the adapter was given for it: the earlier responses' input
    and output it continued, then its own input (each item with its id)."""

    response: dict[str, Any]
    items: list[dict[str, Any]]
    owner: str | None  # the API key it was asked with
    size: int  # bytes of its JSON, response and items


class ResponseStore:
    """Responses by id, the least recently used dropped first once MAX_STORED or MAX_STORED_BYTES is passed;
    shared by the threads answering requests."""

    def __init__(self, max_responses: int = MAX_STORED, max_bytes: int = MAX_STORED_BYTES) -> None:
        self.max_responses, self.max_bytes = max_responses, max_bytes
        self._kept: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, response: dict[str, Any], items: list[dict[str, Any]], owner: str | None) -> None:
        """Keep `response` (its `id`), answered from `items`; one larger than MAX_STORED_BYTES alone is not kept."""
        size = len(json.dumps([response, items], ensure_ascii=False).encode())
        if size > self.max_bytes:
            return
        with self._lock:
            self._kept[response["id"]] = StoredResponse(response, items, owner, size)
            self._bytes += size
            while len(self._kept) > self.max_responses or self._bytes > self.max_bytes:
                self._bytes -= self._kept.popitem(last=False)[1].size

    def get(self, response_id: str, owner: str | None) -> StoredResponse | None:
        """The response of that id asked with `owner`'s key, None when there is none (or it was dropped)."""
        with self._lock:
            stored = self._kept.get(response_id)
            if stored is None or stored.owner != owner:
                return None
            self._kept.move_to_end(response_id)
            return stored

    def delete(self, response_id: str, owner: str | None) -> bool:
        """Forget the response of that id asked with `owner`'s key; False when there is none."""
        with self._lock:
            stored = self._kept.get(response_id)
            if stored is None or stored.owner != owner:
                return False
            del self._kept[response_id]
            self._bytes -= stored.size
            return True

    def __len__(self) -> int:
        return len(self._kept)

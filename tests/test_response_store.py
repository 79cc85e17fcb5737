"""The Responses API's store (adapter.response_store): bounded by count and by bytes, the least recently used
dropped first, each response found only with the key that asked for it."""

from __future__ import annotations

import json

from adapter.response_store import ResponseStore


def response(name: str, text: str = "") -> dict:
    return {"id": name, "output": text}


def size(name: str, text: str = "") -> int:
    return len(json.dumps([response(name, text), []]).encode())


def test_the_least_recently_used_response_goes_first_once_too_many_are_kept():
    store = ResponseStore(max_responses=2)
    store.put(response("a"), [], None)
    store.put(response("b"), [], None)
    assert store.get("a", None) is not None  # a used: b is now the oldest
    store.put(response("c"), [], None)
    assert [name for name in "abc" if store.get(name, None)] == ["a", "c"]


def test_responses_are_dropped_to_stay_within_the_bytes_and_one_too_large_is_not_kept():
    store = ResponseStore(max_bytes=2 * size("a", "x" * 100) + 10)
    for name in "abc":
        store.put(response(name, "x" * 100), [], None)
    assert [name for name in "abc" if store.get(name, None)] == ["b", "c"]
    store.put(response("d", "x" * 1000), [], None)
    assert store.get("d", None) is None and len(store) == 2
    assert store.delete("b", None) and not store.delete("b", None)
    store.put(response("e", "x" * 100), [], None)  # room freed by the delete: c stays
    assert [name for name in "ce" if store.get(name, None)] == ["c", "e"]


def test_a_response_is_found_and_deleted_only_with_its_owners_key():
    store = ResponseStore()
    store.put(response("a"), [{"id": "msg_1"}], "key-1")
    assert store.get("a", "key-2") is None and store.get("a", None) is None
    assert not store.delete("a", "key-2")
    assert store.get("a", "key-1").items == [{"id": "msg_1"}]
    assert store.delete("a", "key-1") and len(store) == 0

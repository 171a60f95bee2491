"""The POST rung's choice of Content-Type without sockets, and its memory per network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowtunnel.agent.transport.labels import ContentTypes
from flowtunnel.agent.transport.network import RungMemory
from flowtunnel.wire import CONTENT_TYPE, CONTENT_TYPES

VND, OCTET, FORM = CONTENT_TYPES
BY = "HTTP 403 from the proxy http://p:3128"


def test_the_list_starts_with_the_batch_type_and_holds_types_proxies_pass() -> None:
    assert CONTENT_TYPES == ("application/vnd.flowtunnel.batch", "application/octet-stream",
                             "application/x-www-form-urlencoded")
    assert ContentTypes().current == CONTENT_TYPE


def test_a_refused_type_moves_to_the_next_and_the_one_acknowledged_is_logged_once() -> None:
    types = ContentTypes()
    assert types.refused_by_path(403, why=BY) == OCTET
    assert types.refused_by_path(415, why="HTTP 415 from the proxy") == FORM
    note = types.acked()
    assert note is not None
    assert FORM in note
    assert f"{VND}: {BY}" in note
    assert OCTET in note
    assert (types.current, types.confirmed, types.status()) == (FORM, FORM, FORM)
    assert types.acked() is None  # logged once: later batches under the same type say nothing


def test_the_first_type_acknowledged_at_once_is_not_news() -> None:
    types = ContentTypes()
    assert types.acked() is None
    assert types.status() == VND


def test_other_statuses_are_not_about_the_type() -> None:
    types = ContentTypes()
    for status in (401, 404, 405, 407, 413, 500, 502):
        assert types.refused_by_path(status, why="x") is None
    assert types.current == VND
    assert not types.refused


def test_every_type_refused_means_the_path_refuses_post_and_the_next_round_starts_over() -> None:
    types = ContentTypes()
    assert types.acked() is None  # VND worked once here
    assert types.refused_by_path(403, why=BY) == OCTET
    assert types.refused_by_path(403, why=BY) == FORM
    assert types.refused_by_path(403, why=BY) is None  # not the type: the ladder steps down
    assert types.current == VND
    assert not types.refused


def test_a_remembered_type_is_used_first_and_the_list_wraps_from_it() -> None:
    types = ContentTypes()
    types.use(FORM)
    assert types.current == FORM
    note = types.acked()
    assert note is not None
    assert "before" in note
    types.use(OCTET)
    assert types.refused_by_path(403, why=BY) == VND  # the others, best first
    assert types.refused_by_path(403, why=BY) == FORM
    types.use("text/html")  # a memory from another version: ignored
    assert types.current == VND
    types.use(None)
    assert types.current == VND


def test_a_type_outside_the_list_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="'text/html' is not one of application/vnd"):
        ContentTypes(current="text/html")


def test_the_memory_keeps_the_label_with_the_rung_and_reads_the_older_file(tmp_path: Path) -> None:
    path = tmp_path / "rungs.json"
    path.write_text(json.dumps({"aaaa": "ws", "bbbb": {"rung": "post", "content_type": OCTET},
                                "cccc": {"content_type": FORM}, "dddd": 3}))
    memory = RungMemory(path)
    assert (memory.get("aaaa"), memory.content_type("aaaa")) == ("ws", None)
    assert (memory.get("bbbb"), memory.content_type("bbbb")) == ("post", OCTET)
    assert memory.get("cccc") is None
    assert memory.get("dddd") is None
    memory.put("eeee", "post", content_type=FORM)
    memory.put("bbbb", "get")  # another rung there now: the label learned for POST stays
    again = RungMemory(path)
    assert (again.get("eeee"), again.content_type("eeee")) == ("post", FORM)
    assert (again.get("bbbb"), again.content_type("bbbb")) == ("get", OCTET)
    assert again.get("aaaa") == "ws"


def test_the_memory_keeps_the_batch_path_and_writes_only_what_changed(tmp_path: Path) -> None:
    path = tmp_path / "rungs.json"
    memory = RungMemory(path)
    text = memory.update("aaaa", "post", content_type=VND, path="/v1/batches")
    assert text is not None
    memory.write(text)
    assert memory.update("aaaa", "post", content_type=VND, path="/v1/batches") is None  # nothing new
    assert memory.update("aaaa", "post") is None  # another rung's batch would name no label or path
    again = RungMemory(path)
    assert (again.get("aaaa"), again.content_type("aaaa"), again.batch_path("aaaa")) == (
        "post", VND, "/v1/batches")
    assert again.update("aaaa", "get") is not None
    assert again.batch_path("aaaa") == "/v1/batches"  # learned for POST, kept while another rung carries


def test_the_memory_keeps_since_when_the_compact_route_was_refused(tmp_path: Path) -> None:
    """``/v1/batches`` is remembered with the time ``/v1/b`` was refused (the POST rung tries ``/v1/b`` again
    after a while); back on ``/v1/b``, the time goes. A time that is not a number is not one."""
    path = tmp_path / "rungs.json"
    memory = RungMemory(path)
    memory.put("aaaa", "post", path="/v1/batches", since=1_800_000_000.4)
    assert RungMemory(path).path_since("aaaa") == 1_800_000_000
    assert memory.update("aaaa", "post", path="/v1/batches", since=1_800_000_000.2) is None  # same second
    memory.put("aaaa", "post", path="/v1/b")
    again = RungMemory(path)
    assert (again.batch_path("aaaa"), again.path_since("aaaa")) == ("/v1/b", None)
    path.write_text('{"bbbb": {"rung": "post", "path": "/v1/batches", "path_since": "yesterday"}}')
    assert (RungMemory(path).batch_path("bbbb"), RungMemory(path).path_since("bbbb")) == ("/v1/batches", None)

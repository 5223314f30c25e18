"""Conformance of codi-monitor to docs/PROTOCOL.md, over Unix and TCP.

Every frame is encoded here with the PyPI msgpack package. Tests share one
daemon per module, so each test writes under its own unique component,
session or time window and queries only that.
"""

from __future__ import annotations

import datetime as dt
import random
import socket
import uuid

import msgpack
import pytest

from codi_wire import (HEADER, LEVELS, MAX_FRAME_LEN, UTC_MICROS, Conn,
                       expect_ack, expect_error, frame, log_fields, message,
                       new_id, pack, payload_of, query, request_frame, rfc3339)
from conftest import file_mode, start_daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    yield from start_daemon(tmp_path_factory, "daemon")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def stored(entries: list) -> list:
    """(level, component, session_id, message) of each entry, in order."""
    return [(e["level"], e["component"], e["session_id"], e["message"]) for e in entries]


def test_ready_line_names_the_listeners_and_files(daemon):
    assert daemon.ready["unix"] == daemon.socket_path
    assert daemon.ready["db"] == daemon.db_path
    host, port = daemon.tcp_addr
    assert host == "127.0.0.1" and port > 0
    assert file_mode(daemon.socket_path) == 0o600
    assert file_mode(daemon.db_path) == 0o600


def test_ping_is_accepted_with_matching_request_id(conn):
    ping_id = conn.send("Ping")
    answer = conn.recv()
    expect_ack(answer, ping_id)
    assert isinstance(answer["id"], bytes) and len(answer["id"]) == 16
    assert UTC_MICROS.match(answer["timestamp"]), answer["timestamp"]


def test_answers_are_named_maps(conn):
    conn.send_raw(request_frame("Ping")[1])
    conn.send_raw(request_frame("GetStatus")[1])
    conn.send_raw(request_frame({"QueryLogs": {"filter": {}, "limit": 1}})[1])
    conn.send_raw(frame(b"\xc1"))
    kinds = []
    for _ in range(4):
        answer = conn.recv()
        assert isinstance(answer, dict), f"answer is not a map: {answer!r}"
        assert list(answer) == ["id", "timestamp", "payload"], answer
        name, fields = payload_of(answer)
        assert isinstance(name, str)
        assert isinstance(fields, dict), f"{name} fields are not a map: {fields!r}"
        assert all(isinstance(k, str) for k in fields), fields
        kinds.append(name)
    assert kinds == ["Acknowledgment", "Status", "LogResults", "Error"]


def test_log_entry_named_is_stored_as_sent(conn):
    component = unique("named")
    when = "2026-11-26T22:34:56.123456Z"
    meta = {"pct": 91, "tags": ["disk", "full"], "ok": False, "none": None}
    log_id = conn.send({"LogEntry": log_fields("Warn", component, "disk 91% full",
                                               meta, "s-named")},
                       timestamp=when)
    expect_ack(conn.recv(), log_id)
    result = query(conn, component=component)
    assert result["total_count"] == 1
    (entry,) = result["entries"]
    assert isinstance(entry["id"], int)
    assert entry["uuid"] == log_id.bytes
    assert entry["timestamp"] == when
    assert stored([entry]) == [("Warn", component, "s-named", "disk 91% full")]
    assert entry["metadata"] == meta


def test_log_entry_positional_is_accepted(conn):
    component = unique("positional")
    log_id = new_id()
    body = pack([log_id.bytes, rfc3339(),
                 {"LogEntry": ["Error", component, "positional five", {"n": 1}, "s-pos"]}])
    conn.send_raw(frame(body))
    expect_ack(conn.recv(), log_id)
    # The seed's client sends four fields: no session_id.
    seed_id = new_id()
    body = pack([seed_id.bytes, rfc3339(),
                 {"LogEntry": ["Info", component, "positional four", None]}])
    conn.send_raw(frame(body))
    expect_ack(conn.recv(), seed_id)
    result = query(conn, component=component)
    assert stored(result["entries"]) == [
        ("Error", component, "s-pos", "positional five"),
        ("Info", component, None, "positional four"),
    ]
    assert result["entries"][0]["metadata"] == {"n": 1}
    assert result["entries"][1]["metadata"] is None


def test_id_as_uuid_string_is_accepted(conn):
    component = unique("string-id")
    log_id = new_id()
    answer = conn.request({"LogEntry": log_fields(component=component)},
                          msg_id=str(log_id))
    assert len(str(log_id)) == 36
    expect_ack(answer, log_id)
    (entry,) = query(conn, component=component)["entries"]
    assert entry["uuid"] == log_id.bytes


def test_timestamp_with_offset_is_answered_in_utc(conn):
    component = unique("offset")
    conn.send({"LogEntry": log_fields(component=component)},
              timestamp="2001-02-03T04:05:06.5+02:00")
    payload_of(conn.recv())
    (entry,) = query(conn, component=component)["entries"]
    assert entry["timestamp"] == "2001-02-03T02:05:06.500000Z"


def test_log_batch_stores_entries_with_consecutive_ids(conn):
    component = unique("batch")
    # Low 64 bits near the top, so entry 2 carries into the high half.
    high = new_id().int >> 64
    batch_id = uuid.UUID(int=(high << 64) | 0xFFFF_FFFF_FFFF_FFFE)
    entries = [log_fields(level, component, f"batch entry {i}")
               for i, level in enumerate(["Info", "Warn", "Error"])]
    answer = conn.request({"LogBatch": {"entries": entries}}, msg_id=batch_id)
    expect_ack(answer, batch_id)
    result = query(conn, component=component)
    assert result["total_count"] == 3
    assert stored(result["entries"]) == [
        ("Info", component, None, "batch entry 0"),
        ("Warn", component, None, "batch entry 1"),
        ("Error", component, None, "batch entry 2"),
    ]
    want = [uuid.UUID(int=(batch_id.int + i) % 2**128).bytes for i in range(3)]
    assert [e["uuid"] for e in result["entries"]] == want


def test_resent_log_batch_is_stored_once(conn):
    component = unique("batch-resend")
    batch_id = new_id()
    payload = {"LogBatch": {"entries": [log_fields(component=component, message=f"m{i}")
                                        for i in range(4)]}}
    expect_ack(conn.request(payload, msg_id=batch_id), batch_id)
    expect_ack(conn.request(payload, msg_id=batch_id), batch_id)
    assert query(conn, component=component)["total_count"] == 4


def test_resent_log_entry_is_stored_once(connect):
    component = unique("resend")
    log_id = new_id()
    payload = {"LogEntry": log_fields(component=component)}
    first = connect()
    expect_ack(first.request(payload, msg_id=log_id), log_id)
    first.close()
    # A client that lost its answer reconnects and sends the same id again.
    second = connect()
    expect_ack(second.request(payload, msg_id=log_id), log_id)
    result = query(second, component=component)
    assert result["total_count"] == 1
    assert result["entries"][0]["uuid"] == log_id.bytes


def test_session_start_and_end(connect, tmp_path):
    component = unique("session")
    session = unique("s")
    conn = connect()
    start = {"SessionStart": {"session_id": session, "identity": "conformance",
                              "agent_type": "pytest", "workspace": str(tmp_path)}}
    start_id = conn.send(start)
    expect_ack(conn.recv(), start_id)
    # Absent session_id: this connection's session. Explicit one wins.
    implicit_id = conn.send({"LogEntry": log_fields(component=component, message="implicit")})
    expect_ack(conn.recv(), implicit_id)
    explicit_id = conn.send({"LogEntry": log_fields(component=component, message="explicit",
                                                    session_id="other-" + session)})
    expect_ack(conn.recv(), explicit_id)
    other = connect()
    elsewhere_id = other.send({"LogEntry": log_fields(component=component,
                                                      message="elsewhere")})
    expect_ack(other.recv(), elsewhere_id)
    end_id = conn.send({"SessionEnd": {"session_id": session}})
    expect_ack(conn.recv(), end_id)

    result = query(conn, session_id=session)
    assert stored(result["entries"]) == [("Info", component, session, "implicit")]
    by_message = {e["message"]: e["session_id"]
                  for e in query(conn, component=component)["entries"]}
    assert by_message == {"implicit": session, "explicit": "other-" + session,
                          "elsewhere": None}


class Dataset:
    """Eight logs with distinct timestamps in a unique window, sent shuffled."""

    def __init__(self, conn: Conn):
        self.component = unique("filters")
        self.sessions = (unique("sa"), unique("sb"))
        self.needle = unique("needle")
        base = dt.datetime(1990, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(
            seconds=random.randrange(300_000_000))
        self.rows = []
        for i in range(8):
            text = f"row {i}"
            if i % 3 == 0:
                text += f" {self.needle}"
            if i == 4:
                text += f" {self.needle.upper()}"
            self.rows.append({
                "i": i,
                "time": base + dt.timedelta(seconds=i, microseconds=7),
                "level": LEVELS[i % 5],
                "session_id": self.sessions[i % 2],
                "message": text,
            })
        order = [5, 0, 7, 2, 6, 1, 4, 3]
        sent = []
        for i in order:
            row = self.rows[i]
            msg_id, data = request_frame(
                {"LogEntry": log_fields(row["level"], self.component, row["message"],
                                        {"i": i}, row["session_id"])},
                timestamp=rfc3339(row["time"]))
            sent.append(msg_id)
            conn.send_raw(data)
        for msg_id in sent:
            expect_ack(conn.recv(), msg_id)

    def ts(self, i: int) -> str:
        return rfc3339(self.rows[i]["time"])

    def expect(self, rows) -> list:
        rows = sorted(rows, key=lambda r: r["time"])
        return [(r["level"], self.component, r["session_id"], r["message"]) for r in rows]


@pytest.fixture
def dataset(conn) -> Dataset:
    return Dataset(conn)


FILTERS = {
    "component": lambda d: ({"component": d.component}, d.rows),
    "min_level": lambda d: ({"component": d.component, "min_level": "Warn"},
                            [r for r in d.rows if r["level"] in ("Warn", "Error")]),
    "session_id": lambda d: ({"session_id": d.sessions[0]},
                             [r for r in d.rows if r["session_id"] == d.sessions[0]]),
    "since": lambda d: ({"component": d.component, "since": d.ts(3)},
                        [r for r in d.rows if r["i"] >= 3]),
    "until": lambda d: ({"component": d.component, "until": d.ts(5)},
                        [r for r in d.rows if r["i"] < 5]),
    "since_until": lambda d: ({"since": d.ts(2), "until": d.ts(6)},
                              [r for r in d.rows if 2 <= r["i"] < 6]),
    "since_with_offset": lambda d: (
        {"component": d.component,
         "since": d.rows[6]["time"].astimezone(
             dt.timezone(dt.timedelta(hours=-5))).isoformat()},
        [r for r in d.rows if r["i"] >= 6]),
    "contains": lambda d: ({"contains": d.needle},
                           [r for r in d.rows if d.needle in r["message"]]),
    "all_together": lambda d: ({"component": d.component, "session_id": d.sessions[1],
                                "min_level": "Debug", "since": d.ts(1),
                                "until": d.ts(7), "contains": "row"},
                               [r for r in d.rows if r["session_id"] == d.sessions[1]
                                and LEVELS.index(r["level"]) >= LEVELS.index("Debug")
                                and 1 <= r["i"] < 7]),
}


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_query_filter(conn, dataset, name):
    filter_keys, rows = FILTERS[name](dataset)
    assert rows, "the case must select something"
    result = query(conn, **filter_keys)
    assert stored(result["entries"]) == dataset.expect(rows)
    assert result["total_count"] == len(rows)


def test_query_limit_keeps_the_newest_oldest_first(conn, dataset):
    result = query(conn, limit=3, component=dataset.component)
    assert stored(result["entries"]) == dataset.expect(dataset.rows[5:])
    assert result["total_count"] == 8
    counted = query(conn, limit=0, component=dataset.component)
    assert counted["entries"] == [] and counted["total_count"] == 8


def test_query_after_id_returns_the_oldest_rows_after_it(conn, dataset):
    rows = query(conn, component=dataset.component)["entries"]
    by_id = sorted(rows, key=lambda e: e["id"])
    after = by_id[2]["id"]
    result = query(conn, limit=3, component=dataset.component, after_id=after)
    assert [e["id"] for e in result["entries"]] == [e["id"] for e in by_id[3:6]]
    assert result["total_count"] == 5


def test_large_answer_is_trimmed_to_one_frame(conn):
    component = unique("big")
    big = "x" * 400_000
    ids = [conn.send({"LogEntry": log_fields(component=component, message=f"{i} {big}")},
                     timestamp=rfc3339(dt.datetime(2002, 1, 1, 0, 0, i, tzinfo=dt.timezone.utc)))
           for i in range(4)]
    for log_id in ids:
        expect_ack(conn.recv(), log_id)
    result = query(conn, limit=10, component=component)  # recv checks <= 1 MiB
    assert result["total_count"] == 4
    kept = [e["message"].split()[0] for e in result["entries"]]
    assert 1 <= len(kept) < 4
    assert kept == [str(i) for i in range(4 - len(kept), 4)], "keeps the newest"


def test_get_status(conn):
    name, fields = payload_of(conn.request("GetStatus"))
    assert name == "Status"
    assert fields["components"], "at least one component"
    for component in fields["components"]:
        assert set(component) >= {"name", "status", "message"}
        assert all(isinstance(component[k], str) for k in ("name", "status", "message"))
        assert component["status"] in ("healthy", "degraded", "failed")
    uptime = fields["uptime"]
    assert isinstance(uptime["secs"], int) and uptime["secs"] >= 0
    assert isinstance(uptime["nanos"], int) and 0 <= uptime["nanos"] < 1_000_000_000


def test_pipelined_requests_are_answered_in_order(conn):
    component = unique("pipeline")
    expected = []
    data = b""
    for i in range(100):
        kind = ("log", "ping", "query", "status", "batch")[i % 5]
        if kind == "log":
            msg_id, f = request_frame({"LogEntry": log_fields(component=component,
                                                               message=str(i))})
        elif kind == "ping":
            msg_id, f = request_frame("Ping")
        elif kind == "query":
            msg_id, f = request_frame({"QueryLogs": {"filter": {"component": component},
                                                     "limit": 0}})
        elif kind == "status":
            msg_id, f = request_frame("GetStatus")
        else:
            msg_id, f = request_frame({"LogBatch": {"entries": [
                log_fields(component=component, message=f"{i}.{j}") for j in range(3)]}})
        expected.append((kind, msg_id))
        data += f
    conn.send_raw(data)
    for kind, msg_id in expected:
        answer = conn.recv()
        name, _ = payload_of(answer)
        if kind in ("log", "ping", "batch"):
            expect_ack(answer, msg_id)
        else:
            assert name == {"query": "LogResults", "status": "Status"}[kind], answer
    # 20 single logs and 20 batches of 3.
    assert query(conn, limit=0, component=component)["total_count"] == 80


GARBAGE = {
    "not_msgpack": b"\xc1",
    "text": b"hello, daemon",
    "not_a_message": pack({"x": 1}),
    "unknown_variant": pack(message("Teleport")),
    "short_id": pack({**message("Ping"), "id": b"\x01" * 15}),
    "bad_timestamp": pack(message("Ping", timestamp="yesterday")),
    "missing_field": pack(message({"LogEntry": {"level": "Info"}})),
    "bad_level": pack(message({"LogEntry": log_fields(level="Loud")})),
    "answer_variant": pack(message({"Acknowledgment": {"request_id": new_id().bytes,
                                                       "status": "Accepted"}})),
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_invalid_body_is_invalid_message_and_connection_survives(conn, name):
    conn.send_raw(frame(GARBAGE[name]))
    expect_error(conn.recv(), "InvalidMessage")
    ping_id = conn.send("Ping")
    expect_ack(conn.recv(), ping_id)


def test_zero_length_frame_is_invalid_frame_then_close(conn):
    ping_id, ping = request_frame("Ping")
    conn.send_raw(ping + HEADER.pack(0))
    expect_ack(conn.recv(), ping_id)  # earlier requests are answered first
    expect_error(conn.recv(), "InvalidFrame")
    conn.expect_closed()


def test_oversized_frame_is_frame_too_large_then_close(conn):
    ping_id, ping = request_frame("Ping")
    conn.send_raw(ping + HEADER.pack(MAX_FRAME_LEN + 1))
    expect_ack(conn.recv(), ping_id)
    expect_error(conn.recv(), "FrameTooLarge")
    conn.expect_closed()


def test_frame_of_exactly_one_mib_is_accepted(conn):
    component = unique("max-frame")
    log_id = new_id()
    when = rfc3339()

    def body(n: int) -> bytes:
        # Three logs: one log is at most 524 288 bytes once stored.
        entries = [log_fields(component=component, message="y" * n) for _ in range(3)]
        return pack(message({"LogBatch": {"entries": entries}}, msg_id=log_id, timestamp=when))

    n = 300_000
    n += (MAX_FRAME_LEN - len(body(n))) // 3
    while len(body(n)) < MAX_FRAME_LEN:
        n += 1
    assert len(body(n)) == MAX_FRAME_LEN
    conn.send_raw(frame(body(n)))
    expect_ack(conn.recv(), log_id)
    assert query(conn, limit=0, component=component)["total_count"] == 3


def test_a_log_over_the_row_bound_is_rejected_with_the_limit(conn):
    component = unique("row-bound")
    log_id = conn.send({"LogEntry": log_fields(component=component, message="z" * 600_000)})
    name, fields = payload_of(conn.recv())
    assert name == "Acknowledgment"
    assert fields["request_id"] == log_id.bytes
    assert "524288" in fields["status"]["Rejected"]
    ping_id = conn.send("Ping")  # the connection goes on
    expect_ack(conn.recv(), ping_id)
    assert query(conn, limit=0, component=component)["total_count"] == 0


def test_binary_and_extension_metadata_come_back_exactly(conn):
    component = unique("binary")
    blob = bytes(range(256)) * 40
    meta = {"blob": blob, "ext": msgpack.ExtType(5, b"\x00\xff"), "empty": b""}
    log_id = conn.send({"LogEntry": log_fields(component=component, metadata=meta)})
    expect_ack(conn.recv(), log_id)
    (entry,) = query(conn, component=component)["entries"]
    assert entry["metadata"] == meta


def test_truncated_frame_then_close_does_not_disturb_others(connect):
    component = unique("truncated")
    bystander = connect()
    first_ping = bystander.send("Ping")
    expect_ack(bystander.recv(), first_ping)

    _, whole = request_frame({"LogEntry": log_fields(component=component)})
    for cut in (2, HEADER.size, HEADER.size + 10, len(whole) - 1):
        quitter = connect()
        quitter.send_raw(whole[:cut])
        quitter.sock.shutdown(socket.SHUT_WR)
        quitter.expect_closed()  # nothing answered for half a frame
        quitter.close()

    ping_id = bystander.send("Ping")
    expect_ack(bystander.recv(), ping_id)
    newcomer = connect()
    ping_id = newcomer.send("Ping")
    expect_ack(newcomer.recv(), ping_id)
    assert query(newcomer, limit=0, component=component)["total_count"] == 0


def test_monitoring_requests(daemon, connect, transport, tmp_path):
    """StartMonitoring / StopMonitoring change watches on the Unix socket
    only; ListMonitoring (Extension) lists them on either transport."""
    conn = connect()
    watched = tmp_path / "exports"
    watched.mkdir()
    start = {"StartMonitoring": {"path": str(watched), "recursive": True,
                                 "patterns": ["*.md"]}}
    answer = conn.request(start)
    if transport == "tcp":
        expect_error(answer, "Unauthorized")
        return
    name, _ = payload_of(answer)
    assert name == "Acknowledgment", answer
    assert payload_of(answer)[1]["status"] == "Accepted", answer
    name, fields = payload_of(conn.request("ListMonitoring"))
    assert name == "Monitoring"
    mine = [p for p in fields["paths"] if p["path"] == str(watched.resolve())]
    assert mine == [{"path": str(watched.resolve()), "recursive": True,
                     "patterns": ["*.md"], "session_id": None, "active": True}]
    missing = {"StartMonitoring": {"path": str(tmp_path / "missing"),
                                   "recursive": False, "patterns": []}}
    error = expect_error(conn.request(missing), "InvalidRequest")
    assert "does not exist" in error["message"]
    stop_id = conn.send({"StopMonitoring": {"path": str(watched)}})
    expect_ack(conn.recv(), stop_id)
    error = expect_error(conn.request({"StopMonitoring": {"path": str(watched)}}),
                         "InvalidRequest")
    assert "not watched" in error["message"]

"""An independent client of the codi wire protocol v1 (docs/PROTOCOL.md).

Written against the document with the PyPI `msgpack` package only, so that
the conformance suite checks the daemon's bytes, not our Rust codec against
itself.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import socket
import struct
import time
import uuid

import msgpack

HEADER = struct.Struct("<I")
MAX_FRAME_LEN = 1_048_576
LEVELS = ("Trace", "Debug", "Info", "Warn", "Error")
UTC_MICROS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
IO_TIMEOUT = 10.0


def new_id() -> uuid.UUID:
    """A fresh UUIDv7: 48 bits of Unix milliseconds, version 7, random rest."""
    ms = time.time_ns() // 1_000_000
    rand = bytearray(os.urandom(10))
    rand[0] = 0x70 | (rand[0] & 0x0F)
    rand[2] = 0x80 | (rand[2] & 0x3F)
    return uuid.UUID(bytes=ms.to_bytes(6, "big") + bytes(rand))


def rfc3339(when: _dt.datetime | None = None) -> str:
    """RFC 3339 in UTC with microseconds, the daemon's own answer format."""
    when = when or _dt.datetime.now(_dt.timezone.utc)
    return when.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def log_fields(level="Info", component="conformance", message="hello",
               metadata=None, session_id=None) -> dict:
    """A LogEntry field map (named encoding); session_id only when given."""
    fields = {"level": level, "component": component, "message": message,
              "metadata": metadata}
    if session_id is not None:
        fields["session_id"] = session_id
    return fields


def message(payload, *, msg_id: uuid.UUID | str | None = None,
            timestamp: str | None = None) -> dict:
    """A named Message map; a UUID id is sent as bin 16, a str id as is."""
    msg_id = msg_id if msg_id is not None else new_id()
    wire_id = msg_id.bytes if isinstance(msg_id, uuid.UUID) else msg_id
    return {"id": wire_id, "timestamp": timestamp or rfc3339(),
            "payload": payload}


def pack(value) -> bytes:
    """MessagePack with bytes as bin and str as str."""
    return msgpack.packb(value, use_bin_type=True)


def frame(body: bytes) -> bytes:
    """A length-prefixed frame around `body`."""
    return HEADER.pack(len(body)) + body


def request_frame(payload, **kw) -> tuple[uuid.UUID | str, bytes]:
    """(id, frame) of a named request."""
    msg = message(payload, **kw)
    msg_id = kw.get("msg_id")
    if msg_id is None:
        msg_id = uuid.UUID(bytes=msg["id"])
    return msg_id, frame(pack(msg))


class Closed(Exception):
    """The daemon closed the connection."""


class Conn:
    """One blocking connection with explicit frame I/O and timeouts."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.settimeout(IO_TIMEOUT)
        self.buf = b""

    @classmethod
    def unix(cls, path: str) -> "Conn":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return cls(sock)

    @classmethod
    def tcp(cls, host: str, port: int) -> "Conn":
        sock = socket.create_connection((host, port), timeout=IO_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, payload, **kw) -> uuid.UUID | str:
        """Sends one named request; returns its id."""
        msg_id, data = request_frame(payload, **kw)
        self.send_raw(data)
        return msg_id

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            try:
                chunk = self.sock.recv(max(65536, n - len(self.buf)))
            except ConnectionResetError as e:
                raise Closed("connection reset") from e
            if not chunk:
                raise Closed(f"EOF with {len(self.buf)} buffered bytes")
            self.buf += chunk

    def recv_body(self) -> bytes:
        """The body of the next frame; checks the frame length rule."""
        self._fill(HEADER.size)
        (n,) = HEADER.unpack(self.buf[:HEADER.size])
        assert 1 <= n <= MAX_FRAME_LEN, f"daemon sent a frame of length {n}"
        self._fill(HEADER.size + n)
        body = self.buf[HEADER.size:HEADER.size + n]
        self.buf = self.buf[HEADER.size + n:]
        return body

    def recv(self) -> dict:
        """The next answer, decoded (str as str, bin as bytes)."""
        return msgpack.unpackb(self.recv_body(), raw=False,
                               strict_map_key=False)

    def request(self, payload, **kw) -> dict:
        self.send(payload, **kw)
        return self.recv()

    def expect_closed(self) -> None:
        """Asserts the daemon closes the connection without sending more."""
        try:
            self._fill(len(self.buf) + 1)
        except Closed:
            assert self.buf == b"", f"unexpected bytes before close: {self.buf!r}"
            return
        except socket.timeout as e:
            raise AssertionError("the daemon did not close the connection") from e
        raise AssertionError(f"expected close, got bytes {self.buf!r}")


def payload_of(answer: dict) -> tuple[str, object]:
    """(variant name, fields) of an answer's payload."""
    payload = answer["payload"]
    if isinstance(payload, str):
        return payload, None
    assert isinstance(payload, dict) and len(payload) == 1, payload
    ((name, fields),) = payload.items()
    return name, fields


def expect_ack(answer: dict, request_id) -> None:
    """Asserts `answer` acknowledges `request_id` as Accepted."""
    name, fields = payload_of(answer)
    assert name == "Acknowledgment", answer
    want = request_id.bytes if isinstance(request_id, uuid.UUID) else \
        uuid.UUID(request_id).bytes
    assert fields["request_id"] == want, answer
    assert fields["status"] == "Accepted", answer


def expect_error(answer: dict, code: str) -> dict:
    """Asserts `answer` is an Error with `code`; returns its fields."""
    name, fields = payload_of(answer)
    assert name == "Error", answer
    assert fields["code"] == code, answer
    assert isinstance(fields["message"], str), answer
    return fields


def query(conn: Conn, limit: int = 100, **filter_keys) -> dict:
    """QueryLogs with the given filter keys; returns LogResults fields."""
    answer = conn.request({"QueryLogs": {"filter": filter_keys,
                                         "limit": limit}})
    name, fields = payload_of(answer)
    assert name == "LogResults", answer
    assert isinstance(fields["total_count"], int), answer
    assert isinstance(fields["entries"], list), answer
    return fields

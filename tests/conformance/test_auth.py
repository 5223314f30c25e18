"""Token authentication (docs/PROTOCOL.md, "Authentication").

The daemon gets its token from $CODI_MONITOR_TOKEN. TCP connections must
authenticate first; Unix connections need no token.
"""

from __future__ import annotations

import secrets

import pytest

from codi_wire import expect_ack, expect_error, log_fields, payload_of, request_frame
from conftest import start_daemon

TOKEN = "conformance-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    yield from start_daemon(tmp_path_factory, "auth-daemon", token=TOKEN)


@pytest.fixture
def tcp(daemon):
    conn = daemon.connect("tcp")
    yield conn
    conn.close()


def test_tcp_request_before_authenticate_is_unauthorized_then_closed(tcp):
    tcp.send("Ping")
    expect_error(tcp.recv(), "Unauthorized")
    tcp.expect_closed()


def test_tcp_log_before_authenticate_is_unauthorized_then_closed(tcp):
    tcp.send({"LogEntry": log_fields(component="unauthenticated")})
    expect_error(tcp.recv(), "Unauthorized")
    tcp.expect_closed()


def test_tcp_wrong_token_is_unauthorized(tcp):
    tcp.send({"Authenticate": {"token": TOKEN + "x"}})
    expect_error(tcp.recv(), "Unauthorized")


def test_tcp_right_token_then_requests_work(tcp):
    auth_id = tcp.send({"Authenticate": {"token": TOKEN}})
    expect_ack(tcp.recv(), auth_id)
    ping_id = tcp.send("Ping")
    expect_ack(tcp.recv(), ping_id)
    log_id = tcp.send({"LogEntry": log_fields(component="authenticated")})
    expect_ack(tcp.recv(), log_id)
    name, _ = payload_of(tcp.request("GetStatus"))
    assert name == "Status"


def test_tcp_requests_pipelined_behind_authenticate_are_served(tcp):
    auth_id, auth = request_frame({"Authenticate": {"token": TOKEN}})
    ping_id, ping = request_frame("Ping")
    log_id, log = request_frame({"LogEntry": log_fields(component="pipelined-auth")})
    tcp.send_raw(auth + ping + log)
    expect_ack(tcp.recv(), auth_id)
    expect_ack(tcp.recv(), ping_id)
    expect_ack(tcp.recv(), log_id)


def test_unix_needs_no_token(daemon):
    conn = daemon.connect("unix")
    try:
        ping_id = conn.send("Ping")
        expect_ack(conn.recv(), ping_id)
        log_id = conn.send({"LogEntry": log_fields(component="unix-no-token")})
        expect_ack(conn.recv(), log_id)
    finally:
        conn.close()

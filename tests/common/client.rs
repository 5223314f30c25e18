//! The blocking protocol client and helpers that build and check messages.

use codi_monitor::client::conn::Stream;
use codi_monitor::proto::{
    decode_message, encode_message, frame_body_len, AckStatus, ErrorCode, LogFields, LogFilter,
    LogLevel, Message, Payload, StoredLog, Timestamp, HEADER_LEN,
};
use rmpv::Value;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use uuid::Uuid;

use super::*;

/// A blocking protocol client with hang-protected reads.
pub struct Client {
    stream: Stream,
    buf: Vec<u8>,
}

impl Client {
    /// Connects to a Unix socket.
    pub fn unix(path: &Path) -> Client {
        let s = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
        Client::from_stream(Stream::Unix(s))
    }

    /// Connects over TCP.
    pub fn tcp(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        s.set_nodelay(true).unwrap();
        Client::from_stream(Stream::Tcp(s))
    }

    /// Connects to a Unix socket, or says why not.
    #[allow(dead_code)]
    pub fn try_unix(path: &Path) -> io::Result<Client> {
        Ok(Client::from_stream(Stream::Unix(UnixStream::connect(
            path,
        )?)))
    }

    /// Connects over TCP, or says why not.
    #[allow(dead_code)]
    pub fn try_tcp(addr: SocketAddr) -> io::Result<Client> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Ok(Client::from_stream(Stream::Tcp(s)))
    }

    fn from_stream(stream: Stream) -> Client {
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        // A daemon that stops reading fails the test instead of hanging it.
        stream.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    /// A second handle on the same connection (for a separate writer
    /// thread); its own read buffer starts empty.
    pub fn try_clone(&self) -> Client {
        Client::from_stream(self.stream.try_clone().expect("clone stream"))
    }

    /// Sends one message.
    pub fn send(&mut self, msg: &Message) -> io::Result<()> {
        let mut frame = Vec::new();
        encode_message(msg, &mut frame).expect("encode");
        self.stream.write_all(&frame)
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Half-closes the connection (no more requests).
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown_write();
    }

    /// The next answer; `Ok(None)` on a clean end of stream (or a reset
    /// after the daemon closed).
    pub fn try_recv(&mut self) -> io::Result<Option<Message>> {
        loop {
            match frame_body_len(&self.buf) {
                Ok(Some(n)) if self.buf.len() >= HEADER_LEN + n => {
                    let msg = decode_message(&self.buf[HEADER_LEN..HEADER_LEN + n])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                    self.buf.drain(..HEADER_LEN + n);
                    return Ok(Some(msg));
                }
                Ok(_) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "connection closed inside a frame ({} bytes)",
                            self.buf.len()
                        ),
                    ));
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset && self.buf.is_empty() => {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The next answer; panics on end of stream or timeout.
    pub fn recv(&mut self) -> Message {
        match self.try_recv() {
            Ok(Some(msg)) => msg,
            Ok(None) => panic!("connection closed while an answer was expected"),
            Err(e) => panic!("no answer: {e}"),
        }
    }

    /// Asserts the daemon closed the connection.
    pub fn expect_eof(&mut self) {
        match self.try_recv() {
            Ok(None) => {}
            Ok(Some(msg)) => panic!("expected end of stream, got {msg:?}"),
            Err(e) => panic!("expected end of stream, got error {e}"),
        }
    }

    /// Asserts the daemon ended the stream cleanly (end of stream after every
    /// answer), not with a reset.
    #[allow(dead_code)]
    pub fn expect_clean_eof(&mut self) {
        assert!(self.buf.is_empty(), "unread bytes before the end of stream");
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => {}
            other => panic!("expected a clean end of stream, got {other:?}"),
        }
    }

    /// Sends a message and returns its answer.
    pub fn request(&mut self, msg: &Message) -> Message {
        self.send(msg).expect("send request");
        self.recv()
    }

    /// Sends `payload` in a fresh message and returns the answer.
    pub fn call(&mut self, payload: Payload) -> Message {
        self.request(&Message::new(payload))
    }

    /// Sends `msg` and asserts it is acknowledged `Accepted`.
    pub fn expect_accepted(&mut self, msg: &Message) {
        let answer = self.request(msg);
        assert_accepted(&answer, msg.id);
    }

    /// Authenticates with `token`, which must be accepted.
    pub fn authenticate(&mut self, token: &str) {
        self.expect_accepted(&Message::new(Payload::Authenticate {
            token: token.into(),
        }));
    }

    /// A ping that must come back `Accepted`.
    pub fn ping(&mut self) {
        self.expect_accepted(&Message::new(Payload::Ping));
    }
}

/// A `LogEntry` message.
pub fn log(level: LogLevel, component: &str, message: &str) -> Message {
    Message::new(Payload::LogEntry(fields(level, component, message)))
}

/// Log fields without metadata or session.
pub fn fields(level: LogLevel, component: &str, message: &str) -> LogFields {
    LogFields {
        level,
        component: component.into(),
        message: message.into(),
        metadata: None,
        session_id: None,
    }
}

/// A message with a fixed timestamp.
pub fn at(micros: i64, payload: Payload) -> Message {
    Message {
        id: Uuid::now_v7(),
        timestamp: Timestamp::from_micros(micros),
        payload,
    }
}

/// The acknowledgment's request id and status; panics on anything else.
pub fn ack(answer: &Message) -> (Uuid, &AckStatus) {
    match &answer.payload {
        Payload::Acknowledgment { request_id, status } => (*request_id, status),
        other => panic!("expected an Acknowledgment, got {other:?}"),
    }
}

/// True if `answer` accepts request `id`.
#[allow(dead_code)]
pub fn is_accepted(answer: &Message, id: Uuid) -> bool {
    matches!(&answer.payload,
        Payload::Acknowledgment { request_id, status: AckStatus::Accepted } if *request_id == id)
}

/// Asserts `answer` accepts request `id`.
pub fn assert_accepted(answer: &Message, id: Uuid) {
    let (request_id, status) = ack(answer);
    assert_eq!(request_id, id, "request_id must echo the request's id");
    assert_eq!(status, &AckStatus::Accepted, "status for {id}");
}

/// Asserts `answer` rejects request `id` with a non-empty reason; returns it.
pub fn assert_rejected(answer: &Message, id: Uuid) -> String {
    let (request_id, status) = ack(answer);
    assert_eq!(request_id, id, "request_id must echo the request's id");
    match status {
        AckStatus::Rejected(reason) => {
            assert!(!reason.trim().is_empty(), "a rejection must say why");
            reason.clone()
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
}

/// Asserts `answer` is an `Error` with `code`; returns its message.
pub fn assert_error(answer: &Message, code: ErrorCode) -> String {
    match &answer.payload {
        Payload::Error {
            code: got, message, ..
        } => {
            assert_eq!(got, &code, "error code (message: {message})");
            message.clone()
        }
        other => panic!("expected Error {code}, got {other:?}"),
    }
}

/// A fixed instant (2023-11-14T22:13:20Z) the tests stamp messages from.
pub const T0: i64 = 1_700_000_000_000_000;
/// One second in protocol timestamps (microseconds).
pub const SECOND: i64 = 1_000_000;

/// The row uuid of entry `i` of a batch (SPEC: batch id plus `i`, wrapping).
pub fn batch_entry(batch: Uuid, i: usize) -> Uuid {
    Uuid::from_u128(batch.as_u128().wrapping_add(i as u128))
}

/// A `LogBatch` message of `entries`.
pub fn batch(entries: Vec<LogFields>) -> Message {
    Message::new(Payload::LogBatch { entries })
}

/// `levels` arrays around the integer 1.
pub fn nested(levels: usize) -> Value {
    (0..levels).fold(Value::from(1), |v, _| Value::Array(vec![v]))
}

/// The entries and total count of a `LogResults` answer; panics on anything else.
pub fn results(answer: &Message) -> (&[StoredLog], u64) {
    match &answer.payload {
        Payload::LogResults {
            entries,
            total_count,
        } => (entries, *total_count),
        other => panic!("expected LogResults, got {other:?}"),
    }
}

/// A `QueryLogs` request.
pub fn query(filter: LogFilter, limit: u64) -> Message {
    Message::new(Payload::QueryLogs { filter, limit })
}

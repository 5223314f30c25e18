//! Hostile connections: non-blocking sockets that send generated frames in
//! pieces of random size, half-close, drop mid-frame or stop reading, while
//! every answer they do read is checked against a model of what the daemon
//! saw: the frames cut from exactly the bytes written, each decoded with
//! the crate's own codec.

use super::gen::{self, Made, Rng, Transport};
use super::Shared;
use codi_monitor::client::conn::Stream;
use codi_monitor::proto::{
    decode_message, encode_message, frame_body_len, AckStatus, ErrorCode, Message, Payload,
    HEADER_LEN,
};
use codi_monitor::store::batch_entry_id;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A log the daemon may store because a frame that decodes carried it: its
/// fields as sent, for comparison with the stored row.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Level name.
    pub level: String,
    /// Component.
    pub component: String,
    /// The text's length and hash (hostile texts reach 1 MiB; thousands
    /// are kept).
    pub message: (usize, u64),
    /// Timestamp, micros.
    pub timestamp: i64,
}

/// A text's length and hash, to compare it with a stored one.
pub fn text_digest(text: &str) -> (usize, u64) {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    (text.len(), h.finish())
}

/// What the answer to one frame may be.
#[derive(Debug, Clone, PartialEq)]
enum Want {
    /// An `Acknowledgment` naming this id (or an `Error`).
    Ack(Uuid),
    /// `LogResults` (or an `Error`).
    Results,
    /// `Status` (or an `Error`).
    Status,
    /// `Monitoring` (or an `Error`).
    Monitoring,
    /// Only an `Error`: the body does not decode, or is an answer.
    Error,
}

#[derive(Debug)]
struct Expect {
    want: Want,
    /// The codec decodes this frame as a request, so `InvalidMessage`
    /// would be wrong.
    decodes: bool,
    /// Row uuids a log or batch frame carries.
    logs: Vec<Uuid>,
}

/// The frames the daemon cut from the bytes written so far.
#[derive(Debug, Default)]
struct View {
    /// Bytes of the frame not yet complete.
    partial: Vec<u8>,
    /// A length prefix the daemon must refuse was written: it reads nothing
    /// after it and answers that frame with an `Error`, then closes.
    refused: bool,
    expected: VecDeque<Expect>,
}

impl View {
    fn feed(&mut self, bytes: &[u8], shared: &Shared) {
        if self.refused {
            return;
        }
        self.partial.extend_from_slice(bytes);
        let mut start = 0;
        loop {
            let rest = &self.partial[start..];
            match frame_body_len(rest) {
                Ok(Some(n)) if rest.len() >= HEADER_LEN + n => {
                    let body = &rest[HEADER_LEN..HEADER_LEN + n];
                    let expect = classify(body, shared);
                    self.expected.push_back(expect);
                    start += HEADER_LEN + n;
                }
                Ok(_) => break,
                Err(_) => {
                    self.refused = true;
                    self.expected.push_back(Expect {
                        want: Want::Error,
                        decodes: false,
                        logs: Vec::new(),
                    });
                    self.partial = Vec::new();
                    return;
                }
            }
        }
        self.partial.drain(..start);
    }
}

/// What the daemon owes for one frame body, and the logs it may store.
fn classify(body: &[u8], shared: &Shared) -> Expect {
    let Ok(msg) = decode_message(body) else {
        shared.stats.undecodable.fetch_add(1, Ordering::Relaxed);
        return Expect {
            want: Want::Error,
            decodes: false,
            logs: Vec::new(),
        };
    };
    shared.stats.decodable.fetch_add(1, Ordering::Relaxed);
    let candidate = |f: &codi_monitor::proto::LogFields| Candidate {
        level: f.level.as_str().to_owned(),
        component: f.component.clone(),
        message: text_digest(&f.message),
        timestamp: msg.timestamp.as_micros(),
    };
    let mut logs = Vec::new();
    match &msg.payload {
        Payload::LogEntry(f) => logs.push((msg.id, candidate(f))),
        Payload::LogBatch { entries } => {
            for (i, f) in entries.iter().enumerate() {
                logs.push((batch_entry_id(msg.id, i), candidate(f)));
            }
        }
        _ => {}
    }
    if !logs.is_empty() {
        let mut may = shared.may_store.lock().unwrap();
        for (id, c) in &logs {
            let list = may.entry(*id).or_default();
            if !list.contains(c) {
                list.push(c.clone());
            }
        }
    }
    let want = match &msg.payload {
        p if p.is_answer() => Want::Error,
        Payload::QueryLogs { .. } => Want::Results,
        Payload::GetStatus => Want::Status,
        Payload::ListMonitoring => Want::Monitoring,
        _ => Want::Ack(msg.id),
    };
    Expect {
        // An answer-only variant decodes but is answered `InvalidMessage`.
        decodes: want != Want::Error,
        want,
        logs: logs.into_iter().map(|(id, _)| id).collect(),
    }
}

/// How a hostile connection ends once its bytes are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Half-close and read every answer owed until the daemon closes.
    HalfClose,
    /// Close at once (possibly mid-frame, possibly with answers unread).
    Drop,
    /// Stay open, reading, until its lifetime ends.
    Linger,
}

/// One hostile connection.
pub struct Hostile {
    rng: Rng,
    token: String,
    /// Frames still to make.
    frames_left: usize,
    /// At most one frame near 1 MiB per connection.
    big_sent: bool,
    /// The last frame is cut short before the connection is dropped.
    cut_last: bool,
    stream: Stream,
    transport: Transport,
    out: Vec<u8>,
    written: usize,
    /// Most bytes per write (1 for a trickle).
    piece: usize,
    end: End,
    /// Reads answers at all (a client that never reads must not hurt).
    reads: bool,
    view: View,
    input: Vec<u8>,
    answers: usize,
    last_was_error: bool,
    half_closed: bool,
    write_failed: bool,
    dies: Instant,
}

/// Whether a connection goes on.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Still open.
    Open,
    /// Closed (by either side); drop it.
    Gone,
}

/// Connects over TCP from 127.0.0.2, so that the token guesses hostile
/// clients send are throttled against that address, not against the
/// bystanders' 127.0.0.1 (the daemon throttles failed `Authenticate`s per
/// source address; SECURITY.md).
fn connect_from_hostile_address(to: SocketAddr) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 2], 0)).into())?;
    socket.connect(&to.into())?;
    Ok(socket.into())
}

fn set_nonblocking(stream: &Stream) -> io::Result<()> {
    match stream {
        Stream::Unix(s) => s.set_nonblocking(true),
        Stream::Tcp(s) => s.set_nonblocking(true),
    }
}

impl Hostile {
    /// Opens a connection of a random kind and plans what it will send.
    /// `None` if connecting failed (counted; the daemon may be busy).
    pub fn open(
        rng: &mut Rng,
        socket: &Path,
        tcp: SocketAddr,
        token: &str,
        shared: &Shared,
    ) -> Option<Hostile> {
        let transport = match rng.below(4) {
            0 | 1 => Transport::Unix,
            2 => Transport::TcpAuthenticated,
            _ => Transport::TcpRaw,
        };
        let stream = match transport {
            Transport::Unix => UnixStream::connect(socket).map(Stream::Unix),
            _ => connect_from_hostile_address(tcp).map(|s| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        };
        let stream = match stream.and_then(|s| set_nonblocking(&s).map(|()| s)) {
            Ok(s) => s,
            Err(_) => {
                shared
                    .stats
                    .connect_failures
                    .fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        shared.stats.connections.fetch_add(1, Ordering::Relaxed);
        let mut out = Vec::new();
        if transport == Transport::TcpAuthenticated {
            let auth = Message::new(Payload::Authenticate {
                token: token.to_owned(),
            });
            encode_message(&auth, &mut out).unwrap();
        }
        // A pipelined burst now and then; the frames are made as the
        // previous ones go out (most connections end early).
        let frames_left = if rng.one_in(10) {
            rng.range(50, 400)
        } else {
            rng.range(1, 12)
        };
        let end = match rng.below(10) {
            0..=4 => End::HalfClose,
            5..=7 => End::Drop,
            _ => End::Linger,
        };
        let piece = match rng.below(10) {
            0 => 1,
            1 => rng.range(2, 16),
            2 => rng.range(17, 4096),
            _ => usize::MAX,
        };
        let lifetime = Duration::from_millis(rng.range(20, 3000) as u64);
        Some(Hostile {
            rng: rng.fork(),
            token: token.to_owned(),
            frames_left,
            big_sent: false,
            cut_last: end == End::Drop && rng.one_in(2),
            stream,
            transport,
            out,
            written: 0,
            piece,
            end,
            reads: !rng.one_in(15),
            view: View::default(),
            input: Vec::new(),
            answers: 0,
            last_was_error: false,
            half_closed: false,
            write_failed: false,
            dies: Instant::now() + lifetime,
        })
    }

    /// Writes, reads and checks what it can without blocking.
    pub fn step(&mut self, shared: &Shared) -> Step {
        self.write_some(shared);
        let all_written = self.written == self.out.len() && self.frames_left == 0;
        if all_written && !self.half_closed && !self.write_failed {
            match self.end {
                End::HalfClose => {
                    let _ = self.stream.shutdown_write();
                    self.half_closed = true;
                }
                End::Drop => return Step::Gone,
                End::Linger => {}
            }
        }
        if self.reads {
            if let Step::Gone = self.read_some(shared) {
                return Step::Gone;
            }
        }
        if Instant::now() >= self.dies {
            shared
                .stats
                .dropped_at_lifetime
                .fetch_add(1, Ordering::Relaxed);
            return Step::Gone;
        }
        Step::Open
    }

    /// Makes the next frame once everything before it is written.
    fn refill(&mut self, shared: &Shared) {
        if self.written < self.out.len() || self.frames_left == 0 {
            return;
        }
        self.out.clear();
        self.written = 0;
        // Pipelined: several frames in one write.
        while self.frames_left > 0 && self.out.len() < 64 * 1024 {
            self.frames_left -= 1;
            let (made, mut frame) = gen::hostile_frame(&mut self.rng, self.transport, &self.token);
            if made == Made::Big {
                if self.big_sent {
                    continue;
                }
                self.big_sent = true;
            }
            shared.stats.count(made);
            if self.frames_left == 0 && self.cut_last && frame.len() > 1 {
                let cut = self.rng.range(1, frame.len() - 1);
                frame.truncate(cut);
            }
            self.out.extend(frame);
        }
    }

    fn write_some(&mut self, shared: &Shared) {
        // A few pieces per step, so a trickle stays a trickle.
        for _ in 0..4 {
            self.refill(shared);
            if self.write_failed || self.written == self.out.len() {
                return;
            }
            let end = self.out.len().min(self.written.saturating_add(self.piece));
            match self.stream.write(&self.out[self.written..end]) {
                Ok(0) => self.write_failed = true,
                Ok(n) => {
                    self.view
                        .feed(&self.out[self.written..self.written + n], shared);
                    self.written += n;
                    shared.stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The daemon closed its side (after a refusal, or while we
                // sent after a bad frame).
                Err(_) => self.write_failed = true,
            }
        }
    }

    fn read_some(&mut self, shared: &Shared) -> Step {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.at_end_of_stream(shared);
                    return Step::Gone;
                }
                Ok(n) => {
                    self.input.extend_from_slice(&chunk[..n]);
                    self.take_answers(shared);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Open,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A reset: the daemon closed with our bytes unread.
                Err(_) => return Step::Gone,
            }
        }
    }

    fn take_answers(&mut self, shared: &Shared) {
        loop {
            let n = match frame_body_len(&self.input) {
                Ok(Some(n)) if self.input.len() >= HEADER_LEN + n => n,
                Ok(_) => return,
                Err(e) => {
                    shared.fail(format!("the daemon sent a bad length prefix: {e}"));
                    self.input.clear();
                    return;
                }
            };
            let decoded = decode_message(&self.input[HEADER_LEN..HEADER_LEN + n]);
            self.input.drain(..HEADER_LEN + n);
            match decoded {
                Ok(answer) => self.check_answer(answer, shared),
                Err(e) => {
                    // It still answered a frame: keep the rest in step.
                    self.answers += 1;
                    let frame = self.view.expected.pop_front();
                    shared.fail(format!(
                        "answer {} over {:?} ({n} bytes, to {frame:?}) cannot be decoded by any                          client: {e}",
                        self.answers, self.transport
                    ));
                }
            }
        }
    }

    fn check_answer(&mut self, answer: Message, shared: &Shared) {
        shared.stats.answers.fetch_add(1, Ordering::Relaxed);
        self.answers += 1;
        let n = self.answers;
        let expect = self.view.expected.pop_front();
        self.last_was_error = matches!(answer.payload, Payload::Error { .. });
        match (&answer.payload, &expect) {
            (Payload::Error { code, message, .. }, Some(e)) => {
                shared.stats.errors.fetch_add(1, Ordering::Relaxed);
                if e.decodes && *code == ErrorCode::InvalidMessage {
                    shared.fail(format!(
                        "answer {n} over {:?} is InvalidMessage ({message}) to a frame the codec \
                         decodes ({e:?})",
                        self.transport
                    ));
                }
            }
            // An error ahead of every frame: the connection limit.
            (Payload::Error { .. }, None) => {
                shared.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
            (Payload::Acknowledgment { request_id, status }, Some(e))
                if e.want == Want::Ack(*request_id) =>
            {
                match status {
                    AckStatus::Accepted => {
                        shared
                            .hostile_accepted
                            .lock()
                            .unwrap()
                            .extend(e.logs.iter().copied());
                    }
                    AckStatus::Rejected(_) => {
                        shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    }
                    AckStatus::Queued => shared.fail(format!(
                        "answer {n} is Queued, which only a fire-and-forget client may get"
                    )),
                }
            }
            (Payload::LogResults { .. }, Some(e)) if e.want == Want::Results => {}
            (Payload::Status { .. }, Some(e)) if e.want == Want::Status => {}
            (Payload::Monitoring { .. }, Some(e)) if e.want == Want::Monitoring => {}
            (other, e) => shared.fail(format!(
                "answer {n} over {:?} is {} {:?} but the frame it answers wants {e:?}",
                self.transport,
                other.name(),
                match other {
                    Payload::Acknowledgment { request_id, status } => {
                        format!("{request_id} {status:?}")
                    }
                    _ => String::new(),
                }
            )),
        }
    }

    /// The daemon closed. After a half-close it must first have answered
    /// every frame, unless it closed for a reason it gave in an `Error`
    /// (a bad length, a refused connection, a failed authentication).
    fn at_end_of_stream(&mut self, shared: &Shared) {
        shared
            .stats
            .closed_by_daemon
            .fetch_add(1, Ordering::Relaxed);
        let owed = self.view.expected.len();
        let checked = self.half_closed
            && !self.write_failed
            && self.transport != Transport::TcpRaw
            && !self.last_was_error;
        if checked && owed > 0 {
            shared.fail(format!(
                "the daemon closed a half-closed {:?} connection owing {owed} answers (after {} \
                 answers; next owed: {:?})",
                self.transport, self.answers, self.view.expected[0]
            ));
        }
    }
}

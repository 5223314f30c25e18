//! One blocking connection to the daemon over a Unix or TCP stream.
//!
//! Frames are written whole with one `write_all`; answers are read into a
//! reusable buffer and decoded once each. The declared length of an incoming
//! frame is checked before the buffer grows, so a corrupt or hostile peer
//! cannot make the client allocate more than one maximum frame.
//!
//! Connecting is also where the client decides whom to trust: a Unix
//! socket is used only if the way to it passes
//! [`crate::fsperm::check_socket_path`] and the process behind it runs as a
//! trusted user (`SO_PEERCRED`); a loopback TCP address only if the kernel's
//! socket table says a trusted user listens there (see [`super::peer`]).
//! Nothing, not even the token, is sent before that.

use super::peer;
use crate::fsperm::{self, SocketPathError, TrustedUsers};
use crate::proto::{
    decode_message, encode_message, frame_body_len, DecodeError, EncodeError, FrameError, Message,
    HEADER_LEN,
};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

/// Bytes the read buffer starts with and grows by.
const READ_CHUNK: usize = 64 * 1024;
/// Room for a path in a Unix socket address (`sun_path`), with its NUL.
const MAX_SUN_PATH: usize = 108;

/// Where a daemon may listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix stream socket.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// Why a connection failed.
#[derive(Debug, Error)]
pub enum ConnError {
    /// Connecting failed.
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        /// The endpoint tried.
        endpoint: Endpoint,
        /// Why.
        source: io::Error,
    },
    /// Reading or writing failed.
    #[error("connection to {endpoint} failed: {source}")]
    Io {
        /// The endpoint.
        endpoint: Endpoint,
        /// Why.
        source: io::Error,
    },
    /// No answer within the timeout.
    #[error("no answer from {0} within the timeout")]
    Timeout(Endpoint),
    /// The daemon closed the connection.
    #[error("{0} closed the connection")]
    Closed(Endpoint),
    /// The daemon sent an impossible length prefix.
    #[error("bad frame from the daemon: {0}")]
    Frame(#[from] FrameError),
    /// The daemon sent a body that is not a message.
    #[error("bad answer from the daemon: {0}")]
    Decode(#[from] DecodeError),
    /// The request cannot be sent (too large).
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// Something listens, but not someone this client trusts: nothing was
    /// sent to it. Counts as "no daemon here".
    #[error("not using {endpoint}: {reason}")]
    Untrusted {
        /// The endpoint.
        endpoint: Endpoint,
        /// What is wrong with it, as a sentence that names the path or
        /// address.
        reason: String,
    },
}

impl ConnError {
    /// True for failures a reconnect and resend may cure.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ConnError::Connect { .. }
                | ConnError::Io { .. }
                | ConnError::Timeout(_)
                | ConnError::Closed(_)
        )
    }

    /// True when no daemon of ours listens at the endpoint: the socket file
    /// is missing, the connection was refused, or what answers is not
    /// trusted. The daemon is down.
    pub fn is_daemon_down(&self) -> bool {
        match self {
            ConnError::Connect { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ),
            ConnError::Untrusted { .. } => true,
            _ => false,
        }
    }
}

/// A blocking stream of either kind: what [`Connection`] runs on, and what
/// the integration tests drive raw bytes through.
#[derive(Debug)]
pub enum Stream {
    /// Over the Unix socket.
    Unix(UnixStream),
    /// Over TCP.
    Tcp(TcpStream),
}

impl Stream {
    /// A second handle to the same socket (for a separate sending thread).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    /// Sets how long a read may block.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// Sets how long a write may block.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }

    /// Half-closes: no more bytes will be sent.
    pub fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

/// A blocking connection with read and write timeouts.
#[derive(Debug)]
pub struct Connection {
    stream: Stream,
    endpoint: Endpoint,
    /// Received bytes; `rbuf[start..end]` is not yet decoded.
    rbuf: Vec<u8>,
    start: usize,
    end: usize,
    /// Encoding scratch, reused.
    wbuf: Vec<u8>,
}

impl Connection {
    /// Connects to `endpoint` if it belongs to one of the `trusted` users
    /// (see the module docs; a TCP address beyond loopback is not checked:
    /// it was asked for explicitly); `timeout` bounds the TCP connect and
    /// every later read and write. A zero timeout is treated as one
    /// millisecond.
    pub fn connect(
        endpoint: &Endpoint,
        timeout: Duration,
        trusted: &TrustedUsers,
    ) -> Result<Connection, ConnError> {
        let timeout = timeout.max(Duration::from_millis(1));
        let connect_err = |source| ConnError::Connect {
            endpoint: endpoint.clone(),
            source,
        };
        let untrusted = |reason: String| ConnError::Untrusted {
            endpoint: endpoint.clone(),
            reason,
        };
        let stream = match endpoint {
            Endpoint::Unix(path) => {
                let real = fsperm::check_socket_path(path, trusted).map_err(|e| match e {
                    SocketPathError::Io(source) => connect_err(source),
                    SocketPathError::Untrusted(u) => untrusted(u.to_string()),
                })?;
                // The checked path, unless it is too long for a socket
                // address; then the given one (the peer check still holds).
                let target = if real.as_os_str().len() < MAX_SUN_PATH {
                    real.as_path()
                } else {
                    path.as_path()
                };
                let s = UnixStream::connect(target).map_err(connect_err)?;
                peer::check_unix_peer(&s, trusted).map_err(|why| {
                    untrusted(format!("the process listening on {} {why}", path.display()))
                })?;
                s.set_read_timeout(Some(timeout)).map_err(connect_err)?;
                s.set_write_timeout(Some(timeout)).map_err(connect_err)?;
                Stream::Unix(s)
            }
            Endpoint::Tcp(addr) => {
                let s = TcpStream::connect_timeout(addr, timeout).map_err(connect_err)?;
                if peer::is_loopback(addr.ip()) {
                    peer::check_tcp_peer(&s, trusted).map_err(|why| {
                        untrusted(format!(
                            "the process listening on {addr} {why}; not sending it the token or any request"
                        ))
                    })?;
                }
                s.set_nodelay(true).map_err(connect_err)?;
                s.set_read_timeout(Some(timeout)).map_err(connect_err)?;
                s.set_write_timeout(Some(timeout)).map_err(connect_err)?;
                Stream::Tcp(s)
            }
        };
        Ok(Connection {
            stream,
            endpoint: endpoint.clone(),
            rbuf: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
            wbuf: Vec::new(),
        })
    }

    /// The endpoint this connection reached.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Says goodbye on a connection given up on: the daemon (one draining
    /// to stop, above all) closes its end at once instead of waiting for
    /// this client to go.
    pub fn hang_up(&self) {
        let _ = self.stream.shutdown_write();
    }

    fn io_error(&self, source: io::Error) -> ConnError {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                ConnError::Timeout(self.endpoint.clone())
            }
            _ => ConnError::Io {
                endpoint: self.endpoint.clone(),
                source,
            },
        }
    }

    /// Writes one message as one frame.
    pub fn send(&mut self, msg: &Message) -> Result<(), ConnError> {
        self.wbuf.clear();
        encode_message(msg, &mut self.wbuf)?;
        if let Err(e) = self.stream.write_all(&self.wbuf) {
            return Err(self.io_error(e));
        }
        Ok(())
    }

    /// Reads the next message, blocking up to the timeout for each read.
    pub fn recv(&mut self) -> Result<Message, ConnError> {
        loop {
            let pending = &self.rbuf[self.start..self.end];
            let needed = match frame_body_len(pending)? {
                Some(body) if pending.len() >= HEADER_LEN + body => {
                    let frame = &pending[HEADER_LEN..HEADER_LEN + body];
                    let decoded = decode_message(frame);
                    self.start += HEADER_LEN + body;
                    if self.start == self.end {
                        self.start = 0;
                        self.end = 0;
                    }
                    return Ok(decoded?);
                }
                Some(body) => HEADER_LEN + body,
                None => HEADER_LEN,
            };
            self.make_room(needed);
            let n = match self.stream.read(&mut self.rbuf[self.end..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_error(e)),
            };
            if n == 0 {
                return Err(ConnError::Closed(self.endpoint.clone()));
            }
            self.end += n;
        }
    }

    /// Ensures the buffer can hold a frame of `needed` bytes from `start`,
    /// with free space after `end`.
    fn make_room(&mut self, needed: usize) {
        if self.start > 0 && self.start + needed > self.rbuf.len() {
            self.rbuf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let want = (self.start + needed).max(self.end + 1);
        if want > self.rbuf.len() {
            let grown = want.max(self.rbuf.len() + READ_CHUNK);
            self.rbuf.resize(grown, 0);
        }
    }

    /// Sends `msg` and waits for the next answer.
    pub fn request(&mut self, msg: &Message) -> Result<Message, ConnError> {
        self.send(msg)?;
        self.recv()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{AckStatus, Payload, MAX_FRAME_LEN};
    use std::os::unix::net::UnixListener;
    use std::thread;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let conn = Connection {
            stream: Stream::Unix(a),
            endpoint: Endpoint::Unix("/pair".into()),
            rbuf: vec![0; 16],
            start: 0,
            end: 0,
            wbuf: Vec::new(),
        };
        (conn, b)
    }

    fn frame(msg: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        encode_message(msg, &mut out).unwrap();
        out
    }

    #[test]
    fn endpoints_display_with_their_scheme() {
        assert_eq!(Endpoint::Unix("/a/b".into()).to_string(), "unix:/a/b");
        let tcp = Endpoint::Tcp("127.0.0.1:9847".parse().unwrap());
        assert_eq!(tcp.to_string(), "tcp:127.0.0.1:9847");
    }

    #[test]
    fn decodes_frames_split_and_joined_across_reads() {
        let (mut conn, mut peer) = pair();
        let msgs: Vec<Message> = (0..5)
            .map(|i| {
                Message::ack(
                    uuid::Uuid::from_u128(i),
                    AckStatus::Rejected("x".repeat(i as usize * 40)),
                )
            })
            .collect();
        let bytes: Vec<u8> = msgs.iter().flat_map(frame).collect();
        let writer = thread::spawn(move || {
            // Odd-sized pieces: headers and bodies straddle reads.
            for chunk in bytes.chunks(7) {
                peer.write_all(chunk).unwrap();
            }
            peer
        });
        for m in &msgs {
            assert_eq!(&conn.recv().unwrap(), m);
        }
        drop(writer.join().unwrap());
        assert!(matches!(conn.recv(), Err(ConnError::Closed(_))));
    }

    #[test]
    fn oversized_length_is_an_error_before_allocating() {
        let (mut conn, mut peer) = pair();
        peer.write_all(&((MAX_FRAME_LEN as u32) + 1).to_le_bytes())
            .unwrap();
        assert!(matches!(
            conn.recv(),
            Err(ConnError::Frame(FrameError::TooLarge(_)))
        ));
        assert!(conn.rbuf.len() <= READ_CHUNK);
    }

    #[test]
    fn undecodable_body_keeps_the_stream_in_step() {
        let (mut conn, mut peer) = pair();
        peer.write_all(&3u32.to_le_bytes()).unwrap();
        peer.write_all(&[0xc1, 0xc1, 0xc1]).unwrap();
        let ok = Message::new(Payload::Ping);
        peer.write_all(&frame(&ok)).unwrap();
        assert!(matches!(conn.recv(), Err(ConnError::Decode(_))));
        assert_eq!(conn.recv().unwrap(), ok);
    }

    #[test]
    fn request_writes_one_frame_and_reads_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut header = [0u8; 4];
            s.read_exact(&mut header).unwrap();
            let mut body = vec![0; u32::from_le_bytes(header) as usize];
            s.read_exact(&mut body).unwrap();
            let req = decode_message(&body).unwrap();
            s.write_all(&frame(&Message::ack(req.id, AckStatus::Accepted)))
                .unwrap();
            req
        });
        let me = TrustedUsers::current(None);
        let mut conn =
            Connection::connect(&Endpoint::Unix(path), Duration::from_secs(10), &me).unwrap();
        let req = Message::new(Payload::Ping);
        let answer = conn.request(&req).unwrap();
        assert_eq!(server.join().unwrap(), req);
        assert_eq!(
            answer.payload,
            Payload::Acknowledgment {
                request_id: req.id,
                status: AckStatus::Accepted
            }
        );
    }

    #[test]
    fn missing_socket_means_daemon_down() {
        let dir = tempfile::tempdir().unwrap();
        let e = Connection::connect(
            &Endpoint::Unix(dir.path().join("none.sock")),
            Duration::from_secs(1),
            &TrustedUsers::current(None),
        )
        .unwrap_err();
        assert!(e.is_daemon_down(), "{e}");
        assert!(e.is_transient());
    }
}

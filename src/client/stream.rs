//! `codi2 log -`: one log per input line, sent as pipelined `LogBatch`es.
//!
//! A reader thread parses lines into a bounded channel; the sender takes
//! whatever is there. When input pauses and nothing is in flight, a partial
//! batch goes out at once (low latency for `tail -f | codi2 log -`); while
//! answers are pending, the batch keeps filling instead (group commit, like
//! the daemon's writer). At most `window` batches are unanswered at a time.

use super::input::{self, Batcher, LineDefaults};
use super::{Answered, Client, ClientError};
use crate::proto::{AckStatus, LogFields, Message, Payload};
use crossbeam_channel::{Receiver, TryRecvError};
use std::io::BufRead;
use std::thread;

/// Batches in flight at once.
pub const WINDOW: usize = 8;
/// Lines buffered between the reader thread and the sender.
pub const LINE_QUEUE: usize = 8192;

/// A parsed input line, or why it cannot be sent.
pub type Line = Result<LogFields, String>;

/// What became of the input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Logs acknowledged as stored.
    pub accepted: usize,
    /// Logs in batches the daemon rejected.
    pub rejected: usize,
    /// Lines that could not be parsed or sent at all.
    pub bad_lines: usize,
}

/// Reads `reader` line by line on its own thread; blank lines are skipped,
/// invalid ones arrive as `Err` with their line number.
pub fn spawn_reader<R: BufRead + Send + 'static>(
    mut reader: R,
    defaults: LineDefaults,
) -> Receiver<Line> {
    let (tx, rx) = crossbeam_channel::bounded(LINE_QUEUE);
    thread::spawn(move || {
        let mut buf = Vec::new();
        let mut number = 0u64;
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(format!("cannot read input: {e}")));
                    break;
                }
            }
            number += 1;
            let line = String::from_utf8_lossy(&buf);
            let parsed = match input::parse_line(&line, &defaults) {
                Ok(None) => continue,
                Ok(Some(f)) => Ok(f),
                Err(e) => Err(format!("line {number}: {e}")),
            };
            if tx.send(parsed).is_err() {
                break;
            }
        }
    });
    rx
}

/// What the input has for the sender now.
enum Next {
    Batch(Vec<LogFields>),
    /// Nothing new yet while answers are pending: collect one.
    Idle,
    Eof,
}

fn next_batch(
    rx: &Receiver<Line>,
    batcher: &mut Batcher,
    in_flight: usize,
    report: &mut Report,
    warn: &mut dyn FnMut(&str),
) -> Next {
    loop {
        let line = if in_flight == 0 && batcher.is_empty() {
            match rx.recv() {
                Ok(line) => line,
                Err(_) => return Next::Eof,
            }
        } else {
            match rx.try_recv() {
                Ok(line) => line,
                Err(TryRecvError::Empty) if in_flight > 0 => return Next::Idle,
                Err(_) => {
                    return match batcher.take() {
                        Some(b) => Next::Batch(b),
                        None if in_flight > 0 => Next::Idle,
                        None => Next::Eof,
                    }
                }
            }
        };
        match line.and_then(|entry| batcher.push(entry)) {
            Ok(Some(batch)) => return Next::Batch(batch),
            Ok(None) => {}
            Err(e) => {
                warn(&e);
                report.bad_lines += 1;
            }
        }
    }
}

/// Counts one answered batch.
fn absorb(
    done: Answered,
    report: &mut Report,
    warn: &mut dyn FnMut(&str),
) -> Result<(), ClientError> {
    let Payload::LogBatch { entries } = &done.request.payload else {
        return Err(ClientError::Protocol("answer to an unknown request".into()));
    };
    let why = match done.answer.payload {
        Payload::Acknowledgment {
            status: AckStatus::Accepted | AckStatus::Queued,
            ..
        } => {
            report.accepted += entries.len();
            return Ok(());
        }
        Payload::Acknowledgment {
            status: AckStatus::Rejected(why),
            ..
        } => why,
        Payload::Error { code, message, .. } => format!("{code}: {message}"),
        other => {
            return Err(ClientError::Protocol(format!(
                "unexpected {} answer to LogBatch",
                other.name()
            )))
        }
    };
    warn(&format!("batch of {} logs rejected: {why}", entries.len()));
    report.rejected += entries.len();
    Ok(())
}

/// Sends every line of `rx` with at most `window` batches unanswered.
/// `connect` runs on the first batch only, so empty input touches neither
/// the daemon nor the database. `warn` receives one sentence per bad line or
/// rejected batch.
pub fn send_lines(
    rx: &Receiver<Line>,
    connect: impl FnOnce() -> Result<Client, ClientError>,
    window: usize,
    warn: &mut dyn FnMut(&str),
) -> Result<Report, ClientError> {
    let window = window.max(1);
    let mut report = Report::default();
    let mut batcher = Batcher::default();
    let mut connect = Some(connect);
    let mut client: Option<Client> = None;
    loop {
        let in_flight = client.as_ref().map_or(0, Client::pending);
        let next = if in_flight >= window {
            Next::Idle
        } else {
            next_batch(rx, &mut batcher, in_flight, &mut report, warn)
        };
        match next {
            Next::Batch(entries) => {
                let c = match &mut client {
                    Some(c) => c,
                    None => {
                        let connect = connect.take().expect("connects once");
                        client.insert(connect()?)
                    }
                };
                c.send(Message::new(Payload::LogBatch { entries }))?;
            }
            Next::Idle => {
                let c = client.as_mut().expect("answers pending imply a client");
                if let Some(done) = c.recv()? {
                    absorb(done, &mut report, warn)?;
                }
            }
            Next::Eof => return Ok(report),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::conn::Endpoint;
    use crate::client::{ClientOptions, RetryPolicy};
    use crate::proto::{decode_message, encode_message, frame_body_len, LogLevel, HEADER_LEN};
    use std::io::{Cursor, Read, Write};
    use std::os::unix::net::UnixListener;
    use std::time::Duration;

    fn defaults() -> LineDefaults {
        LineDefaults {
            level: LogLevel::Info,
            component: "t".into(),
            session_id: None,
            metadata: None,
        }
    }

    #[test]
    fn reader_numbers_bad_lines_and_skips_blank_ones() {
        let text = "a\n\n{\"message\":\"b\",\"level\":\"nope\"}\nc";
        let rx = spawn_reader(Cursor::new(text.as_bytes().to_vec()), defaults());
        let got: Vec<Line> = rx.iter().collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].as_ref().unwrap().message, "a");
        assert!(got[1].as_ref().unwrap_err().starts_with("line 3: "));
        assert_eq!(got[2].as_ref().unwrap().message, "c");
    }

    #[test]
    fn empty_input_never_connects() {
        let rx = spawn_reader(Cursor::new(Vec::new()), defaults());
        let report = send_lines(&rx, || panic!("must not connect"), WINDOW, &mut |_| {}).unwrap();
        assert_eq!(report, Report::default());
    }

    #[test]
    fn lines_arrive_in_order_in_pipelined_batches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut messages = Vec::new();
            let mut n = 0;
            loop {
                let mut header = [0u8; HEADER_LEN];
                if s.read_exact(&mut header).is_err() {
                    break;
                }
                let mut body = vec![0; frame_body_len(&header).unwrap().unwrap()];
                s.read_exact(&mut body).unwrap();
                let req = decode_message(&body).unwrap();
                // The second batch is refused.
                let status = if n == 1 {
                    AckStatus::Rejected("disk full".into())
                } else {
                    AckStatus::Accepted
                };
                n += 1;
                let mut out = Vec::new();
                encode_message(&Message::ack(req.id, status), &mut out).unwrap();
                s.write_all(&out).unwrap();
                messages.push(req);
            }
            messages
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..2500 {
            let mut f = input::parse_line(&i.to_string(), &defaults())
                .unwrap()
                .unwrap();
            f.level = LogLevel::Debug;
            tx.send(Ok(f)).unwrap();
        }
        tx.send(Err("line 2501: bad".into())).unwrap();
        drop(tx);
        let opts = ClientOptions {
            endpoints: vec![Endpoint::Unix(path)],
            token: None,
            trusted: crate::fsperm::TrustedUsers::current(None),
            timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            standalone_db: None,
            notice: |_| {},
        };
        let mut warnings = Vec::new();
        let report = send_lines(&rx, || Client::connect(opts), WINDOW, &mut |w| {
            warnings.push(w.to_owned())
        })
        .unwrap();
        let messages = server.join().unwrap();
        let sizes: Vec<usize> = messages
            .iter()
            .map(|m| match &m.payload {
                Payload::LogBatch { entries } => entries.len(),
                other => panic!("unexpected {}", other.name()),
            })
            .collect();
        assert_eq!(sizes, [1000, 1000, 500]);
        let texts: Vec<String> = messages
            .iter()
            .flat_map(|m| match &m.payload {
                Payload::LogBatch { entries } => {
                    entries.iter().map(|e| e.message.clone()).collect()
                }
                _ => Vec::new(),
            })
            .collect();
        let expected: Vec<String> = (0..2500).map(|i| i.to_string()).collect();
        assert_eq!(texts, expected);
        assert_eq!(
            report,
            Report {
                accepted: 1500,
                rejected: 1000,
                bad_lines: 1
            }
        );
        assert_eq!(
            warnings,
            ["line 2501: bad", "batch of 1000 logs rejected: disk full"]
        );
    }
}

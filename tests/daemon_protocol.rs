//! Integration tests: the real `codi-monitor` (and `codi2`) binaries, each
//! test with its own daemon in its own temporary directory, spoken to over
//! the real Unix and TCP sockets, with the database inspected directly.
//!
//! No assertion depends on timing: deadlines only protect against hangs.
//!
//! This file: pipelined requests and bad frames.

#[allow(dead_code)]
mod common;

use codi_monitor::proto::{
    encode_message, AckStatus, ErrorCode, LogFilter, LogLevel, Message, Payload, MAX_FRAME_LEN,
};
use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;
use uuid::Uuid;

/// Test 2: pipelining.
mod pipelining {
    use super::*;

    #[derive(Debug)]
    enum Want {
        Ack(Uuid),
        Results,
    }

    fn pipeline_500(mut c: Client, db: &Db) {
        let mut sent = Vec::new();
        let mut bytes = Vec::new();
        let mut logs = 0;
        for i in 0..500 {
            let (msg, want) = match i % 5 {
                0 | 1 => {
                    logs += 1;
                    let m = log(LogLevel::Info, "pipe", &format!("log {i}"));
                    let id = m.id;
                    (m, Want::Ack(id))
                }
                2 => {
                    let m = Message::new(Payload::Ping);
                    let id = m.id;
                    (m, Want::Ack(id))
                }
                3 => (
                    query(
                        LogFilter {
                            component: Some("pipe".into()),
                            ..LogFilter::default()
                        },
                        5,
                    ),
                    Want::Results,
                ),
                _ => {
                    logs += 3;
                    let m = batch(
                        (0..3)
                            .map(|j| fields(LogLevel::Debug, "pipe", &format!("b {i}.{j}")))
                            .collect(),
                    );
                    let id = m.id;
                    (m, Want::Ack(id))
                }
            };
            encode_message(&msg, &mut bytes).unwrap();
            sent.push(want);
        }
        let mut writer = c.try_clone();
        let send = thread::spawn(move || writer.send_raw(&bytes).unwrap());
        for (i, want) in sent.iter().enumerate() {
            let answer = c.recv();
            match want {
                Want::Ack(id) => {
                    let (request_id, status) = ack(&answer);
                    assert_eq!(request_id, *id, "answer {i} out of order");
                    assert_eq!(status, &AckStatus::Accepted, "answer {i}");
                }
                Want::Results => {
                    results(&answer);
                }
            }
        }
        send.join().unwrap();
        c.ping();
        assert_eq!(db.count_logs(), logs);
    }

    #[test]
    fn five_hundred_mixed_requests_are_answered_in_order_over_unix() {
        let d = Daemon::start_default();
        pipeline_500(d.unix(), &d.db());
    }

    #[test]
    fn five_hundred_mixed_requests_are_answered_in_order_over_tcp() {
        let d = Daemon::start_default();
        pipeline_500(d.tcp(), &d.db());
    }

    /// Regression: more immediately-answered requests than
    /// `max_pending_per_connection` (1024) paused the connection for backlog;
    /// over TCP the answers all fit in the socket, no writable edge came, and
    /// the rest were never read.
    #[test]
    fn more_pipelined_pings_than_the_pending_limit_are_all_answered_over_tcp() {
        let d = Daemon::start_default();
        let mut c = d.tcp();
        let mut bytes = Vec::new();
        let ids: Vec<Uuid> = (0..3000)
            .map(|_| {
                let m = Message::new(Payload::Ping);
                encode_message(&m, &mut bytes).unwrap();
                m.id
            })
            .collect();
        let mut writer = c.try_clone();
        let send = thread::spawn(move || writer.send_raw(&bytes).unwrap());
        for (i, id) in ids.iter().enumerate() {
            let answer = c.recv();
            let (request_id, status) = ack(&answer);
            assert_eq!(request_id, *id, "answer {i} out of order");
            assert_eq!(status, &AckStatus::Accepted);
        }
        send.join().unwrap();
    }

    #[test]
    fn a_half_closed_client_still_gets_every_answer() {
        let d = Daemon::start_default();
        let mut c = d.unix();
        let msgs: Vec<Message> = (0..100)
            .map(|i| log(LogLevel::Info, "half", &format!("h{i}")))
            .collect();
        let mut bytes = Vec::new();
        for m in &msgs {
            encode_message(m, &mut bytes).unwrap();
        }
        c.send_raw(&bytes).unwrap();
        c.shutdown_write();
        for m in &msgs {
            assert_accepted(&c.recv(), m.id);
        }
        c.expect_eof();
        assert_eq!(d.db().count_logs(), 100);
    }

    #[test]
    fn frames_and_the_close_queued_before_the_first_read_are_all_handled() {
        // The frames and the end of the stream reach the socket before the
        // daemon first reads it, so one read takes every byte and only a
        // further read sees the end: a read that came back short must not
        // end reading here.
        // Many connections opened at once, so that the daemon registers
        // most of them only after their bytes and their close are queued.
        let d = Daemon::start_default();
        let clients: Vec<(Client, Message)> = (0..200)
            .map(|n| {
                let mut c = if n % 2 == 0 { d.unix() } else { d.tcp() };
                let msg = log(LogLevel::Info, "queued", &format!("q{n}"));
                let mut bytes = Vec::new();
                encode_message(&msg, &mut bytes).unwrap();
                c.send_raw(&bytes).unwrap();
                c.shutdown_write();
                (c, msg)
            })
            .collect();
        for (mut c, msg) in clients {
            assert_accepted(&c.recv(), msg.id);
            c.expect_eof();
        }
        assert_eq!(d.db().count_logs(), 200);
    }

    #[test]
    fn frames_dribbled_one_byte_at_a_time_are_decoded() {
        let d = Daemon::start_default();
        let mut c = d.tcp();
        let msgs = [
            log(LogLevel::Info, "dribble", "one"),
            Message::new(Payload::Ping),
            log(LogLevel::Info, "dribble", "two"),
        ];
        let mut bytes = Vec::new();
        for m in &msgs {
            encode_message(m, &mut bytes).unwrap();
        }
        for b in bytes {
            c.send_raw(&[b]).unwrap();
        }
        for m in &msgs {
            assert_accepted(&c.recv(), m.id);
        }
        assert_eq!(d.db().count_logs(), 2);
    }
}

/// Test 3: bad frames.
mod frames {
    use super::*;

    fn header(len: u32) -> [u8; 4] {
        len.to_le_bytes()
    }

    fn frame(msg: &Message) -> Vec<u8> {
        let mut v = Vec::new();
        encode_message(msg, &mut v).unwrap();
        v
    }

    /// Regression (review): closing a TCP socket that still has unread input
    /// sends a reset, and a reset can make the client drop answers it has
    /// not read yet; "every request before the bad frame still gets its
    /// answer first" needs a lingering close.
    #[test]
    fn answers_before_a_bad_frame_survive_a_client_that_keeps_sending_over_tcp() {
        let d = Daemon::start_default();
        let mut c = d.tcp();
        let ping = Message::new(Payload::Ping);
        let entry = log(LogLevel::Info, "linger", "before the bad frame");
        let mut bytes = frame(&ping);
        bytes.extend(frame(&entry));
        bytes.extend(header(MAX_FRAME_LEN as u32 + 1));
        // More bytes behind the bad frame, already queued when the daemon
        // reads it, as a pipelining client's would be.
        bytes.extend(vec![0xa5u8; 256 * 1024]);
        let mut writer = c.try_clone();
        let send = thread::spawn(move || {
            let _ = writer.send_raw(&bytes);
        });
        // Read only once the daemon has answered and closed its side.
        thread::sleep(Duration::from_millis(300));
        let first = c.recv();
        assert_eq!(ack(&first).0, ping.id);
        let second = c.recv();
        assert_eq!(ack(&second), (entry.id, &AckStatus::Accepted));
        assert_error(&c.recv(), ErrorCode::FrameTooLarge);
        c.expect_clean_eof();
        send.join().unwrap();
        assert!(d.db().row(entry.id).is_some());
    }

    /// A `LogEntry` whose encoded body is exactly `target` bytes.
    fn log_with_body_len(target: usize) -> Message {
        let mut msg = log(LogLevel::Info, "big", &"m".repeat(target - 1000));
        let body_len = |m: &Message| rmp_serde::to_vec_named(m).unwrap().len();
        let current = body_len(&msg);
        if let Payload::LogEntry(f) = &mut msg.payload {
            f.message = "m".repeat(f.message.len() + target - current);
        }
        assert_eq!(body_len(&msg), target);
        msg
    }

    /// Pings over its own connection until stopped; returns how many.
    fn pinger(d: &Daemon, stop: Arc<AtomicBool>) -> thread::JoinHandle<usize> {
        let mut c = d.unix();
        thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                c.ping();
                n += 1;
            }
            n
        })
    }

    #[test]
    fn bad_frames_close_only_their_connection() {
        let mut d = Daemon::start_default();
        let stop = Arc::new(AtomicBool::new(false));
        let pings = pinger(&d, Arc::clone(&stop));

        // A zero-length header cannot be resynchronised.
        let mut c = d.unix();
        c.send_raw(&header(0)).unwrap();
        assert_error(&c.recv(), ErrorCode::InvalidFrame);
        c.expect_eof();

        // Neither can a length above 1 MiB, announced before any body.
        let mut c = d.tcp();
        c.send_raw(&header(MAX_FRAME_LEN as u32 + 1)).unwrap();
        assert_error(&c.recv(), ErrorCode::FrameTooLarge);
        c.expect_eof();
        let mut c = d.unix();
        c.send_raw(&header(u32::MAX)).unwrap();
        assert_error(&c.recv(), ErrorCode::FrameTooLarge);
        c.expect_eof();

        // A garbage body keeps the framing: same connection goes on.
        let mut c = d.unix();
        for garbage in [
            &[0xc1u8][..],                                     // never-used MessagePack byte
            &[0x81, 0xa5, b'h', b'e', b'l', b'l', b'o', 0x01], // {"hello": 1}
            &[0x93, 0x01, 0x02],                               // truncated array
            b"\xa5not a message",
        ] {
            let mut bytes = header(garbage.len() as u32).to_vec();
            bytes.extend_from_slice(garbage);
            c.send_raw(&bytes).unwrap();
            assert_error(&c.recv(), ErrorCode::InvalidMessage);
        }
        c.ping();
        c.expect_accepted(&log(LogLevel::Info, "frames", "after garbage"));

        // Requests before a bad frame are still answered, in order, first.
        for (bad, code) in [
            (header(0), ErrorCode::InvalidFrame),
            (header(MAX_FRAME_LEN as u32 + 1), ErrorCode::FrameTooLarge),
        ] {
            let mut c = d.unix();
            let first = log(LogLevel::Info, "frames", "before the bad frame");
            let second = Message::new(Payload::Ping);
            let mut bytes = frame(&first);
            bytes.extend(frame(&second));
            bytes.extend_from_slice(&bad);
            bytes.extend(frame(&Message::new(Payload::Ping)));
            c.send_raw(&bytes).unwrap();
            assert_accepted(&c.recv(), first.id);
            assert_accepted(&c.recv(), second.id);
            assert_error(&c.recv(), code);
            c.expect_eof();
            assert_eq!(d.db().count_uuid(first.id), 1);
        }

        // A frame cut short by the client's close harms nobody.
        let mut c = d.unix();
        let mut bytes = header(100).to_vec();
        bytes.extend_from_slice(&[0x80; 10]);
        c.send_raw(&bytes).unwrap();
        drop(c);
        let mut c = d.tcp();
        c.send_raw(&[5, 0]).unwrap();
        drop(c);
        let mut c = d.unix();
        let whole = log(LogLevel::Info, "frames", "answered before the cut");
        let mut bytes = frame(&whole);
        bytes.extend_from_slice(&header(50));
        bytes.extend_from_slice(b"partial");
        c.send_raw(&bytes).unwrap();
        c.shutdown_write();
        assert_accepted(&c.recv(), whole.id);
        c.expect_eof();

        d.unix().ping();
        d.tcp().ping();
        stop.store(true, Ordering::Relaxed);
        let n = pings
            .join()
            .expect("the parallel client was never disturbed");
        assert!(n > 0);
        assert!(d.is_running());
    }

    /// A `LogBatch` of three logs whose encoded body is exactly `target`
    /// bytes (each log stays under the row bound of 512 KiB).
    fn batch_with_body_len(target: usize) -> Message {
        let part = (target - 1000) / 3;
        let mut msg = batch(
            (0..3)
                .map(|_| fields(LogLevel::Info, "big", &"m".repeat(part)))
                .collect(),
        );
        let body_len = |m: &Message| rmp_serde::to_vec_named(m).unwrap().len();
        let current = body_len(&msg);
        if let Payload::LogBatch { entries } = &mut msg.payload {
            entries[2].message = "m".repeat(part + target - current);
        }
        assert_eq!(body_len(&msg), target);
        msg
    }

    #[test]
    fn a_frame_of_exactly_one_mebibyte_is_accepted() {
        let d = Daemon::start_default();
        let mut c = d.unix();
        let msg = batch_with_body_len(MAX_FRAME_LEN);
        let bytes = frame(&msg);
        assert_eq!(bytes.len(), 4 + MAX_FRAME_LEN);
        c.send_raw(&bytes).unwrap();
        assert_accepted(&c.recv(), msg.id);
        let Payload::LogBatch { entries } = &msg.payload else {
            unreachable!()
        };
        for (i, e) in entries.iter().enumerate() {
            let row = d.db().row(batch_entry(msg.id, i)).unwrap();
            assert_eq!(row.message.len(), e.message.len());
        }
        // And over TCP, written in small pieces.
        let mut c = d.tcp();
        let msg = batch_with_body_len(MAX_FRAME_LEN);
        for chunk in frame(&msg).chunks(100_003) {
            c.send_raw(chunk).unwrap();
        }
        assert_accepted(&c.recv(), msg.id);
        // One log of a whole frame is a valid frame, refused by the row
        // bound with the reason; the connection goes on.
        let msg = log_with_body_len(MAX_FRAME_LEN);
        c.send_raw(&frame(&msg)).unwrap();
        let reason = assert_rejected(&c.recv(), msg.id);
        assert!(reason.contains("524288"), "{reason}");
        c.ping();
    }

    #[test]
    fn a_body_of_one_mebibyte_plus_one_is_refused() {
        let d = Daemon::start_default();
        let mut c = d.unix();
        let msg = log_with_body_len(MAX_FRAME_LEN + 1);
        let body = rmp_serde::to_vec_named(&msg).unwrap();
        let mut bytes = header(body.len() as u32).to_vec();
        bytes.extend_from_slice(&body);
        // The daemon may close before reading it all; a failed write is fine.
        let _ = c.send_raw(&bytes);
        assert_error(&c.recv(), ErrorCode::FrameTooLarge);
        c.expect_eof();
        assert_eq!(d.db().count_logs(), 0);
    }
}

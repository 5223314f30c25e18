//! Frame codec cost per message: `encode_message` (named encoding, as the
//! daemon and `codi2` send) and `decode_message` of the named and the
//! positional encoding (the seed client's), for a typical `LogEntry`, a
//! `LogBatch` of 100, an `Acknowledgment` and a `Ping`.
//!
//! Throughput is in logs carried per second (1 for `Ack` and `Ping`); each
//! benchmark's name ends with the frame body's size in bytes.
//!
//! `cargo bench --bench codec`; under `cargo test` each runs once.

use codi_monitor::proto::{
    decode_message, encode_message, frame_body_len, AckStatus, LogFields, LogLevel, Message,
    Payload, Timestamp, HEADER_LEN,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;
use uuid::Uuid;

/// A 150-byte message, as a build or agent tool would log it.
const MESSAGE: &str = "compiled crate codi-monitor v0.1.0 in 12.84s; 3 warnings \
(unused import in src/io/conn.rs:41), cache hit ratio 0.87, artifacts in target/release/deps/";

fn fields(i: usize) -> LogFields {
    assert_eq!(MESSAGE.len(), 150);
    LogFields {
        level: LogLevel::Info,
        component: "build".into(),
        message: MESSAGE.into(),
        metadata: Some(rmpv::Value::Map(vec![
            ("pid".into(), rmpv::Value::from(41_872)),
            ("attempt".into(), rmpv::Value::from(i as u64 % 3 + 1)),
            ("host".into(), rmpv::Value::from("dev-3")),
        ])),
        session_id: Some("0193f1e2-7c4a-7b3e-9d2f-1a2b3c4d5e6f".into()),
    }
}

fn message(payload: Payload) -> Message {
    Message {
        id: Uuid::parse_str("0193f1e2-7c4a-7b3e-9d2f-1a2b3c4d5e70").unwrap(),
        timestamp: Timestamp::parse_rfc3339("2026-11-26T22:34:56.123456Z").unwrap(),
        payload,
    }
}

/// (name, message, logs carried).
fn cases() -> Vec<(&'static str, Message, u64)> {
    vec![
        ("log_entry", message(Payload::LogEntry(fields(0))), 1),
        (
            "log_batch_100",
            message(Payload::LogBatch {
                entries: (0..100).map(fields).collect(),
            }),
            100,
        ),
        (
            "ack",
            message(Payload::Acknowledgment {
                request_id: Uuid::parse_str("0193f1e2-7c4a-7b3e-9d2f-1a2b3c4d5e6f").unwrap(),
                status: AckStatus::Accepted,
            }),
            1,
        ),
        ("ping", message(Payload::Ping), 1),
    ]
}

fn named_frame(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode_message(msg, &mut out).unwrap();
    out
}

fn codec(c: &mut Criterion) {
    let cases = cases();

    let mut group = c.benchmark_group("encode_named");
    for (name, msg, logs) in &cases {
        let body_len = named_frame(msg).len() - HEADER_LEN;
        group.throughput(Throughput::Elements(*logs));
        let mut out = Vec::with_capacity(64 * 1024);
        group.bench_function(BenchmarkId::new(*name, format!("{body_len}B")), |b| {
            b.iter(|| {
                out.clear();
                encode_message(black_box(msg), &mut out).unwrap();
                black_box(out.len())
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("decode_named");
    for (name, msg, logs) in &cases {
        let frame = named_frame(msg);
        let body = &frame[HEADER_LEN..];
        assert_eq!(&decode_message(body).unwrap(), msg);
        group.throughput(Throughput::Elements(*logs));
        group.bench_function(BenchmarkId::new(*name, format!("{}B", body.len())), |b| {
            b.iter(|| {
                // What a loop does per frame: check the prefix, decode.
                let n = frame_body_len(black_box(&frame)).unwrap().unwrap();
                decode_message(&frame[HEADER_LEN..HEADER_LEN + n]).unwrap()
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("decode_positional");
    for (name, msg, logs) in &cases {
        let body = rmp_serde::to_vec(msg).unwrap();
        let mut frame = (body.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&body);
        assert_eq!(&decode_message(&body).unwrap(), msg);
        group.throughput(Throughput::Elements(*logs));
        group.bench_function(BenchmarkId::new(*name, format!("{}B", body.len())), |b| {
            b.iter(|| {
                let n = frame_body_len(black_box(&frame)).unwrap().unwrap();
                decode_message(&frame[HEADER_LEN..HEADER_LEN + n]).unwrap()
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = codec
}
criterion_main!(benches);

//! The query pool: a few threads, each with its own read-only connection, so
//! that queries never wait for the writer (WAL lets them read a snapshot).

use super::query::{select_by, Writers};
use super::{schema, QueryJob, StoreError};
use crate::metrics::Metrics;
use crate::proto::{encode_message, ErrorCode, LogFilter, Message, Payload};
use crate::reply::{Answer, Replies};
use crossbeam_channel::{Receiver, Sender};
use rusqlite::Connection;
use std::path::Path;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

/// Prepared statements each reader keeps (one per filter shape in use).
const STATEMENT_CACHE: usize = 64;

/// The running reader threads.
#[derive(Debug)]
pub struct ReaderHandle {
    threads: Vec<JoinHandle<()>>,
}

impl ReaderHandle {
    /// Waits for every reader; they exit once all job senders are dropped
    /// and the queue is drained.
    pub fn join(self) {
        for thread in self.threads {
            if thread.join().is_err() {
                log::error!("a reader thread panicked");
            }
        }
    }
}

/// Opens `threads` read-only connections (at least one) to the migrated
/// database, then starts one thread `codi-reader-N` per connection, all
/// taking jobs from one bounded queue of `queue_capacity`.
///
/// Every connection is opened before any thread starts, so errors surface
/// here.
pub fn spawn_readers(
    db_path: &Path,
    threads: usize,
    queue_capacity: usize,
    replies: Replies,
    metrics: Arc<Metrics>,
) -> Result<(Sender<QueryJob>, ReaderHandle), StoreError> {
    let mut conns = Vec::new();
    for _ in 0..threads.max(1) {
        let conn = schema::open_ro(db_path)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        conns.push(conn);
    }
    let (tx, rx) = crossbeam_channel::bounded(queue_capacity.max(1));
    let mut handle = ReaderHandle {
        threads: Vec::new(),
    };
    for (n, conn) in conns.into_iter().enumerate() {
        let name = format!("codi-reader-{n}");
        let (rx, replies, metrics) = (rx.clone(), replies.clone(), Arc::clone(&metrics));
        let spawned = thread::Builder::new()
            .name(name.clone())
            .spawn(move || serve(&conn, &rx, &replies, &metrics));
        match spawned {
            Ok(thread) => handle.threads.push(thread),
            Err(source) => {
                // The started readers exit once their queue's sender is gone.
                drop(tx);
                handle.join();
                return Err(StoreError::Spawn { name, source });
            }
        }
    }
    Ok((tx, handle))
}

fn serve(conn: &Connection, jobs: &Receiver<QueryJob>, replies: &Replies, metrics: &Metrics) {
    for job in jobs {
        let QueryJob {
            reply,
            filter,
            writers,
            limit,
            mut room,
        } = job;
        let bytes = answer(conn, &filter, writers, limit, metrics);
        // The answer now holds only what it takes.
        room.shrink_to(bytes.len());
        replies.send(
            reply,
            Answer::Frame {
                bytes,
                room: Some(room),
            },
        );
        Metrics::add(&metrics.queries, 1);
    }
}

/// The frame answering one `QueryLogs`: `LogResults` (at most one frame,
/// built one row at a time, see `store::query`), or an `Error`.
fn answer(
    conn: &Connection,
    filter: &LogFilter,
    writers: Writers,
    limit: u64,
    metrics: &Metrics,
) -> Vec<u8> {
    let error = match select_by(conn, filter, writers, limit) {
        Ok(selection) => {
            Metrics::add(&metrics.rows_cut, selection.rows_cut as u64);
            let mut frame = Vec::new();
            match selection.encode_frame(&mut frame) {
                Ok(()) => return frame,
                Err(e) => {
                    log::error!("query answer could not be encoded: {e}");
                    Message::error(ErrorCode::Internal, format!("query failed: {e}"))
                }
            }
        }
        Err(StoreError::InvalidFilter(reason)) => Message::error(
            ErrorCode::InvalidRequest,
            format!("invalid filter: {reason}"),
        ),
        Err(e) => {
            if let StoreError::Sqlite(inner) = &e {
                super::recovery::corruption_seen(inner, "a query");
            }
            log::error!("query failed: {e}");
            Message::error(ErrorCode::Internal, format!("query failed: {e}"))
        }
    };
    if let Payload::Error { code, .. } = &error.payload {
        metrics.error_sent(code);
    }
    let mut frame = Vec::new();
    // A short error always encodes.
    let _ = encode_message(&error, &mut frame);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{Holder, InflightBudget};
    use crate::proto::{LogLevel, Payload, Timestamp};
    use crate::reply::{self, ReplyTo};
    use crate::store::standalone::StandaloneStore;
    use crate::store::{LogRow, WriteOp};
    use crate::testing::recv;
    use uuid::Uuid;

    fn reply_to(seq: u64) -> ReplyTo {
        ReplyTo {
            worker: 0,
            token: 1,
            serial: 1,
            seq,
            query: false,
        }
    }

    #[test]
    fn readers_answer_results_and_errors_then_exit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let mut store = StandaloneStore::open(&path).unwrap();
        let rows = (0..5)
            .map(|i| LogRow {
                uuid: Uuid::new_v4(),
                timestamp_us: i,
                level: if i % 2 == 0 {
                    LogLevel::Error
                } else {
                    LogLevel::Info
                },
                component: "c".into(),
                session_id: None,
                message: format!("m{i}"),
                metadata_json: None,
                uid: None,
            })
            .collect();
        store.apply(&WriteOp::Logs(rows)).unwrap();

        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let (sink, completions) = reply::channel(waker);
        let metrics = Arc::new(Metrics::default());
        let (tx, handle) =
            spawn_readers(&path, 2, 8, Replies::new(vec![sink]), Arc::clone(&metrics)).unwrap();
        let errors_only = LogFilter {
            min_level: Some(LogLevel::Error),
            ..LogFilter::default()
        };
        let bad = LogFilter {
            after_id: Some(-5),
            ..LogFilter::default()
        };
        let backwards = LogFilter {
            since: Some(Timestamp::from_micros(10)),
            until: Some(Timestamp::from_micros(0)),
            ..LogFilter::default()
        };
        let pool = Arc::new(InflightBudget::new(10 << 20));
        let holder = Holder::default();
        for (seq, (filter, limit)) in [(errors_only, 2), (bad, 1), (backwards, 5)]
            .into_iter()
            .enumerate()
        {
            tx.send(QueryJob {
                reply: reply_to(seq as u64),
                filter,
                writers: Writers::Any,
                limit,
                room: pool.try_reserve(1 << 20, &holder).unwrap(),
            })
            .unwrap();
        }
        let mut got: Vec<_> = (0..3)
            .map(|_| recv(&completions, "reader completion"))
            .collect();
        got.sort_by_key(|c| c.to.seq);
        // Each answer is an encoded frame that holds only its own size.
        let mut framed = 0;
        for c in &got {
            match &c.answer {
                Answer::Frame {
                    bytes,
                    room: Some(room),
                } => {
                    assert_eq!(room.bytes(), bytes.len());
                    framed += bytes.len();
                }
                other => panic!("not a frame: {other:?}"),
            }
        }
        assert_eq!((pool.used(), holder.held()), (framed, framed));
        let got: Vec<Message> = got
            .into_iter()
            .map(|c| c.answer.into_message().unwrap())
            .collect();
        assert_eq!(pool.used(), 0, "decoding dropped the rooms");
        match &got[0].payload {
            Payload::LogResults {
                entries,
                total_count,
            } => {
                assert_eq!(*total_count, 3);
                let messages: Vec<_> = entries.iter().map(|e| e.message.as_str()).collect();
                assert_eq!(messages, ["m2", "m4"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            &got[1].payload,
            Payload::Error { code: ErrorCode::InvalidRequest, message, .. } if message.contains("after_id")
        ));
        assert!(matches!(
            &got[2].payload,
            Payload::LogResults { entries, total_count: 0 } if entries.is_empty()
        ));
        drop(tx);
        handle.join();
        assert_eq!(Metrics::get(&metrics.queries), 3);
    }

    #[test]
    fn refuses_a_missing_database() {
        let dir = tempfile::tempdir().unwrap();
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let (sink, _rx) = reply::channel(waker);
        let err = spawn_readers(
            &dir.path().join("none.db"),
            1,
            1,
            Replies::new(vec![sink]),
            Arc::new(Metrics::default()),
        )
        .unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }), "{err}");
    }
}

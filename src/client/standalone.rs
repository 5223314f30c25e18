//! Standalone mode: when no daemon answers, `codi2` writes to (and reads
//! from) the database itself, through the same SQL as the daemon
//! ([`StandaloneStore`]), and makes up the answer the daemon would have sent.
//!
//! Ids are kept: a log stored here has the uuid the daemon would have given
//! it, so a request that the daemon may already have committed before it
//! died is stored once.

use crate::proto::{AckStatus, ErrorCode, LogFields, LogFilter, Message, Payload, Timestamp};
use crate::store::ops::OpOutcome;
use crate::store::standalone::StandaloneStore;
use crate::store::{batch_entry_id, LogRow, StoreError, WriteOp};
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// Whether a request wrote to the database or only read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// It changed (or tried to change) the database.
    Write,
    /// It only read.
    Read,
    /// It was answered without touching the database.
    None,
}

/// What a request asks of the database.
#[derive(Debug, Clone, PartialEq)]
enum Plan {
    /// Apply this change.
    Write(WriteOp),
    /// Run this query.
    Query { filter: LogFilter, limit: u64 },
    /// Answer at once with this payload.
    Answer(Payload),
}

/// The database opened directly.
#[derive(Debug)]
pub struct Standalone {
    store: StandaloneStore,
    db: PathBuf,
}

/// Fails when the database at `db` belongs to another uid than `euid`, or
/// (if it does not exist) the nearest existing directory it would be
/// created in belongs to another user than `euid` or root (root's are the
/// system's directories, such as `/tmp`, where anyone makes their own).
fn refuse_foreign(db: &Path, euid: u32) -> Result<(), StoreError> {
    use std::os::unix::fs::MetadataExt;
    let Some((path, meta)) = db
        .ancestors()
        .filter(|p| !p.as_os_str().is_empty())
        .find_map(|p| std::fs::metadata(p).ok().map(|m| (p, m)))
    else {
        return Ok(());
    };
    if meta.uid() == euid || (meta.uid() == 0 && path != db) {
        return Ok(());
    }
    Err(StoreError::NotOwner {
        path: path.to_path_buf(),
        owner: crate::fsperm::user_name(meta.uid())
            .unwrap_or_else(|| format!("uid {}", meta.uid())),
    })
}

impl Standalone {
    /// Opens (creating if needed) the database at `db`: only the caller's
    /// own, or a new one in the caller's own directory (a directory that
    /// does not exist yet is created the caller's).
    pub fn open(db: &Path) -> Result<Standalone, StoreError> {
        refuse_foreign(db, rustix::process::geteuid().as_raw())?;
        Ok(Standalone {
            store: StandaloneStore::open(db)?,
            db: db.to_path_buf(),
        })
    }

    /// The database file.
    pub fn db(&self) -> &Path {
        &self.db
    }

    /// Carries out `request` and returns the daemon's answer to it.
    pub fn answer(&mut self, request: &Message) -> Result<(Message, Access), StoreError> {
        match plan(request) {
            Plan::Answer(payload) => Ok((Message::answer(payload), Access::None)),
            Plan::Write(op) => {
                let status = match self.store.apply(&op)? {
                    OpOutcome::Logs { .. } | OpOutcome::Done => AckStatus::Accepted,
                    OpOutcome::Rejected(why) => AckStatus::Rejected(why),
                };
                Ok((Message::ack(request.id, status), Access::Write))
            }
            Plan::Query { filter, limit } => {
                let (entries, total_count) = self.store.query(&filter, limit)?;
                let payload = Payload::LogResults {
                    entries,
                    total_count,
                };
                Ok((Message::answer(payload), Access::Read))
            }
        }
    }
}

fn rejected(id: Uuid, why: String) -> Plan {
    Plan::Answer(Payload::Acknowledgment {
        request_id: id,
        status: AckStatus::Rejected(why),
    })
}

fn rows(
    id: Uuid,
    timestamp: Timestamp,
    entries: &[LogFields],
    entry_id: impl Fn(usize) -> Uuid,
) -> Plan {
    let rows: Result<Vec<LogRow>, String> = entries
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let uid = Some(rustix::process::getuid().as_raw());
            LogRow::from_fields(entry_id(i), timestamp, f.clone(), None, uid)
        })
        .collect();
    match rows {
        Ok(rows) => Plan::Write(WriteOp::Logs(rows)),
        Err(why) => rejected(id, why),
    }
}

/// Maps a request to the database work it needs.
fn plan(request: &Message) -> Plan {
    let id = request.id;
    let ts = request.timestamp;
    match &request.payload {
        Payload::LogEntry(fields) => rows(id, ts, std::slice::from_ref(fields), |_| id),
        Payload::LogBatch { entries } => rows(id, ts, entries, |i| batch_entry_id(id, i)),
        Payload::SessionStart {
            session_id,
            identity,
            agent_type,
            workspace,
        } => Plan::Write(WriteOp::SessionStart {
            session_id: session_id.clone(),
            identity: identity.clone(),
            agent_type: agent_type.clone(),
            workspace: workspace.clone(),
            started_at_us: ts.as_micros(),
            uid: Some(rustix::process::getuid().as_raw()),
            restricted_to: None,
        }),
        Payload::SessionEnd { session_id } => Plan::Write(WriteOp::SessionEnd {
            session_id: session_id.clone(),
            ended_at_us: ts.as_micros(),
            restricted_to: None,
        }),
        Payload::QueryLogs { filter, limit } => Plan::Query {
            filter: filter.clone(),
            limit: *limit,
        },
        other => Plan::Answer(Payload::Error {
            code: ErrorCode::Unsupported,
            message: format!("{} needs a running daemon", other.name()),
            details: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::LogLevel;

    fn fields(message: &str) -> LogFields {
        LogFields {
            level: LogLevel::Warn,
            component: "c".into(),
            message: message.into(),
            metadata: None,
            session_id: Some("s".into()),
        }
    }

    #[test]
    fn batch_entries_get_the_daemons_ids() {
        let msg = Message::new(Payload::LogBatch {
            entries: vec![fields("a"), fields("b")],
        });
        let Plan::Write(WriteOp::Logs(rows)) = plan(&msg) else {
            panic!("not a log write")
        };
        assert_eq!(rows[0].uuid, msg.id);
        assert_eq!(rows[1].uuid, batch_entry_id(msg.id, 1));
        assert_eq!(rows[1].message, "b");
        assert_eq!(rows[0].timestamp_us, msg.timestamp.as_micros());
    }

    #[test]
    fn sessions_use_the_message_time() {
        let msg = Message::new(Payload::SessionEnd {
            session_id: "s".into(),
        });
        assert_eq!(
            plan(&msg),
            Plan::Write(WriteOp::SessionEnd {
                session_id: "s".into(),
                ended_at_us: msg.timestamp.as_micros(),
                restricted_to: None,
            })
        );
    }

    #[test]
    fn requests_needing_a_daemon_get_unsupported() {
        let msg = Message::new(Payload::Ping);
        let Plan::Answer(Payload::Error { code, .. }) = plan(&msg) else {
            panic!("ping must not touch the database")
        };
        assert_eq!(code, ErrorCode::Unsupported);
    }

    #[test]
    fn another_users_database_or_directory_is_refused() {
        // As root (the suite's machines): the files get chosen owners.
        const OWNER: u32 = 4242;
        const OTHER: u32 = 4243;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("owned");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(OWNER), None).unwrap();
        let db = dir.join("codi.db");
        assert!(
            refuse_foreign(&db, OWNER).is_ok(),
            "a new file in my directory"
        );
        let err = refuse_foreign(&db, OTHER).unwrap_err();
        assert!(
            matches!(&err, StoreError::NotOwner { path, .. } if *path == dir),
            "{err}"
        );
        std::fs::write(&db, b"").unwrap();
        std::os::unix::fs::chown(&db, Some(OWNER), None).unwrap();
        let err = refuse_foreign(&db, OTHER).unwrap_err();
        assert!(
            matches!(&err, StoreError::NotOwner { path, .. } if *path == db),
            "{err}"
        );
        assert!(err.to_string().contains("start the daemon"), "{err}");
        assert!(refuse_foreign(&db, OWNER).is_ok());
        // A directory still to create is judged by the nearest one there is.
        let below = dir.join("not/yet/codi.db");
        assert!(refuse_foreign(&below, OWNER).is_ok());
        assert!(refuse_foreign(&below, OTHER).is_err());
        // Root's directories (like /tmp) are anyone's to make a directory
        // in, but root's database file is root's.
        let in_system_dir = tmp.path().join("mine/codi.db");
        assert!(refuse_foreign(&in_system_dir, OTHER).is_ok());
        let roots = tmp.path().join("root.db");
        std::fs::write(&roots, b"").unwrap();
        assert!(refuse_foreign(&roots, OTHER).is_err());
    }

    #[test]
    fn writes_and_queries_round_trip_through_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Standalone::open(&dir.path().join("db/codi.db")).unwrap();
        let start = Message::new(Payload::SessionStart {
            session_id: "s".into(),
            identity: "me".into(),
            agent_type: None,
            workspace: None,
        });
        let (answer, access) = s.answer(&start).unwrap();
        assert_eq!(access, Access::Write);
        assert_eq!(
            answer.payload,
            Payload::Acknowledgment {
                request_id: start.id,
                status: AckStatus::Accepted
            }
        );
        let log = Message::new(Payload::LogEntry(fields("hello")));
        s.answer(&log).unwrap();
        // A resend (same id) is stored once.
        s.answer(&log).unwrap();
        let query = Message::new(Payload::QueryLogs {
            filter: LogFilter::default(),
            limit: 10,
        });
        let (answer, access) = s.answer(&query).unwrap();
        assert_eq!(access, Access::Read);
        let Payload::LogResults {
            entries,
            total_count,
        } = answer.payload
        else {
            panic!("not results")
        };
        assert_eq!(total_count, 1);
        assert_eq!(entries[0].uuid, log.id);
        assert_eq!(entries[0].message, "hello");
    }
}

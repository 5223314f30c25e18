//! The SQL of session changes, shared by the daemon's merger thread and
//! `codi2`'s standalone mode so that both store exactly the same rows, and
//! of log inserts straight into the indexed `logs` table.
//!
//! The daemon and `codi2` insert logs through [`super::ingest`] instead;
//! the direct insert here is what the load generator's raw ceiling and the
//! benchmarks measure, the same rows written the simplest way.
//!
//! Each operation is idempotent: a resent log (same uuid) is ignored, a
//! repeated session start or end changes nothing.

use super::WriteOp;
use rusqlite::{params, OptionalExtension, Transaction};

/// What applying one [`WriteOp`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpOutcome {
    /// Log rows: how many were new and how many were already stored.
    Logs {
        /// Rows inserted.
        inserted: usize,
        /// Rows skipped because their uuid was already stored.
        duplicates: usize,
    },
    /// The session change is recorded (or already was).
    Done,
    /// Nothing was changed; the reason says why.
    Rejected(String),
}

const INSERT_LOG: &str = "INSERT OR IGNORE INTO logs \
    (uuid, timestamp, level, component, session_id, message, metadata, uid, created_at) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";

/// Records a session's start: `started_at` as its client stamped it,
/// `recorded_at` (`?7`) by the writer's own clock, from which session
/// expiry counts (`store::retention`).
const INSERT_SESSION: &str = "INSERT INTO sessions \
    (id, identity, agent_type, started_at, workspace, uid, recorded_at) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT(id) DO NOTHING";

/// Ends session `?1` at `?2` unless it has ended, or `?3` (the caller may
/// end only its own sessions) is true and `?4`, its uid or NULL for a
/// client with none, did not start it: a session with no uid (started over
/// TCP or before uids were stored) is no Unix user's own.
const END_SESSION: &str = "UPDATE sessions SET ended_at = ?2 WHERE id = ?1 AND ended_at IS NULL \
    AND (?3 = 0 OR uid IS ?4)";

/// The uid that started session `?1` (a row, NULL uid included, if the
/// session is known).
const SESSION_OWNER: &str = "SELECT uid FROM sessions WHERE id = ?1";

/// Applies `op` inside `tx` (which the caller commits); `now_us` is the
/// daemon's clock, stored as each log's `created_at` and a new session's
/// `recorded_at`.
///
/// An `Err` means SQLite failed and the transaction should be rolled back;
/// an expected refusal (an unknown session) is `Ok(OpOutcome::Rejected)`.
pub fn apply(tx: &Transaction, op: &WriteOp, now_us: i64) -> Result<OpOutcome, rusqlite::Error> {
    let mut outcome = None;
    apply_all(tx, [op], now_us, |o| outcome = Some(o))?;
    Ok(outcome.expect("one op gives one outcome"))
}

/// Applies every op of `ops` inside `tx`, in order, handing each outcome to
/// `each`. The log insert is prepared once for all of them: the writer's hot
/// path is thousands of one-row jobs per transaction. Stops at the first
/// SQLite error (after `each` has seen the outcomes before it).
pub fn apply_all<'a>(
    tx: &Transaction,
    ops: impl IntoIterator<Item = &'a WriteOp>,
    now_us: i64,
    mut each: impl FnMut(OpOutcome),
) -> Result<(), rusqlite::Error> {
    let mut insert_log = tx.prepare_cached(INSERT_LOG)?;
    for op in ops {
        each(match op {
            WriteOp::Logs(rows) => insert_logs(&mut insert_log, rows, now_us)?,
            WriteOp::SessionStart {
                session_id,
                identity,
                agent_type,
                workspace,
                started_at_us,
                uid,
                restricted_to,
            } => start_session(
                tx,
                now_us,
                session_id,
                identity,
                agent_type.as_deref(),
                workspace.as_deref(),
                *started_at_us,
                *uid,
                *restricted_to,
            )?,
            WriteOp::SessionEnd {
                session_id,
                ended_at_us,
                restricted_to,
            } => end_session(tx, session_id, *ended_at_us, *restricted_to)?,
        });
    }
    Ok(())
}

fn insert_logs(
    stmt: &mut rusqlite::CachedStatement<'_>,
    rows: &[super::LogRow],
    now_us: i64,
) -> Result<OpOutcome, rusqlite::Error> {
    let mut inserted = 0;
    for row in rows {
        inserted += stmt.execute(row.values(&now_us))?;
    }
    Ok(OpOutcome::Logs {
        inserted,
        duplicates: rows.len() - inserted,
    })
}

#[allow(clippy::too_many_arguments)]
fn start_session(
    tx: &Transaction,
    now_us: i64,
    session_id: &str,
    identity: &str,
    agent_type: Option<&str>,
    workspace: Option<&str>,
    started_at_us: i64,
    uid: Option<u32>,
    restricted_to: Option<Option<u32>>,
) -> Result<OpOutcome, rusqlite::Error> {
    let added = tx.prepare_cached(INSERT_SESSION)?.execute(params![
        session_id,
        identity,
        agent_type,
        started_at_us,
        workspace,
        uid,
        now_us,
    ])?;
    if added == 0 {
        if let Some(refusal) = owned_by_another(tx, session_id, restricted_to)? {
            return Ok(refusal);
        }
    }
    Ok(OpOutcome::Done)
}

fn end_session(
    tx: &Transaction,
    session_id: &str,
    ended_at_us: i64,
    restricted_to: Option<Option<u32>>,
) -> Result<OpOutcome, rusqlite::Error> {
    let changed = tx.prepare_cached(END_SESSION)?.execute(params![
        session_id,
        ended_at_us,
        restricted_to.is_some(),
        restricted_to.flatten()
    ])?;
    if changed > 0 {
        return Ok(OpOutcome::Done);
    }
    let known = tx
        .prepare_cached(SESSION_OWNER)?
        .query_row([session_id], |_| Ok(()))
        .optional()?
        .is_some();
    if !known {
        return Ok(OpOutcome::Rejected(format!(
            "unknown session `{session_id}`"
        )));
    }
    Ok(owned_by_another(tx, session_id, restricted_to)?.unwrap_or(OpOutcome::Done))
}

/// The refusal for `restricted_to` touching `session_id`, a known session
/// that another uid, or no uid, started; `None` when it may.
fn owned_by_another(
    tx: &Transaction,
    session_id: &str,
    restricted_to: Option<Option<u32>>,
) -> Result<Option<OpOutcome>, rusqlite::Error> {
    let Some(caller) = restricted_to else {
        return Ok(None);
    };
    let owner: Option<Option<u32>> = tx
        .prepare_cached(SESSION_OWNER)?
        .query_row([session_id], |r| r.get(0))
        .optional()?;
    Ok(owner.filter(|&o| o != caller).map(|_| {
        OpOutcome::Rejected(format!(
            "session `{session_id}` was started by another user"
        ))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::LogLevel;
    use crate::store::{schema, LogRow};
    use rusqlite::Connection;
    use uuid::Uuid;

    fn db() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn = schema::open_rw(&dir.path().join("t.db"), 4).unwrap();
        (dir, conn)
    }

    fn row(uuid: Uuid, message: &str) -> LogRow {
        LogRow {
            uuid,
            timestamp_us: 1_000,
            level: LogLevel::Warn,
            component: "c".into(),
            session_id: Some("s".into()),
            message: message.into(),
            metadata_json: Some(r#"{"k":1}"#.into()),
            uid: None,
        }
    }

    fn run(conn: &mut Connection, op: &WriteOp) -> OpOutcome {
        let tx = conn.transaction().unwrap();
        let out = apply(&tx, op, 42).unwrap();
        tx.commit().unwrap();
        out
    }

    fn count(conn: &Connection, sql: &str) -> i64 {
        conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn duplicate_uuid_is_stored_once() {
        let (_dir, mut conn) = db();
        let a = Uuid::now_v7();
        let b = Uuid::now_v7();
        let op = WriteOp::Logs(vec![row(a, "first"), row(b, "second")]);
        assert_eq!(
            run(&mut conn, &op),
            OpOutcome::Logs {
                inserted: 2,
                duplicates: 0
            }
        );
        let again = WriteOp::Logs(vec![row(a, "resent"), row(Uuid::now_v7(), "third")]);
        assert_eq!(
            run(&mut conn, &again),
            OpOutcome::Logs {
                inserted: 1,
                duplicates: 1
            }
        );
        assert_eq!(count(&conn, "SELECT COUNT(*) FROM logs"), 3);
        let (message, level, created, uuid): (String, String, i64, Vec<u8>) = conn
            .query_row(
                "SELECT message, level, created_at, uuid FROM logs WHERE uuid = ?1",
                [a.as_bytes().as_slice()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!(message, "first", "the first copy wins");
        assert_eq!(level, "Warn");
        assert_eq!(created, 42);
        assert_eq!(uuid, a.as_bytes());
    }

    #[test]
    fn sessions_start_once_and_end_once() {
        let (_dir, mut conn) = db();
        let start = |identity: &str| WriteOp::SessionStart {
            session_id: "s1".into(),
            identity: identity.into(),
            agent_type: Some("claude".into()),
            workspace: Some("/w".into()),
            started_at_us: 10,
            uid: None,
            restricted_to: None,
        };
        assert_eq!(run(&mut conn, &start("me")), OpOutcome::Done);
        assert_eq!(run(&mut conn, &start("other")), OpOutcome::Done);
        let identity: String = conn
            .query_row("SELECT identity FROM sessions WHERE id = 's1'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(identity, "me", "a repeated start changes nothing");
        assert_eq!(
            count(&conn, "SELECT recorded_at FROM sessions WHERE id = 's1'"),
            42,
            "the start is recorded by the writer's clock, not the client's stamp"
        );

        let end = |at| WriteOp::SessionEnd {
            session_id: "s1".into(),
            ended_at_us: at,
            restricted_to: None,
        };
        assert_eq!(run(&mut conn, &end(20)), OpOutcome::Done);
        assert_eq!(run(&mut conn, &end(30)), OpOutcome::Done);
        assert_eq!(
            count(&conn, "SELECT ended_at FROM sessions WHERE id = 's1'"),
            20
        );
    }

    #[test]
    fn ending_an_unknown_session_is_rejected() {
        let (_dir, mut conn) = db();
        let op = WriteOp::SessionEnd {
            session_id: "ghost".into(),
            ended_at_us: 1,
            restricted_to: None,
        };
        assert_eq!(
            run(&mut conn, &op),
            OpOutcome::Rejected("unknown session `ghost`".into())
        );
        assert_eq!(count(&conn, "SELECT COUNT(*) FROM sessions"), 0);
    }

    #[test]
    fn a_restricted_caller_touches_only_sessions_its_own_uid_started() {
        let (_dir, mut conn) = db();
        let start = |id: &str, uid, restricted_to| WriteOp::SessionStart {
            session_id: id.into(),
            identity: "me".into(),
            agent_type: None,
            workspace: None,
            started_at_us: 10,
            uid,
            restricted_to,
        };
        let end = |id: &str, restricted_to| WriteOp::SessionEnd {
            session_id: id.into(),
            ended_at_us: 20,
            restricted_to,
        };
        let taken =
            |id: &str| OpOutcome::Rejected(format!("session `{id}` was started by another user"));
        assert_eq!(
            run(&mut conn, &start("seven", Some(7), None)),
            OpOutcome::Done
        );
        assert_eq!(run(&mut conn, &start("tcp", None, None)), OpOutcome::Done);
        for (id, caller) in [("seven", Some(8)), ("seven", None), ("tcp", Some(7))] {
            let restricted = Some(caller);
            assert_eq!(run(&mut conn, &start(id, caller, restricted)), taken(id));
            assert_eq!(run(&mut conn, &end(id, restricted)), taken(id));
        }
        let ended = "SELECT COUNT(*) FROM sessions WHERE ended_at IS NOT NULL";
        assert_eq!(count(&conn, ended), 0);
        assert_eq!(
            run(&mut conn, &end("seven", Some(Some(7)))),
            OpOutcome::Done
        );
        assert_eq!(run(&mut conn, &end("tcp", Some(None))), OpOutcome::Done);
        assert_eq!(count(&conn, ended), 2);
    }
}

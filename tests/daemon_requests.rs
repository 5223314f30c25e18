//! Integration tests: the real `codi-monitor` (and `codi2`) binaries, each
//! test with its own daemon in its own temporary directory, spoken to over
//! the real Unix and TCP sockets, with the database inspected directly.
//!
//! No assertion depends on timing: deadlines only protect against hangs.
//!
//! This file: every request and answer type.

#[allow(dead_code)]
mod common;

use codi_monitor::proto::{
    encode_message, AckStatus, ComponentStatus, ErrorCode, LogFields, LogFilter, LogLevel, Message,
    Payload, Timestamp, MAX_FRAME_LEN,
};
use common::*;
use rmpv::Value;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Test 1: every request and answer type.
mod requests {
    use super::*;

    #[test]
    fn ping_is_accepted_and_echoes_its_id_on_both_transports() {
        let d = Daemon::start_default();
        for mut c in [d.unix(), d.tcp()] {
            let ping = Message::new(Payload::Ping);
            let answer = c.request(&ping);
            assert_accepted(&answer, ping.id);
            assert_ne!(answer.id, ping.id, "an answer carries its own id");
        }
    }

    #[test]
    fn log_entry_is_stored_with_every_field() {
        let d = Daemon::start_default();
        let mut c = d.unix();
        let metadata = Value::Map(vec![
            ("a".into(), Value::from(1)),
            (
                "b".into(),
                Value::Array(vec![Value::from(true), Value::from("x")]),
            ),
            ("c".into(), Value::Map(vec![("d".into(), Value::F64(1.5))])),
        ]);
        let full = at(
            T0 + 123_456,
            Payload::LogEntry(LogFields {
                level: LogLevel::Warn,
                component: "comp".into(),
                message: "hello wörld \u{1F600}".into(),
                metadata: Some(metadata),
                session_id: Some("s-explicit".into()),
            }),
        );
        c.expect_accepted(&full);
        // Accepted means committed: visible to another connection at once.
        let db = d.db();
        let row = db.row(full.id).expect("accepted log is stored");
        assert_eq!(row.uuid, full.id);
        assert_eq!(row.timestamp, T0 + 123_456);
        assert_eq!(row.level, "Warn");
        assert_eq!(row.component, "comp");
        assert_eq!(row.message, "hello wörld \u{1F600}");
        assert_eq!(row.session_id.as_deref(), Some("s-explicit"));
        let json: serde_json::Value =
            serde_json::from_str(row.metadata.as_deref().expect("metadata stored")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"a": 1, "b": [true, "x"], "c": {"d": 1.5}})
        );
        assert!(row.created_at > T0, "created_at is the daemon's clock");

        let bare = at(T0, Payload::LogEntry(fields(LogLevel::Trace, "c2", "bare")));
        c.expect_accepted(&bare);
        let row = db.row(bare.id).expect("stored");
        assert_eq!(row.level, "Trace");
        assert_eq!(row.metadata, None, "no metadata is NULL");
        assert_eq!(row.session_id, None);
        assert_eq!(db.count_logs(), 2);
    }

    /// Issue point 2: binary metadata was stored as an array of byte
    /// values and came back as one.
    #[test]
    fn binary_and_extension_metadata_come_back_exactly() {
        let d = Daemon::start_default();
        let mut c = d.unix();
        let bytes: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        let metadata = Value::Map(vec![
            ("bin".into(), Value::Binary(bytes.clone())),
            ("ext".into(), Value::Ext(-7, vec![0, 1, 254, 255])),
            (
                "nested".into(),
                Value::Array(vec![Value::Binary(vec![]), Value::Ext(0, vec![9])]),
            ),
        ]);
        let mut f = fields(LogLevel::Info, "bin", "with binary");
        f.metadata = Some(metadata.clone());
        let msg = Message::new(Payload::LogEntry(f));
        c.expect_accepted(&msg);
        let mut top = fields(LogLevel::Info, "bin", "binary at the top");
        top.metadata = Some(Value::Binary(bytes.clone()));
        let in_batch = batch(vec![top]);
        c.expect_accepted(&in_batch);
        // Stored as base64: 4/3 of the bytes, not an array of numbers.
        let stored = d.db().row(msg.id).unwrap().metadata.unwrap();
        assert!(
            stored.contains(r#""bin":{"$bin":"AAECAwQF"#),
            "not base64: {}",
            &stored[..60]
        );
        assert!(
            stored.len() < bytes.len() * 4 / 3 + 200,
            "{} bytes",
            stored.len()
        );

        let answer = c.request(&query(
            LogFilter {
                component: Some("bin".into()),
                ..LogFilter::default()
            },
            10,
        ));
        let (entries, total) = results(&answer);
        assert_eq!(total, 2);
        assert!(
            entries[0].metadata.as_ref() == Some(&metadata),
            "binary in a map came back changed"
        );
        assert!(
            entries[1].metadata == Some(Value::Binary(bytes)),
            "binary metadata came back changed"
        );
    }

    #[test]
    fn every_level_round_trips() {
        let d = Daemon::start_default();
        let mut c = d.unix();
        let db = d.db();
        for level in LogLevel::ALL {
            let msg = log(level, "levels", level.as_str());
            c.expect_accepted(&msg);
            assert_eq!(db.row(msg.id).unwrap().level, level.as_str());
        }
    }

    #[test]
    fn positional_encoding_is_accepted() {
        let d = Daemon::start_default();
        let mut c = d.unix();
        let msg = log(LogLevel::Info, "seed-client", "positional");
        let body = rmp_serde::to_vec(&msg).unwrap();
        let mut frame = (body.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&body);
        c.send_raw(&frame).unwrap();
        assert_accepted(&c.recv(), msg.id);
        assert_eq!(d.db().row(msg.id).unwrap().message, "positional");
    }

    #[test]
    fn log_batch_gets_one_answer_and_consecutive_ids() {
        let d = Daemon::start_default();
        let mut c = d.unix();
        let entries: Vec<LogFields> = (0..5)
            .map(|i| LogFields {
                level: LogLevel::ALL[i],
                component: "batch".into(),
                message: format!("entry {i}"),
                metadata: Some(Value::from(i as u64)),
                session_id: None,
            })
            .collect();
        let msg = at(T0 + 7, Payload::LogBatch { entries });
        c.send(&msg).unwrap();
        let ping = Message::new(Payload::Ping);
        c.send(&ping).unwrap();
        assert_accepted(&c.recv(), msg.id);
        // The ping's answer comes next: the batch had exactly one answer.
        assert_accepted(&c.recv(), ping.id);

        let db = d.db();
        assert_eq!(db.count_logs(), 5);
        for i in 0..5 {
            let row = db
                .row(batch_entry(msg.id, i))
                .unwrap_or_else(|| panic!("entry {i} stored under batch id + {i}"));
            assert_eq!(row.message, format!("entry {i}"));
            assert_eq!(row.level, LogLevel::ALL[i].as_str());
            assert_eq!(row.timestamp, T0 + 7, "entries carry the batch's time");
            assert_eq!(row.metadata.as_deref(), Some(i.to_string().as_str()));
        }
    }

    #[test]
    fn empty_batch_is_accepted_and_stores_nothing() {
        let d = Daemon::start_default();
        let mut c = d.unix();
        c.expect_accepted(&batch(Vec::new()));
        assert_eq!(d.db().count_logs(), 0);
    }

    #[test]
    fn general_workspace_is_the_workspace_of_sessions_that_name_none() {
        let sandbox = Sandbox::new();
        sandbox.write_config("[general]\nworkspace = \"/srv/default\"\n");
        let d = Daemon::start(Arc::clone(&sandbox), Opts::default().with_config());
        let mut c = d.unix();
        for (id, workspace) in [("named", Some("/srv/own")), ("unnamed", None)] {
            c.expect_accepted(&Message::new(Payload::SessionStart {
                session_id: id.into(),
                identity: "alice".into(),
                agent_type: None,
                workspace: workspace.map(str::to_owned),
            }));
        }
        let db = d.db();
        let workspace = |id| db.session(id).expect("session row").workspace;
        assert_eq!(workspace("named").as_deref(), Some("/srv/own"));
        assert_eq!(workspace("unnamed").as_deref(), Some("/srv/default"));
    }

    #[test]
    fn sessions_are_recorded_and_default_for_their_connection() {
        let d = Daemon::start_default();
        let mut c = d.unix();
        let mut other = d.unix();
        let start = at(
            T0 + SECOND,
            Payload::SessionStart {
                session_id: "sess-1".into(),
                identity: "alice".into(),
                agent_type: Some("claude".into()),
                workspace: Some("/srv/w".into()),
            },
        );
        c.expect_accepted(&start);
        let in_session = log(LogLevel::Info, "s", "in session");
        c.expect_accepted(&in_session);
        let explicit = Message::new(Payload::LogEntry(LogFields {
            session_id: Some("explicit".into()),
            ..fields(LogLevel::Info, "s", "explicit session wins")
        }));
        c.expect_accepted(&explicit);
        let elsewhere = log(LogLevel::Info, "s", "other connection");
        other.expect_accepted(&elsewhere);
        let batch_msg = batch(vec![fields(LogLevel::Debug, "s", "batched in session")]);
        c.expect_accepted(&batch_msg);

        let db = d.db();
        let session = db.session("sess-1").expect("session row");
        assert_eq!(session.identity, "alice");
        assert_eq!(session.agent_type.as_deref(), Some("claude"));
        assert_eq!(session.workspace.as_deref(), Some("/srv/w"));
        assert_eq!(session.started_at, T0 + SECOND);
        assert_eq!(session.ended_at, None);

        let end = at(
            T0 + 5 * SECOND,
            Payload::SessionEnd {
                session_id: "sess-1".into(),
            },
        );
        c.expect_accepted(&end);
        let after_end = log(LogLevel::Info, "s", "after end");
        c.expect_accepted(&after_end);

        let session = db.session("sess-1").unwrap();
        assert_eq!(session.ended_at, Some(T0 + 5 * SECOND));
        let session_of = |id: Uuid| db.row(id).expect("stored").session_id;
        assert_eq!(session_of(in_session.id).as_deref(), Some("sess-1"));
        assert_eq!(session_of(explicit.id).as_deref(), Some("explicit"));
        assert_eq!(
            session_of(elsewhere.id),
            None,
            "sessions are per connection"
        );
        assert_eq!(session_of(batch_msg.id).as_deref(), Some("sess-1"));
        assert_eq!(session_of(after_end.id), None, "SessionEnd clears it");
    }

    #[test]
    fn session_end_of_unknown_session_is_rejected() {
        let d = Daemon::start_default();
        let mut c = d.unix();
        let end = Message::new(Payload::SessionEnd {
            session_id: "ghost".into(),
        });
        assert_rejected(&c.request(&end), end.id);
        assert!(d.db().session("ghost").is_none());
        c.ping();
    }

    #[test]
    fn session_start_with_empty_id_is_rejected() {
        let d = Daemon::start_default();
        let mut c = d.unix();
        let start = Message::new(Payload::SessionStart {
            session_id: String::new(),
            identity: "me".into(),
            agent_type: None,
            workspace: None,
        });
        assert_rejected(&c.request(&start), start.id);
        let after = log(LogLevel::Info, "s", "no session");
        c.expect_accepted(&after);
        assert_eq!(d.db().row(after.id).unwrap().session_id, None);
    }

    /// A huge session id is refused with a short reason (echoing it would not
    /// fit an answer frame).
    #[test]
    fn session_end_with_an_overlong_id_is_rejected_briefly() {
        let d = Daemon::start_default();
        let mut c = d.unix();
        let end = Message::new(Payload::SessionEnd {
            session_id: "s".repeat(900_000),
        });
        let answer = c.request(&end);
        assert_rejected(&answer, end.id);
        let (_, status) = ack(&answer);
        let AckStatus::Rejected(reason) = status else {
            panic!("not rejected: {status:?}")
        };
        assert!(reason.contains("longer than"), "{reason}");
        c.ping();
    }

    /// One stored log of the query data set.
    #[derive(Clone)]
    struct Seeded {
        id: i64,
        uuid: Uuid,
        ts: i64,
        level: LogLevel,
        component: &'static str,
        session: Option<&'static str>,
        message: String,
    }

    /// The query semantics of SPEC.md, computed in the test.
    fn expected(data: &[Seeded], f: &LogFilter, limit: u64) -> (Vec<Uuid>, u64) {
        let mut matches: Vec<&Seeded> = data
            .iter()
            .filter(|s| f.min_level.is_none_or(|m| s.level >= m))
            .filter(|s| f.component.as_deref().is_none_or(|c| s.component == c))
            .filter(|s| f.session_id.is_none() || f.session_id.as_deref() == s.session)
            .filter(|s| f.since.is_none_or(|t| s.ts >= t.as_micros()))
            .filter(|s| f.until.is_none_or(|t| s.ts < t.as_micros()))
            .filter(|s| f.contains.as_deref().is_none_or(|c| s.message.contains(c)))
            .filter(|s| f.after_id.is_none_or(|a| s.id > a))
            .collect();
        let total = matches.len() as u64;
        let limit = limit as usize;
        if f.after_id.is_some() {
            matches.sort_by_key(|s| s.id);
            matches.truncate(limit);
        } else {
            matches.sort_by_key(|s| std::cmp::Reverse((s.ts, s.id)));
            matches.truncate(limit);
            matches.reverse();
        }
        (matches.iter().map(|s| s.uuid).collect(), total)
    }

    #[test]
    fn query_logs_applies_every_filter() {
        let d = Daemon::start_default();
        let mut c = d.unix();
        let db = d.db();
        let mut data = Vec::new();
        for i in 0..12usize {
            // Timestamps out of storage order, with one tie, so that
            // "newest" (by time) and "after_id" (by row id) differ.
            let ts = T0 + ((i * 7) % 11) as i64 * SECOND;
            let level = LogLevel::ALL[i % 5];
            let component = if i % 2 == 0 { "alpha" } else { "beta" };
            let session = (i < 6).then_some("s1");
            let message = format!("msg {i} {}", if i % 3 == 0 { "needle" } else { "hay" });
            let msg = at(
                ts,
                Payload::LogEntry(LogFields {
                    level,
                    component: component.into(),
                    message: message.clone(),
                    metadata: Some(Value::Map(vec![("i".into(), Value::from(i as u64))])),
                    session_id: session.map(str::to_owned),
                }),
            );
            c.expect_accepted(&msg);
            data.push(Seeded {
                id: db.row(msg.id).unwrap().id,
                uuid: msg.id,
                ts,
                level,
                component,
                session,
                message,
            });
        }
        let ts = |s: i64| Some(Timestamp::from_micros(T0 + s * SECOND));
        let id3 = data[3].id;
        let cases: Vec<(&str, LogFilter, u64)> = vec![
            ("everything", LogFilter::default(), 100),
            ("newest 3", LogFilter::default(), 3),
            ("count only", LogFilter::default(), 0),
            (
                "min_level",
                LogFilter {
                    min_level: Some(LogLevel::Warn),
                    ..LogFilter::default()
                },
                100,
            ),
            (
                "component",
                LogFilter {
                    component: Some("alpha".into()),
                    ..LogFilter::default()
                },
                100,
            ),
            (
                "session_id",
                LogFilter {
                    session_id: Some("s1".into()),
                    ..LogFilter::default()
                },
                100,
            ),
            (
                "since",
                LogFilter {
                    since: ts(4),
                    ..LogFilter::default()
                },
                100,
            ),
            (
                "until",
                LogFilter {
                    until: ts(4),
                    ..LogFilter::default()
                },
                100,
            ),
            (
                "since and until",
                LogFilter {
                    since: ts(2),
                    until: ts(7),
                    ..LogFilter::default()
                },
                100,
            ),
            (
                "contains",
                LogFilter {
                    contains: Some("needle".into()),
                    ..LogFilter::default()
                },
                100,
            ),
            (
                "contains is case-sensitive",
                LogFilter {
                    contains: Some("Needle".into()),
                    ..LogFilter::default()
                },
                100,
            ),
            (
                "after_id: oldest first by row id",
                LogFilter {
                    after_id: Some(id3),
                    ..LogFilter::default()
                },
                4,
            ),
            (
                "after_id with a filter",
                LogFilter {
                    after_id: Some(id3),
                    component: Some("beta".into()),
                    ..LogFilter::default()
                },
                2,
            ),
            (
                "all filters at once",
                LogFilter {
                    min_level: Some(LogLevel::Debug),
                    component: Some("alpha".into()),
                    session_id: Some("s1".into()),
                    since: ts(0),
                    until: ts(11),
                    contains: Some("msg".into()),
                    after_id: None,
                    // Written over the Unix socket by this (root) process.
                    uid: Some(0),
                },
                2,
            ),
        ];
        for (name, filter, limit) in cases {
            let answer = c.request(&query(filter.clone(), limit));
            let (entries, total) = results(&answer);
            let (want, want_total) = expected(&data, &filter, limit);
            let got: Vec<Uuid> = entries.iter().map(|e| e.uuid).collect();
            assert_eq!(got, want, "entries of case `{name}`");
            assert_eq!(total, want_total, "total_count of case `{name}`");
        }

        // Every field of a returned entry.
        let answer = c.request(&query(LogFilter::default(), 100));
        for entry in results(&answer).0 {
            let s = data.iter().find(|s| s.uuid == entry.uuid).unwrap();
            let i = data.iter().position(|x| x.uuid == s.uuid).unwrap();
            assert_eq!(entry.id, s.id);
            assert_eq!(entry.timestamp.as_micros(), s.ts);
            assert_eq!(entry.level, s.level);
            assert_eq!(entry.component, s.component);
            assert_eq!(entry.session_id.as_deref(), s.session);
            assert_eq!(entry.message, s.message);
            assert_eq!(
                entry.metadata,
                Some(Value::Map(vec![("i".into(), Value::from(i as u64))]))
            );
        }
    }

    #[test]
    fn query_answer_fits_one_frame() {
        let d = Daemon::start_default();
        let mut c = d.unix();
        // 40 logs of 100 KB: the newest ~10 fit in one 1 MiB answer.
        let big = "z".repeat(100_000);
        let mut ids = Vec::new();
        for i in 0..40 {
            let msg = at(
                T0 + i * SECOND,
                Payload::LogEntry(fields(LogLevel::Info, "big", &big)),
            );
            c.expect_accepted(&msg);
            ids.push(msg.id);
        }
        let answer = c.request(&query(LogFilter::default(), 1000));
        let (entries, total) = results(&answer);
        assert_eq!(total, 40, "total_count counts every match");
        assert!(!entries.is_empty() && entries.len() < 40, "trimmed to fit");
        let got: Vec<Uuid> = entries.iter().map(|e| e.uuid).collect();
        assert_eq!(got, ids[40 - entries.len()..], "the newest are kept");
        let mut frame = Vec::new();
        encode_message(&answer, &mut frame).unwrap();
        assert!(frame.len() - 4 <= MAX_FRAME_LEN);
    }

    #[test]
    fn get_status_lists_components() {
        let d = Daemon::start_default();
        let mut c = d.unix();
        c.expect_accepted(&log(LogLevel::Info, "st", "one"));
        let answer = c.call(Payload::GetStatus);
        let Payload::Status { components, .. } = &answer.payload else {
            panic!("expected Status, got {answer:?}");
        };
        assert!(!components.is_empty());
        let names: HashSet<&str> = components.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names.len(), components.len(), "component names are unique");
        assert!(names.contains("writer"), "components: {components:?}");
        for ComponentStatus { name, status, .. } in components {
            assert!(
                ["healthy", "degraded", "failed"].contains(&status.as_str()),
                "{name}: {status}"
            );
        }
    }

    #[test]
    fn authenticate_on_unix_is_accepted() {
        let d = Daemon::start(Sandbox::new(), Opts::default().token(None).tcp(None));
        let mut c = d.unix();
        let auth = Message::new(Payload::Authenticate {
            token: "anything".into(),
        });
        assert_accepted(&c.request(&auth), auth.id);
        c.expect_accepted(&log(LogLevel::Info, "a", "after auth"));
    }

    #[test]
    fn answers_sent_as_requests_are_invalid_messages() {
        let d = Daemon::start_default();
        let mut c = d.unix();
        let answers = [
            Payload::Acknowledgment {
                request_id: Uuid::now_v7(),
                status: AckStatus::Accepted,
            },
            Payload::LogResults {
                entries: Vec::new(),
                total_count: 0,
            },
            Payload::Error {
                code: ErrorCode::Internal,
                message: "x".into(),
                details: None,
            },
            Payload::Status {
                components: Vec::new(),
                uptime: Duration::from_secs(1),
                version: None,
            },
        ];
        for payload in answers {
            assert_error(&c.call(payload), ErrorCode::InvalidMessage);
        }
        c.ping();
    }

    #[test]
    fn deeply_nested_metadata_is_rejected_and_nothing_stored() {
        let d = Daemon::start_default();
        let mut c = d.unix();
        let db = d.db();
        let with_meta = |meta: Value| {
            Message::new(Payload::LogEntry(LogFields {
                metadata: Some(meta),
                ..fields(LogLevel::Info, "deep", "nested")
            }))
        };
        let ok = with_meta(nested(64));
        c.expect_accepted(&ok);
        let too_deep = with_meta(nested(65));
        assert_rejected(&c.request(&too_deep), too_deep.id);
        assert_eq!(db.count_uuid(too_deep.id), 0);

        // One bad entry rejects the whole batch.
        let bad_batch = batch(vec![
            fields(LogLevel::Info, "deep", "fine"),
            LogFields {
                metadata: Some(nested(65)),
                ..fields(LogLevel::Info, "deep", "too deep")
            },
        ]);
        assert_rejected(&c.request(&bad_batch), bad_batch.id);
        assert_eq!(db.count_uuid(bad_batch.id), 0);
        assert_eq!(db.count_logs(), 1, "only the 64-level entry is stored");
        c.ping();
    }
    /// A `LogEntry` frame whose metadata is `depth` nested one-element
    /// arrays, built byte by byte (no recursion in the test).
    fn deep_metadata_frame(depth: usize) -> (Uuid, Vec<u8>) {
        const MARK: &str = "@@deep-metadata@@";
        let msg = Message::new(Payload::LogEntry(LogFields {
            metadata: Some(Value::from(MARK)),
            ..fields(LogLevel::Info, "deep", "absurd")
        }));
        let body = rmp_serde::to_vec_named(&msg).unwrap();
        let mut mark = vec![0xa0 | MARK.len() as u8];
        mark.extend_from_slice(MARK.as_bytes());
        let at = body
            .windows(mark.len())
            .position(|w| w == mark.as_slice())
            .unwrap();
        let mut deep = body[..at].to_vec();
        deep.extend(std::iter::repeat_n(0x91, depth));
        deep.push(0x01);
        deep.extend_from_slice(&body[at + mark.len()..]);
        let mut frame = (deep.len() as u32).to_le_bytes().to_vec();
        frame.extend(deep);
        (msg.id, frame)
    }

    #[test]
    fn absurdly_deep_metadata_does_not_crash_the_daemon() {
        let mut d = Daemon::start_default();
        let mut c = d.unix();
        for depth in [100, 1_000, 100_000, 1_000_000] {
            let (id, frame) = deep_metadata_frame(depth);
            c.send_raw(&frame).unwrap();
            let answer = match c.try_recv() {
                Ok(Some(answer)) => answer,
                other => panic!(
                    "no answer to metadata nested {depth} deep ({other:?}); daemon alive: {}; \
                     stderr:\n{}",
                    d.is_running(),
                    d.stderr()
                ),
            };
            match &answer.payload {
                Payload::Acknowledgment { .. } => {
                    assert_rejected(&answer, id);
                }
                Payload::Error { code, .. } => assert_eq!(code, &ErrorCode::InvalidMessage),
                other => panic!("depth {depth}: unexpected answer {other:?}"),
            }
            c.ping();
        }
        assert_eq!(d.db().count_logs(), 0);
        assert!(d.is_running());
    }

    #[test]
    fn negative_after_id_is_an_invalid_request() {
        let d = Daemon::start_default();
        let mut c = d.unix();
        let answer = c.request(&query(
            LogFilter {
                after_id: Some(-1),
                ..LogFilter::default()
            },
            10,
        ));
        assert_error(&answer, ErrorCode::InvalidRequest);
        c.ping();
    }
}

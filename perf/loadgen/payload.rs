//! The logs the load generator sends, and the rows the ceiling inserts:
//! one shape for both, so the two numbers compare like with like.

use codi_monitor::proto::{LogFields, LogFilter, LogLevel, Message, Payload, Timestamp};
use uuid::Uuid;

/// The component of every generated log.
pub const COMPONENT: &str = "loadgen";
/// Entries a `QueryLogs` probe asks for.
pub const QUERY_LIMIT: u64 = 100;

/// `size` bytes of printable ASCII message text.
pub fn message_text(size: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789 ";
    (0..size)
        .map(|i| ALPHABET[(i * 7 + i / 13) % ALPHABET.len()] as char)
        .collect()
}

/// The session id that tags every log of one run, so its stored rows can be
/// counted apart from everything else in the database.
pub fn run_tag(run_id: Uuid) -> String {
    format!("loadgen-{run_id}")
}

/// The session of load client `client`: one session per client, as one
/// agent per connection would have, so the session index sees realistic
/// spread. All of a run's sessions share the prefix `<tag>-`.
pub fn client_session(tag: &str, client: usize) -> String {
    format!("{tag}-c{client}")
}

/// The half-open range `[low, high)` of session ids holding exactly the
/// sessions of the run tagged `tag` (`.` sorts right after `-`), so that
/// counting them is a range scan on the session index.
pub fn session_range(tag: &str) -> (String, String) {
    (format!("{tag}-"), format!("{tag}."))
}

/// Points every entry of a load message at `session`.
pub fn set_session(msg: &mut Message, session: &str) {
    let entries: &mut [LogFields] = match &mut msg.payload {
        Payload::LogEntry(fields) => std::slice::from_mut(fields),
        Payload::LogBatch { entries } => entries,
        _ => return,
    };
    for fields in entries {
        if fields.session_id.as_deref() != Some(session) {
            fields.session_id = Some(session.to_owned());
        }
    }
}

/// One generated log: Info, component `loadgen`, no metadata, tagged.
pub fn log_fields(message_size: usize, tag: &str) -> LogFields {
    LogFields {
        level: LogLevel::Info,
        component: COMPONENT.into(),
        message: message_text(message_size),
        metadata: None,
        session_id: Some(tag.to_owned()),
    }
}

/// The message every load frame is stamped from: a `LogEntry` for `batch`
/// 1, else a `LogBatch` of `batch` identical entries. Only its id and
/// timestamp change from frame to frame.
pub fn load_template(batch: usize, message_size: usize, tag: &str) -> Message {
    let fields = log_fields(message_size, tag);
    let payload = if batch == 1 {
        Payload::LogEntry(fields)
    } else {
        Payload::LogBatch {
            entries: vec![fields; batch],
        }
    };
    Message::new(payload)
}

/// The `QueryLogs` probe: the newest [`QUERY_LIMIT`] logs, any filter off.
pub fn query_template() -> Message {
    Message::new(Payload::QueryLogs {
        filter: LogFilter::default(),
        limit: QUERY_LIMIT,
    })
}

/// Gives `msg` a fresh UUIDv7 id and the current time; returns the id.
pub fn restamp(msg: &mut Message) -> Uuid {
    msg.id = Uuid::now_v7();
    msg.timestamp = Timestamp::now();
    msg.id
}

#[cfg(test)]
mod tests {
    use super::*;
    use codi_monitor::proto::{encode_message, MAX_FRAME_LEN};

    #[test]
    fn text_has_the_requested_size_and_batches_fit_frames() {
        assert_eq!(message_text(0), "");
        assert_eq!(message_text(150).len(), 150);
        let tag = run_tag(Uuid::nil());
        assert_eq!(tag, "loadgen-00000000-0000-0000-0000-000000000000");
        let mut out = Vec::new();
        encode_message(&load_template(100, 150, &tag), &mut out).unwrap();
        assert!(out.len() < MAX_FRAME_LEN);
        assert!(encode_message(&load_template(10_000, 150, &tag), &mut Vec::new()).is_err());
    }
}

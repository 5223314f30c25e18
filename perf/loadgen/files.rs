//! `codi-loadgen files`: export detection under load. It asks the daemon to
//! watch a fresh directory tree, then creates, writes and closes small files
//! in it on an open-loop schedule (plus files that match no pattern), and
//! reads `export_archive` until every export is there. Reports the detection
//! latency (close to the committed row's `archived_at_us`) and checks that
//! every export was archived exactly once and nothing else was.

use crate::args::FilesArgs;
use crate::report::{fmt_count, fmt_rate, Percentiles};
use codi_monitor::client::conn::{Connection, Endpoint};
use codi_monitor::proto::{AckStatus, Message, Payload, Timestamp};
use codi_monitor::store::schema;
use hdrhistogram::Histogram;
use serde_json::json;
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Every this many files, one that matches no pattern is written too.
const DECOY_EVERY: u64 = 10;
/// Longest wait for the last exports after the schedule ends.
const DRAIN: Duration = Duration::from_secs(20);

/// Runs the scenario; `Ok(true)` when every check passed.
pub fn execute(a: &FilesArgs) -> Result<bool, String> {
    if a.rate == 0 || a.duration <= 0.0 || a.subdirs == 0 {
        return Err("--rate, --duration and --subdirs must be positive".into());
    }
    let run = format!("files-{}", uuid::Uuid::now_v7().simple());
    let tree = a.dir.join(&run);
    for d in 0..a.subdirs {
        fs::create_dir_all(tree.join(format!("d{d}")))
            .map_err(|e| format!("cannot create {}: {e}", tree.display()))?;
    }
    let tree = fs::canonicalize(&tree).map_err(|e| e.to_string())?;
    let mut conn = Connection::connect(&Endpoint::Unix(a.socket.clone()), Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    let start = Message::new(Payload::StartMonitoring {
        path: tree.display().to_string(),
        recursive: true,
        patterns: vec!["*.md".into()],
        session_id: None,
    });
    match conn.request(&start).map_err(|e| e.to_string())?.payload {
        Payload::Acknowledgment {
            status: AckStatus::Accepted,
            ..
        } => {}
        other => return Err(format!("StartMonitoring was not accepted: {other:?}")),
    }

    let total = (a.rate as f64 * a.duration).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / a.rate as f64);
    let body = "x".repeat(a.size);
    let mut closed_at: HashMap<String, i64> = HashMap::with_capacity(total as usize);
    let began = Instant::now();
    let mut behind_max = Duration::ZERO;
    for i in 0..total {
        let due = began + interval * i as u32;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        } else {
            behind_max = behind_max.max(now - due);
        }
        let dir = tree.join(format!("d{}", i % a.subdirs));
        let path = dir.join(format!("f{i}.md"));
        write_file(&path, &format!("{i} {body}"))?;
        closed_at.insert(path.display().to_string(), Timestamp::now().as_micros());
        if i % DECOY_EVERY == 0 {
            write_file(&dir.join(format!("f{i}.tmp")), "not an export")?;
        }
    }
    let wrote_for = began.elapsed();

    let prefix = format!("{}/", tree.display());
    let ro = schema::open_ro(&a.db).map_err(|e| format!("cannot open the database: {e}"))?;
    let deadline = Instant::now() + DRAIN;
    let rows = loop {
        let rows = archive_rows(&ro, &prefix)?;
        if rows.len() as u64 >= total || Instant::now() >= deadline {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let all_done = began.elapsed();

    let mut latency = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
    let mut seen: HashMap<&str, u32> = HashMap::new();
    let mut unexpected = 0u64;
    let mut errors = 0u64;
    for (path, archived_at, error) in &rows {
        if error.is_some() {
            errors += 1;
        }
        match closed_at.get(path.as_str()) {
            Some(closed) => {
                *seen.entry(path.as_str()).or_default() += 1;
                latency.saturating_record((archived_at - closed).max(1) as u64);
            }
            None => unexpected += 1,
        }
    }
    let archived = seen.len() as u64;
    let missing = total - archived;
    let duplicates: u64 = seen.values().map(|&n| u64::from(n - 1)).sum();
    let ok = missing == 0 && duplicates == 0 && unexpected == 0 && errors == 0;
    let p = Percentiles::of(&latency);
    let events_per_sec = total as f64 / wrote_for.as_secs_f64();

    println!(
        "codi-loadgen files {run}: {} exports (+{} decoys) in {} subdirectories, \
         {} offered, {} B each",
        fmt_count(total),
        fmt_count(total.div_ceil(DECOY_EVERY)),
        a.subdirs,
        fmt_rate(a.rate as f64),
        a.size
    );
    println!(
        "  written     {} achieved (schedule fell behind by at most {:.1?})",
        fmt_rate(events_per_sec),
        behind_max
    );
    println!(
        "  archived    {} of {}, missing {}, archived twice {}, non-exports archived {}, \
         error rows {}  {}",
        fmt_count(archived),
        fmt_count(total),
        missing,
        duplicates,
        unexpected,
        errors,
        if ok { "ALL ONCE" } else { "CHECK FAILED" }
    );
    println!("  detection latency (close to committed row)  {}", p.line());
    println!(
        "  last export archived {:.2?} after the first was written",
        all_done
    );
    if let Some(path) = &a.json {
        let doc = json!({
            "run": run,
            "config": {
                "rate": a.rate,
                "duration_s": a.duration,
                "subdirs": a.subdirs,
                "size": a.size,
            },
            "exports": total,
            "archived": archived,
            "missing": missing,
            "duplicates": duplicates,
            "unexpected": unexpected,
            "error_rows": errors,
            "files_per_sec": events_per_sec,
            "latency": p.json(),
            "ok": ok,
        });
        fs::write(path, serde_json::to_vec_pretty(&doc).unwrap())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if !a.keep {
        let stop = Message::new(Payload::StopMonitoring {
            path: tree.display().to_string(),
        });
        let _ = conn.request(&stop);
        let _ = fs::remove_dir_all(&tree);
    }
    Ok(ok)
}

fn write_file(path: &Path, text: &str) -> Result<(), String> {
    let mut f = fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// (original path, archived_at_us, error) of every row under `prefix`.
fn archive_rows(
    conn: &rusqlite::Connection,
    prefix: &str,
) -> Result<Vec<(String, i64, Option<String>)>, String> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT original_path, archived_at_us, error FROM export_archive \
             WHERE substr(original_path, 1, length(?1)) = ?1",
        )
        .map_err(|e| e.to_string())?;
    let rows = stmt
        .query_map([prefix], |r| {
            Ok((
                r.get(0)?,
                r.get::<_, Option<i64>>(1)?.unwrap_or(0),
                r.get(2)?,
            ))
        })
        .map_err(|e| e.to_string())?;
    rows.collect::<Result<_, _>>().map_err(|e| e.to_string())
}

/// Where the tree goes when `--dir` is not given.
pub fn default_dir() -> PathBuf {
    std::env::temp_dir()
}

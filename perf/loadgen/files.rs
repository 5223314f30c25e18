//! `codi-loadgen files`: export detection under load. It asks the daemon to
//! watch a fresh directory tree, then creates, writes and closes small files
//! in it on an open-loop schedule (plus files that match no pattern), and
//! reads `export_archive` until every export is there. Reports the detection
//! latency (close to the committed row's `archived_at_us`) and checks that
//! every export was archived exactly once and nothing else was. With
//! `--ceiling` it then measures the filesystem's own limit for the same
//! files, so that the daemon's rate can be stated as a ratio to it.

use crate::args::FilesArgs;
use crate::procstat;
use crate::report::{fmt_count, fmt_rate, Percentiles};
use codi_monitor::client::conn::{Connection, Endpoint};
use codi_monitor::export::{archive, walk};
use codi_monitor::fsperm::TrustedUsers;
use codi_monitor::proto::{AckStatus, Message, Payload, Timestamp};
use codi_monitor::store::schema;
use hdrhistogram::Histogram;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Every this many files, one that matches no pattern is written too.
const DECOY_EVERY: u64 = 10;
/// After the schedule ends, the wait for the last exports stops once no new
/// row appeared for this long...
const DRAIN_IDLE: Duration = Duration::from_secs(10);
/// ...or at the latest after this long.
const DRAIN_MAX: Duration = Duration::from_secs(120);

/// Runs the scenario; `Ok(true)` when every check passed.
pub fn execute(a: &FilesArgs) -> Result<bool, String> {
    if a.rate == 0 || a.duration <= 0.0 || a.subdirs == 0 {
        return Err("--rate, --duration and --subdirs must be positive".into());
    }
    let run = format!("files-{}", uuid::Uuid::now_v7().simple());
    let tree = make_tree(&a.dir.join(&run), a.subdirs)?;
    let trusted = TrustedUsers::current(None);
    let mut conn = Connection::connect(
        &Endpoint::Unix(a.socket.clone()),
        Duration::from_secs(5),
        &trusted,
    )
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
    let mut closed_at: HashMap<String, i64> = HashMap::with_capacity(total as usize);
    let daemon_before = procstat::sample_daemon(a.daemon_pid)?;
    let cpu_before = procstat::self_cpu();
    let began = Instant::now();
    let began_us = Timestamp::now().as_micros();
    let mut behind_max = Duration::ZERO;
    let body = "x".repeat(a.size);
    for i in 0..total {
        let due = began + interval * i as u32;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        } else {
            behind_max = behind_max.max(now - due);
        }
        let path = write_export(&tree, a.subdirs, i, &body)?;
        closed_at.insert(path.display().to_string(), Timestamp::now().as_micros());
    }
    let wrote_for = began.elapsed();

    let prefix = format!("{}/", tree.display());
    let ro = schema::open_ro(&a.db).map_err(|e| format!("cannot open the database: {e}"))?;
    let drain_began = Instant::now();
    let (mut seen_rows, mut progress_at) = (0, Instant::now());
    let rows = loop {
        let rows = archive_rows(&ro, &prefix)?;
        if rows.len() > seen_rows {
            (seen_rows, progress_at) = (rows.len(), Instant::now());
        }
        if rows.len() as u64 >= total
            || progress_at.elapsed() >= DRAIN_IDLE
            || drain_began.elapsed() >= DRAIN_MAX
        {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let all_done = began.elapsed();
    let self_cpu = procstat::self_cpu().saturating_sub(cpu_before);
    let daemon_cpu = match (a.daemon_pid, daemon_before) {
        (Some(pid), Some(before)) => procstat::sample(pid).map(|after| after.cpu - before.cpu),
        _ => None,
    };

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
    let last_archived_us = rows.iter().map(|r| r.1).max().unwrap_or(began_us);
    // Exports archived per second from the first write to the last row.
    let sustained = total as f64 / ((last_archived_us - began_us).max(1) as f64 / 1e6);
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
        "  archived    {} of {}, not archived {}, archived twice {}, non-exports archived {}, \
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
        "  last export archived {:.2?} after the first was written: {} sustained",
        all_done,
        fmt_rate(sustained)
    );
    let per_export = |cpu: Duration| cpu.as_secs_f64() * 1e6 / total as f64;
    println!(
        "  CPU         load generator {:.1}s ({:.0} us per export){}",
        self_cpu.as_secs_f64(),
        per_export(self_cpu),
        daemon_cpu.map_or(String::new(), |cpu| format!(
            ", daemon {:.1}s ({:.0} us per export)",
            cpu.as_secs_f64(),
            per_export(cpu)
        ))
    );
    let ceiling = if a.ceiling {
        let c = ceiling(&a.dir.join(format!("{run}-ceiling")), a, total)?;
        println!(
            "  ceiling     {} (the same files written by one thread and archived by another \
             with the daemon's copy routine, no inotify, no SQLite, no daemon); \
             daemon / ceiling = {:.2}",
            fmt_rate(c),
            sustained / c
        );
        Some(c)
    } else {
        None
    };
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
            "archived_per_sec": sustained,
            "ceiling_per_sec": ceiling,
            "loadgen_cpu_s": self_cpu.as_secs_f64(),
            "daemon_cpu_s": daemon_cpu.map(|c| c.as_secs_f64()),
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

/// Creates `tree` with `subdirs` subdirectories; returns its canonical path.
fn make_tree(tree: &Path, subdirs: u64) -> Result<PathBuf, String> {
    for d in 0..subdirs {
        fs::create_dir_all(tree.join(format!("d{d}")))
            .map_err(|e| format!("cannot create {}: {e}", tree.display()))?;
    }
    fs::canonicalize(tree).map_err(|e| e.to_string())
}

/// The filesystem's limit for this workload, with no daemon: one thread
/// writes the same `total` exports (and decoys) as fast as it can while a
/// second archives each with the daemon's own routine (open, SHA-256 into
/// an `O_TMPFILE` copy, link into the dated, fanned-out layout). Returns
/// exports archived per second; the tree is removed unless `--keep`.
fn ceiling(tree: &Path, a: &FilesArgs, total: u64) -> Result<f64, String> {
    let tree = make_tree(tree, a.subdirs)?;
    let archive_dir = tree.join("archive");
    fs::create_dir_all(&archive_dir).map_err(|e| e.to_string())?;
    let (tx, rx) = crossbeam_channel::unbounded::<PathBuf>();
    let began = Instant::now();
    let copier = std::thread::spawn(move || -> Result<u64, String> {
        let mut made = HashSet::new();
        let date = (2026, 1, 1);
        let free = archive::free_bytes(&archive_dir).map_err(|e| e.to_string())?;
        let mut copied = 0;
        // The directory last opened, as the watcher keeps it for a burst.
        let mut dir: Option<(PathBuf, OwnedFd)> = None;
        for path in rx {
            let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
            let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                return Err(fail(&"not a file path"));
            };
            if dir.as_ref().map(|(p, _)| p.as_path()) != Some(parent) {
                let fd = walk::open_root(parent).map_err(|e| fail(&e))?;
                dir = Some((parent.to_owned(), fd));
            }
            let fd = dir
                .as_ref()
                .map(|(_, fd)| fd.as_fd())
                .expect("opened above");
            let found = walk::stat_at(fd, name).map_err(|e| fail(&e))?;
            let source = archive::open_source(fd, name, &found, false)
                .map_err(|e| fail(&e))?
                .ok_or_else(|| fail(&"not a regular file"))?;
            let copy = archive::copy_to_temp(source, &archive_dir, free).map_err(|e| fail(&e))?;
            let target = archive::archive_path(&archive_dir, date, None, &copy.content_hash, &path);
            archive::install(copy.temp, &target, &mut made).map_err(|e| fail(&e))?;
            copied += 1;
        }
        Ok(copied)
    });
    let body = "x".repeat(a.size);
    let written = (0..total).try_for_each(|i| {
        let path = write_export(&tree, a.subdirs, i, &body)?;
        tx.send(path)
            .map_err(|_| "the ceiling's copier stopped".to_string())
    });
    drop(tx);
    let copied = copier
        .join()
        .map_err(|_| "the ceiling's copier panicked")??;
    let elapsed = began.elapsed();
    written?;
    if !a.keep {
        let _ = fs::remove_dir_all(&tree);
    }
    Ok(copied as f64 / elapsed.as_secs_f64())
}

/// Writes export `i` into its subdirectory of `tree` (every
/// [`DECOY_EVERY`]th time also a file no pattern matches); returns the
/// export's path.
fn write_export(tree: &Path, subdirs: u64, i: u64, body: &str) -> Result<PathBuf, String> {
    let dir = tree.join(format!("d{}", i % subdirs));
    let path = dir.join(format!("f{i}.md"));
    write_file(&path, &format!("{i} {body}"))?;
    if i.is_multiple_of(DECOY_EVERY) {
        write_file(&dir.join(format!("f{i}.tmp")), "not an export")?;
    }
    Ok(path)
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

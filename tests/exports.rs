//! Export detection against the real daemon: real directories, real files,
//! real inotify, and the archive rows in the real database.

#[allow(dead_code)]
mod common;

use codi_monitor::proto::{ErrorCode, Message, MonitoredPath, Payload};
use common::*;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// How long a test waits for an export to be archived (detection takes
/// milliseconds; the margin is for loaded CI machines).
const ARCHIVED_WITHIN: Duration = Duration::from_secs(20);
/// How long a test waits to be sure something is *not* archived: longer
/// than the daemon's settle time for files a scan finds.
const QUIET: Duration = Duration::from_millis(2500);

/// One `export_archive` row.
#[derive(Debug, Clone, PartialEq)]
struct Archived {
    original: String,
    archive: String,
    session: Option<String>,
    size: i64,
    hash: Option<String>,
    error: Option<String>,
}

fn rows(db: &Db) -> Vec<Archived> {
    let tx = db.snapshot();
    let mut stmt = tx
        .prepare(
            "SELECT original_path, archive_path, session_id, file_size, content_hash, error \
             FROM export_archive ORDER BY id",
        )
        .unwrap();
    let rows = stmt
        .query_map([], |r| {
            Ok(Archived {
                original: r.get(0)?,
                archive: r.get(1)?,
                session: r.get(2)?,
                size: r.get(3)?,
                hash: r.get(4)?,
                error: r.get(5)?,
            })
        })
        .unwrap();
    rows.map(Result::unwrap).collect()
}

/// The rows for `path`, once at least `n` exist (panics after the wait).
fn wait_rows(d: &Daemon, path: &Path, n: usize) -> Vec<Archived> {
    let db = d.db();
    let name = path.to_string_lossy().into_owned();
    let mut found = Vec::new();
    let ok = wait_until(ARCHIVED_WITHIN, || {
        found = rows(&db)
            .into_iter()
            .filter(|r| r.original == name)
            .collect();
        found.len() >= n
    });
    assert!(
        ok,
        "{name} not archived {n} time(s); rows: {:#?}\nlog:\n{}",
        rows(&db),
        d.stderr()
    );
    found
}

fn start(c: &mut Client, path: &Path, recursive: bool, patterns: &[&str]) -> Message {
    c.call(Payload::StartMonitoring {
        path: path.display().to_string(),
        recursive,
        patterns: patterns.iter().map(|p| p.to_string()).collect(),
        session_id: None,
    })
}

fn watch(c: &mut Client, path: &Path, patterns: &[&str]) {
    let msg = Message::new(Payload::StartMonitoring {
        path: path.display().to_string(),
        recursive: true,
        patterns: patterns.iter().map(|p| p.to_string()).collect(),
        session_id: None,
    });
    c.expect_accepted(&msg);
}

fn list(c: &mut Client) -> Vec<MonitoredPath> {
    match c.call(Payload::ListMonitoring).payload {
        Payload::Monitoring { paths } => paths,
        other => panic!("expected Monitoring, got {other:?}"),
    }
}

/// A fresh directory to watch, canonical (the sandbox may sit behind a
/// symlink such as /tmp).
fn workdir(d: &Daemon, name: &str) -> PathBuf {
    let dir = d.sandbox.path().join(name);
    fs::create_dir_all(&dir).unwrap();
    fs::canonicalize(dir).unwrap()
}

#[test]
fn archives_matching_files_in_late_subdirectories_once_and_skips_the_rest() {
    let d = Daemon::start_default();
    let mut c = d.unix();
    let work = workdir(&d, "work");
    watch(&mut c, &work, &["*.md"]);

    let top = work.join("report.md");
    fs::write(&top, b"# report\n").unwrap();
    fs::write(work.join("notes.txt"), b"not an export").unwrap();
    // A subdirectory made after the watch, with a file written at once.
    let deep = work.join("a/b");
    fs::create_dir_all(&deep).unwrap();
    let nested = deep.join("deep.md");
    fs::write(&nested, b"deep").unwrap();

    let top_rows = wait_rows(&d, &top, 1);
    let nested_rows = wait_rows(&d, &nested, 1);
    thread::sleep(QUIET);
    let all = rows(&d.db());
    assert_eq!(all.len(), 2, "exactly the two exports, once each: {all:#?}");
    for (row, content) in [
        (&top_rows[0], &b"# report\n"[..]),
        (&nested_rows[0], b"deep"),
    ] {
        assert_eq!(row.error, None);
        assert_eq!(row.size, content.len() as i64);
        let archived = Path::new(&row.archive);
        assert!(
            archived.starts_with(d.sandbox.db().parent().unwrap().join("archive")),
            "{archived:?}"
        );
        assert_eq!(fs::read(archived).unwrap(), content);
        assert_eq!(
            fs::metadata(archived).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(row.hash.as_ref().map(String::len), Some(64));
    }
    assert!(top.exists(), "copy mode keeps the source");
}

#[test]
fn a_file_is_archived_only_once_it_is_closed() {
    let d = Daemon::start_default();
    let mut c = d.unix();
    let work = workdir(&d, "work");
    watch(&mut c, &work, &["*.json"]);
    let path = work.join("slow.json");
    let mut file = fs::File::create(&path).unwrap();
    file.write_all(b"{\"part\": 1,").unwrap();
    file.flush().unwrap();
    thread::sleep(QUIET);
    assert!(rows(&d.db()).is_empty(), "nothing while the file is open");
    file.write_all(b" \"done\": true}").unwrap();
    drop(file);
    let got = wait_rows(&d, &path, 1);
    assert_eq!(got[0].size, 25, "the whole file");
    assert_eq!(fs::read(&got[0].archive).unwrap(), fs::read(&path).unwrap());
}

#[test]
fn moved_in_files_count_and_identical_content_is_stored_once() {
    let d = Daemon::start_default();
    let mut c = d.unix();
    let work = workdir(&d, "work");
    let outside = workdir(&d, "outside");
    watch(&mut c, &work, &["*.md"]);
    let staged = outside.join("moved.md");
    fs::write(&staged, b"same content").unwrap();
    let moved = work.join("moved.md");
    fs::rename(&staged, &moved).unwrap();
    let first = wait_rows(&d, &moved, 1);
    let copy = work.join("copy.md");
    fs::write(&copy, b"same content").unwrap();
    let second = wait_rows(&d, &copy, 1);
    assert_eq!(first[0].hash, second[0].hash);
    assert_eq!(first[0].archive, second[0].archive, "stored once");
    let archive = d.sandbox.db().parent().unwrap().join("archive");
    let stored: Vec<_> = walk(&archive)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".md"))
        .collect();
    assert_eq!(stored.len(), 1, "{stored:?}");
}

#[test]
fn watches_persist_and_a_restart_archives_what_appeared_meanwhile() {
    let sandbox = Sandbox::new();
    let d = Daemon::start(Arc::clone(&sandbox), Opts::default());
    let mut c = d.unix();
    let work = workdir(&d, "work");
    watch(&mut c, &work, &["*.md"]);
    let before = work.join("before.md");
    fs::write(&before, b"before").unwrap();
    wait_rows(&d, &before, 1);
    drop(c);
    d.terminate();
    let mut d = d;
    assert!(d.wait_exit().success());

    let during = work.join("during.md");
    fs::write(&during, b"while the daemon was down").unwrap();
    let d = Daemon::start(Arc::clone(&sandbox), Opts::default());
    wait_rows(&d, &during, 1);
    let mut c = d.unix();
    let paths = list(&mut c);
    assert_eq!(paths.len(), 1);
    assert_eq!(paths[0].path, work.display().to_string());
    assert!(paths[0].recursive && paths[0].active);
    assert_eq!(paths[0].patterns, vec!["*.md".to_owned()]);
    // Still watched after the restart, and the old file not archived again.
    let after = work.join("after.md");
    fs::write(&after, b"after").unwrap();
    wait_rows(&d, &after, 1);
    thread::sleep(QUIET);
    let befores = rows(&d.db())
        .into_iter()
        .filter(|r| r.original == before.display().to_string())
        .collect::<Vec<_>>();
    assert_eq!(befores.len(), 1);
    // Content archived before the restart is still known: stored once.
    let again = work.join("again.md");
    fs::write(&again, b"before").unwrap();
    let again = wait_rows(&d, &again, 1);
    assert_eq!(again[0].archive, befores[0].archive, "stored once");
}

#[test]
fn stop_monitoring_stops_and_unknown_paths_are_errors() {
    let d = Daemon::start_default();
    let mut c = d.unix();
    let work = workdir(&d, "work");
    watch(&mut c, &work, &["*.md"]);
    c.expect_accepted(&Message::new(Payload::StopMonitoring {
        path: work.display().to_string(),
    }));
    assert!(list(&mut c).is_empty());
    fs::write(work.join("late.md"), b"late").unwrap();
    thread::sleep(QUIET);
    assert!(rows(&d.db()).is_empty());
    let again = c.call(Payload::StopMonitoring {
        path: work.display().to_string(),
    });
    let reason = assert_error(&again, ErrorCode::InvalidRequest);
    assert!(reason.contains("not watched"), "{reason}");
}

#[test]
fn bad_watch_requests_get_clear_errors_and_change_nothing() {
    let d = Daemon::start_default();
    let mut c = d.unix();
    let work = workdir(&d, "work");
    let missing = start(&mut c, &work.join("nope"), true, &[]);
    let reason = assert_error(&missing, ErrorCode::InvalidRequest);
    assert!(reason.contains("does not exist"), "{reason}");
    let file = work.join("file.md");
    fs::write(&file, b"x").unwrap();
    let reason = assert_error(&start(&mut c, &file, true, &[]), ErrorCode::InvalidRequest);
    assert!(reason.contains("not a directory"), "{reason}");
    let reason = assert_error(
        &start(&mut c, &work, true, &["a["]),
        ErrorCode::InvalidRequest,
    );
    assert!(reason.contains("invalid pattern"), "{reason}");
    let archive = d.sandbox.db().parent().unwrap().join("archive");
    let reason = assert_error(
        &start(&mut c, &archive, true, &[]),
        ErrorCode::InvalidRequest,
    );
    assert!(reason.contains("archive"), "{reason}");
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        let locked = work.join("locked");
        fs::create_dir(&locked).unwrap();
        fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
        let reason = assert_error(
            &start(&mut c, &locked, true, &[]),
            ErrorCode::InvalidRequest,
        );
        assert!(reason.contains("not readable"), "{reason}");
        fs::set_permissions(&locked, fs::Permissions::from_mode(0o700)).unwrap();
    }
    assert!(list(&mut c).is_empty());
    c.ping();
}

#[test]
fn default_patterns_apply_and_the_archive_is_never_detected() {
    let d = Daemon::start_default();
    let mut c = d.unix();
    // Watch the data directory itself, which holds the archive.
    let data = fs::canonicalize(d.sandbox.db().parent().unwrap()).unwrap();
    c.expect_accepted(&Message::new(Payload::StartMonitoring {
        path: data.display().to_string(),
        recursive: true,
        patterns: Vec::new(),
        session_id: None,
    }));
    let paths = list(&mut c);
    assert_eq!(paths[0].patterns, ["*.md", "*.txt", "*.json"]);
    let export = data.join("export.txt");
    fs::write(&export, b"text").unwrap();
    wait_rows(&d, &export, 1);
    thread::sleep(QUIET);
    let all = rows(&d.db());
    assert_eq!(all.len(), 1, "the archive copy is not an export: {all:#?}");
}

#[test]
fn exports_are_attributed_to_the_named_or_the_workspace_session() {
    let d = Daemon::start_default();
    let mut c = d.unix();
    let work = workdir(&d, "work");
    let sub = work.join("agent");
    fs::create_dir(&sub).unwrap();
    c.expect_accepted(&Message::new(Payload::SessionStart {
        session_id: "outer".into(),
        identity: "me".into(),
        agent_type: None,
        workspace: Some(work.display().to_string()),
    }));
    let mut c2 = d.unix();
    c2.expect_accepted(&Message::new(Payload::SessionStart {
        session_id: "inner".into(),
        identity: "me".into(),
        agent_type: None,
        workspace: Some(sub.display().to_string()),
    }));
    watch(&mut c, &work, &["*.md"]);
    let outer = work.join("o.md");
    fs::write(&outer, b"o").unwrap();
    let inner = sub.join("i.md");
    fs::write(&inner, b"i").unwrap();
    assert_eq!(
        wait_rows(&d, &outer, 1)[0].session.as_deref(),
        Some("outer")
    );
    assert_eq!(
        wait_rows(&d, &inner, 1)[0].session.as_deref(),
        Some("inner"),
        "the deepest workspace wins"
    );
    let named = workdir(&d, "named");
    c.expect_accepted(&Message::new(Payload::StartMonitoring {
        path: named.display().to_string(),
        recursive: true,
        patterns: vec!["*.md".into()],
        session_id: Some("given".into()),
    }));
    let given = named.join("g.md");
    fs::write(&given, b"g").unwrap();
    let row = &wait_rows(&d, &given, 1)[0];
    assert_eq!(row.session.as_deref(), Some("given"));
    assert!(
        row.archive.contains("/given/"),
        "laid out by session: {}",
        row.archive
    );
}

/// Shrinks the kernel's inotify queue for the daemon started meanwhile, so
/// that a burst of files overflows it; the daemon must rescan and archive
/// every one. Needs root to write the sysctl (skipped otherwise).
#[test]
fn an_event_queue_overflow_is_rescanned_and_nothing_is_missed() {
    const SYSCTL: &str = "/proc/sys/fs/inotify/max_queued_events";
    let Ok(original) = fs::read_to_string(SYSCTL) else {
        eprintln!("skipped: {SYSCTL} is not readable");
        return;
    };
    if fs::write(SYSCTL, "16").is_err() {
        eprintln!("skipped: cannot write {SYSCTL} (not root)");
        return;
    }
    // The limit is taken when the daemon creates its inotify instance.
    let d = Daemon::start_default();
    fs::write(SYSCTL, original.trim()).expect("restore max_queued_events");
    let mut c = d.unix();
    let work = workdir(&d, "work");
    watch(&mut c, &work, &["*.md"]);
    let files: Vec<PathBuf> = (0..300).map(|i| work.join(format!("f{i}.md"))).collect();
    for (i, f) in files.iter().enumerate() {
        fs::write(f, format!("file {i}")).unwrap();
    }
    for f in &files {
        wait_rows(&d, f, 1);
    }
    thread::sleep(QUIET);
    assert_eq!(rows(&d.db()).len(), files.len(), "each file exactly once");
    assert!(
        d.stderr().contains("overflowed"),
        "the overflow is reported: {}",
        d.stderr()
    );
}

#[test]
fn codi2_watch_adds_lists_and_removes() {
    let d = Daemon::start_default();
    let work = workdir(&d, "work");
    let codi2 = |args: &[&str]| {
        let mut cmd = d.sandbox.codi2();
        cmd.arg("--socket").arg(d.socket()).args(args);
        // A relative path is resolved against codi2's own directory.
        cmd.current_dir(&work);
        let out = run(cmd);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = codi2(&[
        "watch",
        "add",
        ".",
        "--pattern",
        "*.log",
        "--pattern",
        "*.md",
        "--session",
        "s-9",
        "--no-recursive",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let (code, out, _) = codi2(&["watch", "list"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        out.trim(),
        format!(
            "{}  this directory only  *.log *.md  session s-9",
            work.display()
        )
    );
    let export = work.join("x.log");
    fs::write(&export, b"log export").unwrap();
    assert_eq!(wait_rows(&d, &export, 1)[0].session.as_deref(), Some("s-9"));
    let (code, _, err) = codi2(&["watch", "add", "missing"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("does not exist"), "{err}");
    let (code, _, err) = codi2(&["watch", "remove", "."]);
    assert_eq!(code, Some(0), "{err}");
    let (_, out, _) = codi2(&["watch", "list"]);
    assert_eq!(out.trim(), "");
}

#[test]
fn move_mode_removes_sources_and_a_deleted_root_is_watched_again() {
    let sandbox = Sandbox::new();
    sandbox.write_config("[monitor]\nscan_interval = \"1s\"\narchive_mode = \"move\"\n");
    let d = Daemon::start(
        Arc::clone(&sandbox),
        Opts {
            config: true,
            ..Opts::default()
        },
    );
    let mut c = d.unix();
    let work = workdir(&d, "work");
    watch(&mut c, &work, &["*.md"]);
    let first = work.join("first.md");
    fs::write(&first, b"moved").unwrap();
    let row = &wait_rows(&d, &first, 1)[0];
    assert_eq!(fs::read(&row.archive).unwrap(), b"moved");
    assert!(
        wait_until(ARCHIVED_WITHIN, || !first.exists()),
        "move mode deletes the source once recorded"
    );

    fs::remove_dir_all(&work).unwrap();
    assert!(
        wait_until(ARCHIVED_WITHIN, || list(&mut c).iter().all(|p| !p.active)),
        "a deleted root shows as missing"
    );
    assert!(
        d.stderr().contains("deleted or moved away"),
        "{}",
        d.stderr()
    );
    fs::create_dir(&work).unwrap();
    let back = work.join("back.md");
    fs::write(&back, b"after the root came back").unwrap();
    wait_rows(&d, &back, 1);
    assert!(list(&mut c)[0].active);
}

#[test]
fn watches_change_only_over_the_unix_socket() {
    let d = Daemon::start_default();
    let work = workdir(&d, "work");
    let mut tcp = d.tcp();
    let reason = assert_error(&start(&mut tcp, &work, true, &[]), ErrorCode::Unauthorized);
    assert!(reason.contains("Unix socket"), "{reason}");
    assert!(list(&mut tcp).is_empty(), "listing is allowed");
    assert!(list(&mut d.unix()).is_empty());
}

#[test]
fn renamed_subdirectories_and_future_mtimes_are_handled() {
    let d = Daemon::start_default();
    let mut c = d.unix();
    let work = workdir(&d, "work");
    // A file whose modification time is in the future, there before the
    // watch: the start scan must not wait for it to "settle" forever.
    let future = work.join("future.md");
    let f = fs::File::create(&future).unwrap();
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(86_400))
        .unwrap();
    drop(f);
    watch(&mut c, &work, &["*.md"]);
    wait_rows(&d, &future, 1);

    let a = work.join("a");
    fs::create_dir(&a).unwrap();
    let first = a.join("first.md");
    fs::write(&first, b"in a").unwrap();
    wait_rows(&d, &first, 1);
    // Rename a to b, then make a new a: both are watched at once, under
    // their current names (the periodic scan is 30 s away).
    let b = work.join("b");
    fs::rename(&a, &b).unwrap();
    fs::create_dir(&a).unwrap();
    thread::sleep(Duration::from_millis(200));
    let in_new_a = a.join("new.md");
    fs::write(&in_new_a, b"in the new a").unwrap();
    let in_b = b.join("moved.md");
    fs::write(&in_b, b"in b").unwrap();
    wait_rows(&d, &in_new_a, 1);
    wait_rows(&d, &in_b, 1);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

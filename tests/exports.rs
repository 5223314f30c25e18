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
/// The daemon's settle time (`SETTLE` in src/export/mod.rs): a file a scan
/// found still changing is looked at again this long after that scan, on a
/// timer rather than in the order of inotify events.
const SETTLE: Duration = Duration::from_secs(1);

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

/// Waits until the watcher has handled everything that happened before
/// this call, so that a test may then assert that something was *not*
/// archived: a positive signal instead of a fixed sleep.
///
/// The watcher reads its one inotify queue in the kernel's order, archives
/// the files it reports closed first in, first out, and commits their rows
/// (archive or error) in that order, scans triggered by an event before the
/// event's successors. So once sentinel `a`, written into the watched `dir`
/// (its name must match `dir`'s patterns, `ext` its extension), has its
/// row, every earlier event and the scans it caused have been handled. Those
/// scans may have left files to a settle timer due within [`SETTLE`]; the
/// watcher runs due timers in the same turn in which it reads an event and
/// before it archives the event's file, so sentinel `b`, written [`SETTLE`]
/// after `a`'s row appeared, gets its row only after those re-checks too.
/// The sentinels' rows are told apart by [`is_sentinel`].
fn barrier(d: &Daemon, dir: &Path, ext: &str) {
    for name in ["a", "b"] {
        let sentinel = dir.join(format!("sentinel-{name}.{ext}"));
        // Content no other file has, so it is never deduplicated away.
        fs::write(&sentinel, sentinel.display().to_string()).unwrap();
        wait_rows(d, &sentinel, 1);
        if name == "a" {
            thread::sleep(SETTLE);
        }
    }
}

/// Whether `row` is one of [`barrier`]'s sentinels.
fn is_sentinel(row: &Archived) -> bool {
    Path::new(&row.original)
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("sentinel-"))
}

/// Every row but the sentinels'.
fn rows_but_sentinels(db: &Db) -> Vec<Archived> {
    rows(db).into_iter().filter(|r| !is_sentinel(r)).collect()
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
    barrier(&d, &work, "md");
    let all = rows_but_sentinels(&d.db());
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
    barrier(&d, &work, "json");
    assert!(
        rows_but_sentinels(&d.db()).is_empty(),
        "nothing while the file is open"
    );
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
    barrier(&d, &work, "md");
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
    // A directory still watched, for the barrier's sentinels.
    let beacon = workdir(&d, "beacon");
    watch(&mut c, &beacon, &["*.md"]);
    fs::write(work.join("late.md"), b"late").unwrap();
    barrier(&d, &beacon, "md");
    let all = rows_but_sentinels(&d.db());
    assert!(
        all.is_empty(),
        "nothing from the unwatched directory: {all:#?}"
    );
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
    barrier(&d, &data, "txt");
    let all = rows_but_sentinels(&d.db());
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
    barrier(&d, &work, "md");
    assert_eq!(
        rows_but_sentinels(&d.db()).len(),
        files.len(),
        "each file exactly once"
    );
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
        "move mode deletes the source once recorded; log:\n{}",
        d.stderr()
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

// ----- hostile users (issue: a watched directory swapped for a symlink) -----

/// Full scans the daemon has run, from its status answer.
fn scans(c: &mut Client) -> u64 {
    let Payload::Status { components, .. } = c.call(Payload::GetStatus).payload else {
        panic!("expected Status");
    };
    let exports = components
        .iter()
        .find(|s| s.name == "exports")
        .expect("an exports component");
    exports
        .message
        .split(", ")
        .find_map(|part| part.strip_suffix(" scans"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no scan count in {:?}", exports.message))
}

/// Waits until the daemon has run `n` more full scans.
fn wait_scans(d: &Daemon, c: &mut Client, n: u64) {
    let before = scans(c);
    assert!(
        wait_until(ARCHIVED_WITHIN, || scans(c) >= before + n),
        "fewer than {n} full scans; log:\n{}",
        d.stderr()
    );
}

/// A daemon with a one-second full scan and `extra` more `[monitor]` keys.
fn scanning_daemon(extra: &str) -> Daemon {
    let sandbox = Sandbox::new();
    sandbox.write_config(&format!("[monitor]\nscan_interval = \"1s\"\n{extra}"));
    Daemon::start(sandbox, Opts::default().with_config())
}

/// Writes `content` to `path` with a modification time an hour ago (old
/// enough for move mode to delete a file a scan finds).
fn write_old(path: &Path, content: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
    let f = fs::File::options().write(true).open(path).unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
}

/// A subdirectory of a watched tree atomically exchanged for a symbolic
/// link to a directory outside it (the kernel reports the directory moved
/// away and the link moved in), a watched root renamed away and replaced by
/// such a link, and a new watch whose tree already holds one: the daemon
/// must archive (or, in move mode, delete) nothing outside its trees.
fn symlink_swaps_never_leave_the_tree(mode: &str) {
    let d = scanning_daemon(&format!("archive_mode = \"{mode}\"\n"));
    let mut c = d.unix();
    let outside = workdir(&d, "outside");
    let secrets = [
        (outside.join("secret.md"), &b"outside the watch"[..]),
        (outside.join("deeper/more.md"), b"deeper outside"),
    ];
    for (path, content) in &secrets {
        write_old(path, content);
    }
    let work = workdir(&d, "work");
    let sub = work.join("sub");
    let inside = sub.join("inside.md");
    write_old(&inside, b"inside");
    let root2 = workdir(&d, "root2");
    let root3 = workdir(&d, "root3");
    std::os::unix::fs::symlink(&outside, root3.join("linked")).unwrap();
    watch(&mut c, &work, &["*.md"]);
    watch(&mut c, &root2, &["*.md"]);
    wait_rows(&d, &inside, 1);

    // The watched subdirectory `sub` becomes a link to `outside`.
    let staging = workdir(&d, "staging");
    let link = staging.join("link");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    if let Err(e) = rustix::fs::renameat_with(
        rustix::fs::CWD,
        &sub,
        rustix::fs::CWD,
        &link,
        rustix::fs::RenameFlags::EXCHANGE,
    ) {
        panic!("RENAME_EXCHANGE is needed for this test: {e}");
    }
    assert!(fs::symlink_metadata(&sub).unwrap().file_type().is_symlink());
    // The watched root `root2` becomes a link to `outside`.
    fs::rename(&root2, d.sandbox.path().join("root2.old")).unwrap();
    std::os::unix::fs::symlink(&outside, &root2).unwrap();
    // A new watch of a tree holding a link.
    watch(&mut c, &root3, &["*.md"]);

    let canary = work.join("canary.md");
    fs::write(&canary, b"still watching").unwrap();
    wait_rows(&d, &canary, 1);
    wait_scans(&d, &mut c, 2);
    barrier(&d, &work, "md");
    for (path, content) in &secrets {
        assert_eq!(
            fs::read(path).unwrap_or_default(),
            *content,
            "{} must be intact",
            path.display()
        );
    }
    let leaked: Vec<Archived> = rows(&d.db())
        .into_iter()
        .filter(|r| r.original.ends_with("secret.md") || r.original.ends_with("more.md"))
        .collect();
    assert!(
        leaked.is_empty(),
        "files outside the watch were archived: {leaked:#?}\nlog:\n{}",
        d.stderr()
    );
    let root2_state = list(&mut c)
        .into_iter()
        .find(|p| p.path == root2.display().to_string())
        .expect("root2 still listed");
    assert!(!root2_state.active, "a root that is a link now is missing");
    assert!(
        d.stderr().contains("symbolic link"),
        "the log says why: {}",
        d.stderr()
    );
}

#[test]
fn a_directory_swapped_for_a_symlink_is_never_followed_in_copy_mode() {
    symlink_swaps_never_leave_the_tree("copy");
}

#[test]
fn a_directory_swapped_for_a_symlink_is_never_followed_in_move_mode() {
    symlink_swaps_never_leave_the_tree("move");
}

#[test]
fn fifos_and_symlinks_matching_the_patterns_are_never_opened() {
    let d = Daemon::start_default();
    let mut c = d.unix();
    let work = workdir(&d, "work");
    let staging = workdir(&d, "staging");
    let target = staging.join("target.md");
    fs::write(&target, b"reached through a link").unwrap();
    let fifo = staging.join("pipe.md");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o666),
        0,
    )
    .unwrap();
    let link = staging.join("link.md");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    // Whoever opens the FIFO or the link's target shows up here.
    let mut opens = inotify::Inotify::init().unwrap();
    opens
        .watches()
        .add(&fifo, inotify::WatchMask::OPEN)
        .unwrap();
    opens
        .watches()
        .add(&target, inotify::WatchMask::OPEN)
        .unwrap();
    // A FIFO and a link already there when the watch starts (the start
    // scan sees them) ...
    let early_fifo = work.join("early.md");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &early_fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o666),
        0,
    )
    .unwrap();
    watch(&mut c, &work, &["*.md"]);
    // ... and moved in afterwards (inotify reports them as moved in).
    fs::rename(&fifo, work.join("pipe.md")).unwrap();
    fs::rename(&link, work.join("link.md")).unwrap();
    let canary = work.join("canary.md");
    fs::write(&canary, b"after the fifo").unwrap();
    wait_rows(&d, &canary, 1);
    c.ping();
    let mut buffer = [0u8; 4096];
    let seen: Vec<String> = match opens.read_events(&mut buffer) {
        Ok(events) => events.map(|e| format!("{:?}", e.mask)).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Vec::new(),
        Err(e) => panic!("reading inotify events: {e}"),
    };
    assert!(
        seen.is_empty(),
        "the daemon opened the FIFO or followed the link: {seen:?}"
    );
    let all = rows(&d.db());
    assert_eq!(all.len(), 1, "only the canary: {all:#?}");
}

#[test]
fn the_watch_cap_warns_once_and_the_scan_finds_what_is_not_watched() {
    let d = scanning_daemon("max_watches_per_root = 3\n");
    let mut c = d.unix();
    let work = workdir(&d, "work");
    let leaves: Vec<PathBuf> = (0..5).map(|i| work.join(format!("d{i}/x/y"))).collect();
    for leaf in &leaves {
        fs::create_dir_all(leaf).unwrap();
    }
    watch(&mut c, &work, &["*.md"]);
    let files: Vec<PathBuf> = leaves.iter().map(|l| l.join("late.md")).collect();
    for (i, f) in files.iter().enumerate() {
        fs::write(f, format!("file {i}")).unwrap();
    }
    for f in &files {
        wait_rows(&d, f, 1);
    }
    wait_scans(&d, &mut c, 3);
    let warnings: Vec<String> = d
        .stderr()
        .lines()
        .filter(|l| l.contains("max_watches_per_root"))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning for the tree, not one per directory or scan: {warnings:#?}\nlog:\n{}",
        d.stderr()
    );
    assert!(list(&mut c)[0].watch_cap_reached, "ListMonitoring says so");
    assert_eq!(rows(&d.db()).len(), files.len(), "each file once");
}

#[test]
fn repeated_full_scans_record_an_error_once() {
    let d = scanning_daemon("");
    let mut c = d.unix();
    let work = workdir(&d, "work");
    // Sparse, so it costs no space: larger than the archive's free space.
    let free = rustix::fs::statvfs(d.sandbox.db().parent().unwrap()).unwrap();
    let huge = work.join("huge.md");
    let f = fs::File::create(&huge).unwrap();
    f.set_len(free.f_bavail * free.f_frsize + (1 << 30))
        .unwrap();
    drop(f);
    watch(&mut c, &work, &["*.md"]);
    wait_rows(&d, &huge, 1);
    wait_scans(&d, &mut c, 3);
    let errors = wait_rows(&d, &huge, 1);
    assert_eq!(
        errors.len(),
        1,
        "one error row for one version, not one per scan: {errors:#?}"
    );
    let error = errors[0].error.as_deref().unwrap_or_default();
    assert!(
        error.contains("bytes needed plus the 16 MiB the archive keeps free"),
        "{error}"
    );
}

/// The uid the ownership test acts as.
const NOBODY: u32 = 65534;

#[test]
fn users_watch_only_their_own_directories_and_files() {
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("skipped: needs root to act as uid {NOBODY}");
        return;
    }
    let d = Daemon::start_default();
    let mut c = d.unix();
    // Let uid 65534 reach the socket.
    for dir in [d.sandbox.path(), d.socket().parent().unwrap()] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::set_permissions(d.socket(), fs::Permissions::from_mode(0o666)).unwrap();
    let chown = |p: &Path| std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    let as_nobody = |args: &[&str]| {
        let mut cmd = d.sandbox.codi2();
        std::os::unix::process::CommandExt::uid(&mut cmd, NOBODY);
        std::os::unix::process::CommandExt::gid(&mut cmd, NOBODY);
        cmd.arg("--socket").arg(d.socket()).args(args);
        cmd.current_dir("/");
        let out = run(cmd);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let theirs = workdir(&d, "root-owned");
    fs::write(theirs.join("secret.md"), b"root's").unwrap();
    let (ok, err) = as_nobody(&["watch", "add", &theirs.display().to_string()]);
    assert!(!ok, "uid {NOBODY} may not watch a root-owned directory");
    assert!(err.contains("Unauthorized"), "{err}");
    assert!(err.contains("not a directory owned by uid 65534"), "{err}");
    assert!(list(&mut c).is_empty());

    let mine = workdir(&d, "mine");
    chown(&mine);
    let own = mine.join("own.md");
    fs::write(&own, b"nobody's export").unwrap();
    chown(&own);
    let foreign = mine.join("foreign.md");
    fs::write(&foreign, b"root's file in nobody's directory").unwrap();
    let (ok, err) = as_nobody(&["watch", "add", &mine.display().to_string()]);
    assert!(ok, "{err}");
    let archived = wait_rows(&d, &own, 1);
    assert_eq!(archived[0].error, None);
    let refused = wait_rows(&d, &foreign, 1);
    assert!(
        refused.iter().all(|r| r.error.is_some()),
        "another user's file is not archived: {refused:#?}"
    );
    assert!(
        refused[0]
            .error
            .as_deref()
            .unwrap()
            .contains("owned by uid 0, not by uid 65534"),
        "{refused:#?}"
    );

    // Root's watch cannot be stopped by uid 65534, who is not even told it
    // exists (tests/access.rs); its own can.
    watch(&mut c, &theirs, &["*.md"]);
    let (ok, err) = as_nobody(&["watch", "remove", &theirs.display().to_string()]);
    assert!(!ok && err.contains("is not watched"), "{err}");
    assert_eq!(list(&mut c).len(), 2);
    let (ok, err) = as_nobody(&["watch", "remove", &mine.display().to_string()]);
    assert!(ok, "{err}");
    assert_eq!(list(&mut c).len(), 1);
    barrier(&d, &theirs, "md");
    assert_eq!(
        rows(&d.db())
            .iter()
            .filter(|r| r.original == foreign.display().to_string())
            .count(),
        1,
        "the refusal is recorded once"
    );
}

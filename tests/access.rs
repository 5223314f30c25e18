//! Who is who: every Unix client's uid is recorded with its logs and
//! sessions, and a client sees only its own logs and watches unless it is
//! root, the daemon's user or listed in `monitor.query_all_users` /
//! `query_all_groups`. The clients here are real `codi2` processes running
//! as other uids, in the socket's group.

#[allow(dead_code)]
mod common;

use codi_monitor::proto::{LogFilter, LogLevel, Message, Payload};
use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;

/// The group the socket is given to; every test user has it as its
/// primary group (Debian's `nogroup`).
const GROUP_ID: u32 = 65534;
/// Ordinary users, with no entry in the user database.
const ALICE: u32 = 40001;
const BOB: u32 = 40002;
/// A user listed in `monitor.query_all_users`.
const AUDITOR: u32 = 40003;

struct Host {
    sandbox: Arc<Sandbox>,
    daemon: Daemon,
}

impl Host {
    fn start() -> Host {
        Host::start_with("", Opts::default())
    }

    /// A daemon with `extra` lines in its `[monitor]` section.
    fn start_with(extra: &str, opts: Opts) -> Host {
        let sandbox = Sandbox::new();
        // Others must reach the socket directory inside the sandbox.
        fs::set_permissions(sandbox.path(), fs::Permissions::from_mode(0o711)).unwrap();
        sandbox.write_config(&format!(
            "[monitor]\nsocket_group = \"{GROUP_ID}\"\nquery_all_users = [\"{AUDITOR}\"]\n{extra}"
        ));
        let daemon = Daemon::start(Arc::clone(&sandbox), opts.with_config());
        Host { sandbox, daemon }
    }

    /// `codi2 ARGS` run as `uid` (group [`GROUP_ID`]), with a home of its own.
    fn codi2_as(&self, uid: u32, args: &[&str]) -> Output {
        let home: PathBuf = self.sandbox.path().join(format!("home-{uid}"));
        fs::create_dir_all(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(uid), Some(GROUP_ID)).unwrap();
        let mut cmd = self.sandbox.codi2();
        cmd.env("HOME", &home)
            .env("XDG_RUNTIME_DIR", home.join("run"))
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env("XDG_DATA_HOME", home.join("data"))
            .current_dir(&home)
            .arg("--socket")
            .arg(self.daemon.socket())
            .args(args)
            .uid(uid)
            .gid(GROUP_ID);
        run(cmd)
    }

    fn logs_as(&self, uid: u32, extra: &[&str]) -> Vec<serde_json::Value> {
        let mut args = vec!["logs", "--json", "--limit", "100"];
        args.extend_from_slice(extra);
        let out = self.codi2_as(uid, &args);
        assert!(out.status.success(), "{}", show(&out));
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn show(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn messages(rows: &[serde_json::Value]) -> Vec<(String, Option<u64>)> {
    let mut seen: Vec<(String, Option<u64>)> = rows
        .iter()
        .map(|r| (r["message"].as_str().unwrap().to_owned(), r["uid"].as_u64()))
        .collect();
    seen.sort();
    seen
}

#[test]
fn each_log_carries_its_writers_uid_and_users_see_only_their_own() {
    let host = Host::start();
    for (uid, text) in [(ALICE, "from alice"), (BOB, "from bob")] {
        let out = host.codi2_as(uid, &["log", text]);
        assert!(out.status.success(), "{}", show(&out));
    }
    host.daemon
        .unix()
        .expect_accepted(&log(LogLevel::Info, "root", "from root"));

    let own = |uid: u32, text: &str| vec![(text.to_owned(), Some(u64::from(uid)))];
    assert_eq!(
        messages(&host.logs_as(ALICE, &[])),
        own(ALICE, "from alice")
    );
    assert_eq!(messages(&host.logs_as(BOB, &[])), own(BOB, "from bob"));
    // Asking for another user's logs is refused, not answered with one's own.
    let out = host.codi2_as(BOB, &["logs", "--user", &ALICE.to_string()]);
    assert!(!out.status.success(), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("only its own logs"), "{}", show(&out));

    let everyone = vec![
        ("from alice".to_owned(), Some(u64::from(ALICE))),
        ("from bob".to_owned(), Some(u64::from(BOB))),
        ("from root".to_owned(), Some(0)),
    ];
    assert_eq!(messages(&host.logs_as(AUDITOR, &[])), everyone);
    assert_eq!(
        messages(&host.logs_as(AUDITOR, &["--user", &BOB.to_string()])),
        own(BOB, "from bob")
    );
    // Root over the protocol: every log, each with its uid.
    let answer = host.daemon.unix().call(Payload::QueryLogs {
        filter: LogFilter::default(),
        limit: 10,
    });
    let Payload::LogResults { entries, .. } = &answer.payload else {
        panic!("{answer:?}")
    };
    let mut uids: Vec<Option<u32>> = entries.iter().map(|e| e.uid).collect();
    uids.sort();
    assert_eq!(uids, [Some(0), Some(ALICE), Some(BOB)]);
    // The table shows who wrote each row (a uid without a name as its number).
    let out = host.codi2_as(AUDITOR, &["logs"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.contains(" root ") && l.contains("from root")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains(&ALICE.to_string()) && l.contains("from alice")),
        "{table}"
    );
}

#[test]
fn a_user_cannot_end_or_take_over_another_users_session() {
    let host = Host::start();
    let out = host.codi2_as(ALICE, &["session", "start", "alice-s"]);
    assert!(out.status.success(), "{}", show(&out));
    for args in [
        &["session", "end", "alice-s"][..],
        &["session", "start", "alice-s"][..],
    ] {
        let out = host.codi2_as(BOB, args);
        assert!(!out.status.success(), "bob {args:?}: {}", show(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("started by another user"),
            "{}",
            show(&out)
        );
    }
    let session = host.sandbox.open_db().session("alice-s").unwrap();
    assert_eq!(session.ended_at, None, "bob could not end it");
    let uid: Option<u32> = host
        .sandbox
        .open_db()
        .snapshot()
        .query_row("SELECT uid FROM sessions WHERE id = 'alice-s'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(uid, Some(ALICE));
    let out = host.codi2_as(ALICE, &["session", "end", "alice-s"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(host
        .sandbox
        .open_db()
        .session("alice-s")
        .unwrap()
        .ended_at
        .is_some());
}

#[test]
fn users_list_only_their_own_watches() {
    let host = Host::start();
    let dir = host.sandbox.path().join("alice-work");
    fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(ALICE), Some(GROUP_ID)).unwrap();
    let dir = dir.display().to_string();
    let out = host.codi2_as(ALICE, &["watch", "add", &dir]);
    assert!(out.status.success(), "{}", show(&out));
    let listed = |uid: u32| {
        let out = host.codi2_as(uid, &["watch", "list"]);
        assert!(out.status.success(), "{}", show(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(listed(ALICE).contains(&dir), "{}", listed(ALICE));
    assert!(!listed(BOB).contains(&dir), "{}", listed(BOB));
    assert!(listed(AUDITOR).contains(&dir), "{}", listed(AUDITOR));
}

#[test]
fn a_user_cannot_end_or_take_over_a_session_that_no_uid_started() {
    let host = Host::start();
    // Over TCP (the operator's token), a session has no uid.
    host.daemon
        .tcp()
        .expect_accepted(&Message::new(Payload::SessionStart {
            session_id: "tcp-s".into(),
            identity: "hub".into(),
            agent_type: None,
            workspace: None,
        }));
    for args in [
        &["session", "end", "tcp-s"][..],
        &["session", "start", "tcp-s"][..],
    ] {
        let out = host.codi2_as(BOB, args);
        assert!(!out.status.success(), "bob {args:?}: {}", show(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("started by another user"),
            "{}",
            show(&out)
        );
    }
    let session = host.sandbox.open_db().session("tcp-s").unwrap();
    assert_eq!(session.ended_at, None, "bob could not end it");
    // Those who may see everyone's logs still may.
    let out = host.codi2_as(AUDITOR, &["session", "end", "tcp-s"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(host
        .sandbox
        .open_db()
        .session("tcp-s")
        .unwrap()
        .ended_at
        .is_some());
}

#[test]
fn stopping_another_users_watch_looks_like_stopping_no_watch() {
    let host = Host::start();
    let mut dirs = Vec::new();
    for name in ["alice-watched", "alice-unwatched"] {
        let dir = host.sandbox.path().join(name);
        fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(ALICE), Some(GROUP_ID)).unwrap();
        dirs.push(dir.display().to_string());
    }
    let out = host.codi2_as(ALICE, &["watch", "add", &dirs[0]]);
    assert!(out.status.success(), "{}", show(&out));
    let refusal = |dir: &str| {
        let out = host.codi2_as(BOB, &["watch", "remove", dir]);
        assert!(!out.status.success(), "{}", show(&out));
        String::from_utf8_lossy(&out.stderr).replace(dir, "DIR")
    };
    let watched = refusal(&dirs[0]);
    assert!(!watched.contains(&ALICE.to_string()), "{watched}");
    assert_eq!(watched, refusal(&dirs[1]), "bob cannot tell the two apart");
    // The watch is still there, and its owner still may stop it.
    let out = host.codi2_as(ALICE, &["watch", "remove", &dirs[0]]);
    assert!(out.status.success(), "{}", show(&out));
}

/// The session the export at `path` was archived under, once it is.
fn archived_session(host: &Host, path: &std::path::Path) -> Option<String> {
    let name = path.display().to_string();
    let mut found = None;
    let archived = wait_until(std::time::Duration::from_secs(20), || {
        found = host
            .sandbox
            .open_db()
            .snapshot()
            .query_row(
                "SELECT session_id FROM export_archive WHERE original_path = ?1 \
                 AND error IS NULL",
                [&name],
                |r| r.get::<_, Option<String>>(0),
            )
            .ok();
        found.is_some()
    });
    assert!(archived, "{name} not archived:\n{}", host.daemon.stderr());
    found.unwrap()
}

/// Puts `bytes` at `path` as a file `uid` owns, in one rename.
fn place_file_of(uid: u32, path: &std::path::Path, bytes: &[u8]) {
    let tmp = path.with_extension("part");
    fs::write(&tmp, bytes).unwrap();
    std::os::unix::fs::chown(&tmp, Some(uid), Some(GROUP_ID)).unwrap();
    fs::rename(&tmp, path).unwrap();
}

#[test]
fn a_user_cannot_claim_another_users_exports_for_a_session() {
    let host = Host::start();
    let own_dir = |uid: u32, path: PathBuf| {
        fs::create_dir_all(&path).unwrap();
        std::os::unix::fs::chown(&path, Some(uid), Some(GROUP_ID)).unwrap();
        path
    };
    let alice_work = own_dir(ALICE, host.sandbox.path().join("alice-work"));
    let alice_sub = own_dir(ALICE, alice_work.join("sub"));
    let bob_work = own_dir(BOB, host.sandbox.path().join("bob-work"));
    let ok = |out: Output| assert!(out.status.success(), "{}", show(&out));
    let text = |p: &PathBuf| p.display().to_string();
    ok(host.codi2_as(
        ALICE,
        &[
            "session",
            "start",
            "alice-s",
            "--workspace",
            &text(&alice_work),
        ],
    ));
    ok(host.codi2_as(ALICE, &["watch", "add", &text(&alice_work)]));
    // Bob's session claims a deeper workspace inside Alice's, started later.
    ok(host.codi2_as(
        BOB,
        &[
            "session",
            "start",
            "bob-s",
            "--workspace",
            &text(&alice_sub),
        ],
    ));
    // Bob's own watch names Alice's session.
    ok(host.codi2_as(
        BOB,
        &["watch", "add", &text(&bob_work), "--session", "alice-s"],
    ));

    let alices = alice_sub.join("report.md");
    place_file_of(ALICE, &alices, b"alice's export");
    assert_eq!(
        archived_session(&host, &alices).as_deref(),
        Some("alice-s"),
        "bob's workspace does not take alice's exports"
    );
    let bobs = bob_work.join("notes.md");
    place_file_of(BOB, &bobs, b"bob's export");
    assert_eq!(
        archived_session(&host, &bobs),
        None,
        "bob's exports are not put in alice's session"
    );
}

#[test]
fn a_reload_that_names_an_unknown_user_still_revokes_the_others() {
    let host = Host::start();
    let out = host.codi2_as(BOB, &["log", "from bob"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        host.logs_as(AUDITOR, &[]).len(),
        1,
        "the auditor sees bob's"
    );
    // The operator removes the auditor and, in the same edit, names a user
    // that does not exist (yet).
    host.sandbox.write_config(&format!(
        "[monitor]\nsocket_group = \"{GROUP_ID}\"\nquery_all_users = [\"no-such-user-codi\"]\n"
    ));
    let before = host.daemon.stderr().len();
    host.daemon.signal(libc::SIGHUP);
    assert!(
        wait_until(std::time::Duration::from_secs(10), || host.daemon.stderr()
            [before..]
            .contains("configuration reloaded")),
        "{}",
        host.daemon.stderr()
    );
    let lines = host.daemon.stderr()[before..].to_owned();
    assert!(
        lines.contains("no-such-user-codi"),
        "the error names it: {lines}"
    );
    assert_eq!(
        messages(&host.logs_as(AUDITOR, &[])),
        [],
        "the removed auditor sees only their own"
    );
}

#[test]
fn a_tcp_client_without_a_token_sees_and_ends_nothing_of_the_unix_users() {
    let host = Host::start_with(
        "allow_unauthenticated_tcp = true\n",
        Opts::default().token(None),
    );
    let ok = |out: Output| assert!(out.status.success(), "{}", show(&out));
    ok(host.codi2_as(ALICE, &["session", "start", "alice-s"]));
    ok(host.codi2_as(ALICE, &["log", "-s", "alice-s", "from alice"]));
    let dir = host.sandbox.path().join("alice-work");
    fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(ALICE), Some(GROUP_ID)).unwrap();
    ok(host.codi2_as(ALICE, &["watch", "add", &dir.display().to_string()]));

    // Any local user can be this client: it has no token to show.
    let mut tcp = host.daemon.tcp_raw();
    tcp.expect_accepted(&log(LogLevel::Info, "tcp", "from tcp"));
    let query = |tcp: &mut Client, filter: LogFilter| {
        let answer = tcp.call(Payload::QueryLogs { filter, limit: 10 });
        let Payload::LogResults {
            entries,
            total_count,
        } = answer.payload
        else {
            panic!("{answer:?}")
        };
        let seen: Vec<String> = entries.into_iter().map(|e| e.message).collect();
        (seen, total_count)
    };
    assert_eq!(
        query(&mut tcp, LogFilter::default()),
        (vec!["from tcp".to_owned()], 1),
        "only what clients without a uid wrote"
    );
    let alices = LogFilter {
        uid: Some(ALICE),
        ..LogFilter::default()
    };
    let answer = tcp.call(Payload::QueryLogs {
        filter: alices,
        limit: 10,
    });
    assert_error(&answer, codi_monitor::proto::ErrorCode::Unauthorized);
    let answer = tcp.call(Payload::ListMonitoring);
    let Payload::Monitoring { paths } = &answer.payload else {
        panic!("{answer:?}")
    };
    assert!(paths.is_empty(), "{paths:?}");
    let end = Message::new(Payload::SessionEnd {
        session_id: "alice-s".into(),
    });
    let answer = tcp.request(&end);
    assert!(
        assert_rejected(&answer, end.id).contains("started by another user"),
        "{answer:?}"
    );
    assert_eq!(
        host.sandbox.open_db().session("alice-s").unwrap().ended_at,
        None
    );
}

#[test]
fn watch_refusals_tell_nothing_of_paths_the_asker_cannot_reach() {
    let host = Host::start();
    // Alice's private tree: only she (and the daemon, as root) can look in.
    let private = host.sandbox.path().join("alice-private");
    fs::create_dir_all(private.join("project")).unwrap();
    fs::write(private.join("plan.md"), b"alice's plan").unwrap();
    std::os::unix::fs::symlink(private.join("project"), private.join("link")).unwrap();
    for p in ["", "project", "plan.md"] {
        std::os::unix::fs::chown(private.join(p), Some(ALICE), Some(GROUP_ID)).unwrap();
    }
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
    let refusal = |args: &[&str], path: &PathBuf| {
        let path = path.display().to_string();
        let mut args = args.to_vec();
        args.push(&path);
        let out = host.codi2_as(BOB, &args);
        assert!(!out.status.success(), "{}", show(&out));
        String::from_utf8_lossy(&out.stderr).replace(&path, "PATH")
    };
    for args in [&["watch", "add"][..], &["watch", "remove"][..]] {
        let missing = refusal(args, &private.join("no-such"));
        for name in ["project", "plan.md", "link"] {
            let answer = refusal(args, &private.join(name));
            assert_eq!(answer, missing, "{args:?} {name}: bob learns nothing");
        }
        assert!(!missing.contains(&ALICE.to_string()), "{missing}");
    }
}

#[test]
fn the_status_does_not_tell_a_user_that_another_already_exported_the_same_content() {
    // No periodic scan during the test: its counter would move on its own.
    let host = Host::start_with("scan_interval = \"1d\"\n", Opts::default());
    let own_dir = |uid: u32, name: &str| {
        let path = host.sandbox.path().join(name);
        fs::create_dir(&path).unwrap();
        std::os::unix::fs::chown(&path, Some(uid), Some(GROUP_ID)).unwrap();
        path
    };
    let ok = |out: Output| assert!(out.status.success(), "{}", show(&out));
    let alice_work = own_dir(ALICE, "alice-work");
    let bob_work = own_dir(BOB, "bob-work");
    ok(host.codi2_as(ALICE, &["watch", "add", &alice_work.display().to_string()]));
    ok(host.codi2_as(BOB, &["watch", "add", &bob_work.display().to_string()]));
    let secret = alice_work.join("verdict.md");
    place_file_of(ALICE, &secret, b"the merger is approved");
    archived_session(&host, &secret);

    // What bob can see of the exports, less the count of files archived
    // (which his own guesses move).
    let seen_by_bob = || {
        let out = host.codi2_as(BOB, &["status"]);
        assert!(out.status.success(), "{}", show(&out));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text
            .lines()
            .find(|l| l.starts_with("exports"))
            .unwrap_or_else(|| panic!("{text}"))
            .to_owned();
        let words: Vec<&str> = line.split_whitespace().collect();
        let mut masked = Vec::new();
        for (i, word) in words.iter().enumerate() {
            let counted = words.get(i + 1).is_some_and(|w| w.starts_with("archived"));
            masked.push(if counted { "#" } else { word });
        }
        masked.join(" ")
    };
    let wrong = bob_work.join("guess-1.md");
    place_file_of(BOB, &wrong, b"the merger is rejected");
    archived_session(&host, &wrong);
    let after_wrong = seen_by_bob();
    let right = bob_work.join("guess-2.md");
    place_file_of(BOB, &right, b"the merger is approved");
    archived_session(&host, &right);
    assert_eq!(
        seen_by_bob(),
        after_wrong,
        "a right guess looks like a wrong one"
    );
}

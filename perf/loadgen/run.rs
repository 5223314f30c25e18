//! `codi-loadgen run`: plans the connections, starts the driver threads on
//! a common instant, shows progress, then checks the database and reports.

use crate::args::{Endpoint, RunConfig};
use crate::ceiling::{self, CeilingResult};
use crate::driver::{self, new_hist, Counts, Plan, Setup, Shared, ThreadResult};
use crate::payload::{load_template, query_template, run_tag, session_range};
use crate::procstat::{self, ProcSample};
use crate::report::{fmt_count, fmt_rate, fmt_us, write_hist_files, Percentiles};
use crate::schedule::{frame_rate, Schedule};
use codi_monitor::proto::{encode_message, Message, Payload};
use codi_monitor::store::{batch_entry_id, ingest, schema};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use uuid::Uuid;

/// Descriptors kept free beyond the connections (database, files, stdio).
const SPARE_FDS: u64 = 64;
/// How often the progress line is refreshed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What the database says about this run's rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCheck {
    /// Rows tagged with this run's session id.
    pub stored: u64,
    /// Acknowledged entries whose uuid is absent, when ids were checked.
    pub missing: Option<u64>,
}

/// Everything a run measured.
pub struct Outcome {
    run_id: Uuid,
    counts: Counts,
    ack: Histogram<u64>,
    service: Histogram<u64>,
    ping: Histogram<u64>,
    query: Histogram<u64>,
    measured: Duration,
    stored: Option<StoredCheck>,
    daemon: Option<(u32, ProcSample, ProcSample, u64)>,
    self_cpu: Duration,
    wall: Duration,
    ceiling: Option<CeilingResult>,
    errors: Vec<String>,
    loadavg: String,
}

impl Outcome {
    /// Acknowledged entries per second of measured time.
    fn throughput(&self) -> f64 {
        self.counts.entries_accepted as f64 / self.measured.as_secs_f64().max(1e-9)
    }

    /// True when the database was checked and stored != acknowledged.
    fn mismatch(&self) -> bool {
        self.stored
            .as_ref()
            .is_some_and(|s| s.stored != self.counts.entries_accepted)
    }
}

/// Splits the connections over the threads: load clients round-robin, one
/// ping connection per thread, the query connection on thread 0, idle ones
/// spread evenly.
pub fn plans(cfg: &RunConfig) -> Vec<Plan> {
    let frames = cfg.rate.map(|r| frame_rate(r, cfg.batch));
    (0..cfg.threads)
        .map(|t| Plan {
            thread: t,
            clients: (t..cfg.clients)
                .step_by(cfg.threads)
                .map(|i| {
                    (
                        i,
                        frames.map(|f| Schedule::new(f, cfg.clients, i, cfg.duration)),
                    )
                })
                .collect(),
            idle: cfg.idle / cfg.threads + usize::from(t < cfg.idle % cfg.threads),
            ping: (cfg.ping_rate > 0.0)
                .then(|| Schedule::new(cfg.ping_rate, cfg.threads, t, cfg.duration)),
            query: cfg
                .query_interval
                .filter(|_| t == 0)
                .map(|every| Schedule::new(1.0 / every.as_secs_f64(), 1, 0, cfg.duration)),
        })
        .collect()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Runs the whole `run` subcommand; `Ok(true)` when every check passed.
pub fn execute(cfg: RunConfig) -> Result<bool, String> {
    let nofile = procstat::raise_nofile_limit();
    let needed = cfg.connections() as u64 + SPARE_FDS;
    if nofile < needed {
        return Err(format!(
            "{} connections need about {needed} open files, but the limit is {nofile} \
             (raise the hard limit: ulimit -Hn)",
            cfg.connections()
        ));
    }
    let run_id = Uuid::now_v7();
    let template = load_template(cfg.batch, cfg.message_size, &run_tag(run_id));
    for msg in [&template, &query_template(), &Message::new(Payload::Ping)] {
        encode_message(msg, &mut Vec::new()).map_err(|e| {
            format!(
                "a frame of --batch {} x --message-size {}: {e}",
                cfg.batch, cfg.message_size
            )
        })?;
    }
    let daemon_start = procstat::sample_daemon(cfg.daemon_pid)?;
    let loadavg = loadavg();
    let setup = Setup {
        endpoint: cfg.endpoint.clone(),
        window: cfg.window,
        duration: cfg.duration,
        template,
        session_tag: run_tag(run_id),
        batch: cfg.batch as u32,
        token: std::env::var("CODI_MONITOR_TOKEN")
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty()),
    };
    let shared = Arc::new(Shared::new());
    let (ready_tx, ready_rx) = crossbeam_channel::unbounded();
    let mut handles = Vec::new();
    let mut gos = Vec::new();
    for plan in plans(&cfg) {
        let (go_tx, go_rx) = crossbeam_channel::bounded(1);
        let handle = driver::spawn(
            plan,
            setup.clone(),
            Arc::clone(&shared),
            ready_tx.clone(),
            go_rx,
        )
        .map_err(|e| format!("cannot start a driver thread: {e}"))?;
        handles.push(handle);
        gos.push(go_tx);
    }
    drop(ready_tx);
    let mut failure = None;
    for _ in 0..handles.len() {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(_) => failure = failure.or(Some("a driver thread died".into())),
        }
    }
    if let Some(e) = failure {
        for go in &gos {
            let _ = go.send(None);
        }
        for h in handles {
            let _ = h.join();
        }
        return Err(e);
    }

    let cpu_before = procstat::self_cpu();
    let started_wall = SystemTime::now();
    let start = Instant::now();
    for go in &gos {
        let _ = go.send(Some(start));
    }
    let mut peak_rss = daemon_start.map_or(0, |s| s.rss_kib);
    let tty = std::io::stderr().is_terminal();
    let mut last = (start, 0u64, 0u64);
    while !handles.iter().all(|h| h.is_finished()) {
        std::thread::sleep(Duration::from_millis(50));
        let now = Instant::now();
        if now.duration_since(last.0) < PROGRESS_EVERY {
            continue;
        }
        if let Some(s) = cfg.daemon_pid.and_then(procstat::sample) {
            peak_rss = peak_rss.max(s.rss_kib);
        }
        let p = &shared.progress;
        let sent = p.entries_sent.load(Ordering::Relaxed);
        let acked = p.entries_acked.load(Ordering::Relaxed);
        if !cfg.quiet {
            let secs = now.duration_since(last.0).as_secs_f64();
            let outstanding = p
                .frames_sent
                .load(Ordering::Relaxed)
                .saturating_sub(p.frames_done.load(Ordering::Relaxed));
            let p99 = shared.ack.lock().value_at_quantile(0.99);
            let line = format!(
                "[{:>6.1}s] sent {:>10}  acked {:>10}  outstanding {:>6}  ack p99 {:>9}  failures {}",
                now.duration_since(start).as_secs_f64(),
                fmt_rate((sent - last.1) as f64 / secs),
                fmt_rate((acked - last.2) as f64 / secs),
                outstanding,
                fmt_us(p99),
                p.failures.load(Ordering::Relaxed)
            );
            if tty {
                eprint!("\r{line}\x1b[K");
            } else {
                eprintln!("{line}");
            }
        }
        last = (now, sent, acked);
    }
    if tty && !cfg.quiet {
        eprintln!();
    }
    let wall = start.elapsed();
    let self_cpu = procstat::self_cpu().saturating_sub(cpu_before);
    let daemon = match (cfg.daemon_pid, daemon_start) {
        (Some(pid), Some(before)) => procstat::sample(pid).map(|after| {
            peak_rss = peak_rss.max(after.rss_kib);
            (pid, before, after, peak_rss)
        }),
        _ => None,
    };

    let mut counts = Counts::default();
    let (mut service, mut ping, mut query) = (new_hist(), new_hist(), new_hist());
    let mut accepted = Vec::new();
    let mut ids_complete = true;
    let mut errors = Vec::new();
    let mut last_ack = None;
    for h in handles {
        let r: ThreadResult = h
            .join()
            .map_err(|_| "a driver thread panicked".to_owned())?
            .ok_or("a driver thread did not run")?;
        counts.add(&r.counts);
        let _ = service.add(&r.service);
        let _ = ping.add(&r.ping);
        let _ = query.add(&r.query);
        ids_complete &= !r.accepted_truncated;
        accepted.extend(r.accepted);
        errors.extend(r.errors);
        last_ack = last_ack.max(r.last_ack);
    }
    let ack = shared.ack.lock().clone();
    let measured = last_ack.map_or(cfg.duration, |t| t.duration_since(start));

    let stored = match &cfg.db {
        Some(db) => Some(check_stored(
            db,
            &run_tag(run_id),
            counts.entries_accepted,
            ids_complete.then_some(accepted.as_slice()),
        )?),
        None => None,
    };
    let ceiling = match (&cfg.db, cfg.ceiling) {
        (Some(db), Some((rows, batch, trim_wal))) => {
            let dir = db.parent().filter(|p| !p.as_os_str().is_empty());
            let path = dir
                .unwrap_or(Path::new("."))
                .join(format!("loadgen-ceiling-{run_id}.db"));
            let waited = ceiling::settle(db);
            if !cfg.quiet {
                eprintln!(
                    "ceiling: waited {:.1} s for the daemon's WAL checkpoint; inserting {} rows into {}",
                    waited.as_secs_f64(),
                    fmt_count(rows),
                    path.display()
                );
            }
            let result = ceiling::run(&path, rows, batch, cfg.message_size, cfg.clients, trim_wal);
            ceiling::remove_db(&path);
            Some(result?)
        }
        _ => None,
    };
    let outcome = Outcome {
        run_id,
        counts,
        ack,
        service,
        ping,
        query,
        measured,
        stored,
        daemon,
        self_cpu,
        wall,
        ceiling,
        errors,
        loadavg,
    };
    print!("{}", summary(&cfg, &outcome));
    if let Some(path) = &cfg.json {
        let doc = serde_json::to_string_pretty(&to_json(&cfg, &outcome)).expect("json");
        std::fs::write(path, doc + "\n")
            .map_err(|e| format!("cannot write `{}`: {e}", path.display()))?;
    }
    if let Some(dir) = &cfg.hist_dir {
        for (name, h) in histograms(&outcome) {
            write_hist_files(dir, name, h, started_wall, outcome.measured)?;
        }
    }
    Ok(!outcome.mismatch() && outcome.counts.protocol_errors == 0)
}

fn histograms(o: &Outcome) -> [(&'static str, &Histogram<u64>); 4] {
    [
        ("ack", &o.ack),
        ("service", &o.service),
        ("ping", &o.ping),
        ("query", &o.query),
    ]
}

/// Counts this run's rows; if fewer than acknowledged and every accepted id
/// is known, also counts which acknowledged entries are missing.
fn check_stored(
    db: &Path,
    tag: &str,
    acked: u64,
    accepted: Option<&[(Uuid, u32)]>,
) -> Result<StoredCheck, String> {
    let conn = schema::open_ro(db).map_err(|e| format!("cannot check the database: {e}"))?;
    // Both files, as the daemon's readers see them.
    let conn = ingest::begin_read(&conn).map_err(|e| format!("cannot read the database: {e}"))?;
    let stored: i64 = conn
        .query_row(
            "SELECT count(*) FROM all_logs WHERE session_id >= ?1 AND session_id < ?2",
            {
                let (low, high) = session_range(tag);
                [low, high]
            },
            |r| r.get(0),
        )
        .map_err(|e| format!("cannot count stored rows: {e}"))?;
    let stored = stored as u64;
    let missing = match accepted {
        Some(ids) if stored < acked => {
            let mut stmt = conn
                .prepare("SELECT count(*) FROM all_logs WHERE uuid = ?1")
                .map_err(|e| e.to_string())?;
            let mut missing = 0u64;
            for &(id, entries) in ids {
                for i in 0..entries as usize {
                    let uuid = batch_entry_id(id, i);
                    let n: i64 = stmt
                        .query_row([uuid.as_bytes().as_slice()], |r| r.get(0))
                        .map_err(|e| e.to_string())?;
                    missing += u64::from(n == 0);
                }
            }
            Some(missing)
        }
        _ => None,
    };
    Ok(StoredCheck { stored, missing })
}

fn endpoint_text(e: &Endpoint) -> String {
    match e {
        Endpoint::Unix(p) => format!("unix {}", p.display()),
        Endpoint::Tcp(a) => format!("tcp {a}"),
    }
}

fn load_text(cfg: &RunConfig) -> String {
    match cfg.rate {
        Some(rate) => {
            let frames = frame_rate(rate, cfg.batch);
            let period = Schedule::new(frames, cfg.clients, 0, cfg.duration).period();
            format!(
                "open loop {} logs/s ({} frames/s of {}, each client every {})",
                fmt_count(rate.round() as u64),
                fmt_count(frames.round() as u64),
                cfg.batch,
                fmt_us(period.as_micros() as u64)
            )
        }
        None => format!("closed loop, frames of {}", cfg.batch),
    }
}

/// The human summary.
fn summary(cfg: &RunConfig, o: &Outcome) -> String {
    let c = &o.counts;
    let mut s = String::new();
    let mut line = |text: String| {
        s.push_str(&text);
        s.push('\n');
    };
    line(format!(
        "codi-loadgen run {} ({}; load average {})",
        o.run_id,
        endpoint_text(&cfg.endpoint),
        o.loadavg
    ));
    line(format!(
        "  load        {} clients on {} threads, {}, window {}, message {} B, {:.1} s{}{}{}",
        cfg.clients,
        cfg.threads,
        load_text(cfg),
        cfg.window,
        cfg.message_size,
        cfg.duration.as_secs_f64(),
        if cfg.idle > 0 {
            format!(", {} idle", cfg.idle)
        } else {
            String::new()
        },
        if cfg.ping_rate > 0.0 {
            format!(", pings {}", fmt_rate(cfg.ping_rate))
        } else {
            String::new()
        },
        cfg.query_interval
            .map(|q| format!(", query every {} ms", q.as_millis()))
            .unwrap_or_default()
    ));
    line(format!(
        "  sent        {} logs in {} frames; late sends {}; due but never sent {}",
        fmt_count(c.entries_sent),
        fmt_count(c.frames_sent),
        fmt_count(c.late_sends),
        fmt_count(c.frames_unsent)
    ));
    line(format!(
        "  acknowledged {} logs (Accepted, {} frames); rejected {}; errors {}; queued {}; \
         unanswered {}; protocol errors {}; connections lost {}",
        fmt_count(c.entries_accepted),
        fmt_count(c.frames_accepted),
        fmt_count(c.entries_rejected),
        fmt_count(c.errors),
        fmt_count(c.entries_queued),
        fmt_count(c.entries_unanswered),
        fmt_count(c.protocol_errors),
        fmt_count(c.connections_lost)
    ));
    match &o.stored {
        Some(check) if check.stored == c.entries_accepted => line(format!(
            "  stored      {}   STORED == ACKED",
            fmt_count(check.stored)
        )),
        Some(check) => {
            line(format!(
                "  !!!!!!!!!!  MISMATCH: stored {} != acknowledged {}  !!!!!!!!!!",
                fmt_count(check.stored),
                fmt_count(c.entries_accepted)
            ));
            if let Some(missing) = check.missing {
                line(format!(
                    "  !!!!!!!!!!  {} acknowledged logs are NOT in the database",
                    fmt_count(missing)
                ));
            }
            if check.stored > c.entries_accepted && c.entries_unanswered > 0 {
                line(format!(
                    "              ({} logs were sent but never answered; the daemon may have \
                     stored them without the answer arriving)",
                    fmt_count(c.entries_unanswered)
                ));
            }
        }
        None => line("  stored      not checked (no --db)".into()),
    }
    line(format!(
        "  throughput  {} logs/s acknowledged over {:.2} s; {:.2} MB/s of message text",
        fmt_count(o.throughput().round() as u64),
        o.measured.as_secs_f64(),
        o.throughput() * cfg.message_size as f64 / 1e6
    ));
    line(format!(
        "  ack latency (from scheduled send)  {}",
        Percentiles::of(&o.ack).line()
    ));
    line(format!(
        "  ack service time (from real send)  {}",
        Percentiles::of(&o.service).line()
    ));
    if cfg.ping_rate > 0.0 {
        line(format!(
            "  ping round trip                    {}",
            Percentiles::of(&o.ping).line()
        ));
    }
    if cfg.query_interval.is_some() {
        line(format!(
            "  query latency                      {}",
            Percentiles::of(&o.query).line()
        ));
    }
    if let Some((pid, before, after, peak)) = &o.daemon {
        line(format!(
            "  daemon      pid {pid}: CPU {:.1} % of one core; RSS {:.1} MiB at end, peak {:.1} MiB",
            cpu_percent(after.cpu.saturating_sub(before.cpu), o.wall),
            after.rss_kib as f64 / 1024.0,
            after.hwm_kib.max(*peak) as f64 / 1024.0
        ));
    }
    line(format!(
        "  loadgen     CPU {:.1} % of one core",
        cpu_percent(o.self_cpu, o.wall)
    ));
    if let Some(ceil) = &o.ceiling {
        line(format!(
            "  ceiling     raw SQLite {} rows/s ({:.2} MB/s of text), {} rows in transactions of {}; \
             longest transaction {}, {} over {} ms{}",
            fmt_count(ceil.rows_per_sec().round() as u64),
            ceil.payload_mb_per_sec(),
            fmt_count(ceil.rows),
            ceil.batch,
            fmt_us(ceil.longest.as_micros() as u64),
            ceil.stalls,
            ceiling::STALL.as_millis(),
            if ceil.trim_wal { "" } else { "; PASSIVE checkpoints only" }
        ));
        line(format!(
            "  daemon / ceiling = {:.3}",
            o.throughput() / ceil.rows_per_sec()
        ));
    }
    if !o.errors.is_empty() {
        line("  first failures:".into());
        for e in &o.errors {
            line(format!("    {e}"));
        }
    }
    s
}

fn cpu_percent(cpu: Duration, wall: Duration) -> f64 {
    100.0 * cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9)
}

fn path_json(p: &Option<PathBuf>) -> Value {
    p.as_ref()
        .map_or(Value::Null, |p| Value::from(p.display().to_string()))
}

/// Every number of the run, for `--json`.
fn to_json(cfg: &RunConfig, o: &Outcome) -> Value {
    let c = &o.counts;
    json!({
        "run_id": o.run_id.to_string(),
        "session_tag": run_tag(o.run_id),
        "machine": {
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "loadavg_at_start": o.loadavg,
        },
        "config": {
            "transport": cfg.endpoint.transport(),
            "endpoint": endpoint_text(&cfg.endpoint),
            "db": path_json(&cfg.db),
            "clients": cfg.clients,
            "threads": cfg.threads,
            "rate": cfg.rate,
            "duration_s": cfg.duration.as_secs_f64(),
            "batch": cfg.batch,
            "window": cfg.window,
            "message_size": cfg.message_size,
            "ping_rate": cfg.ping_rate,
            "idle": cfg.idle,
            "query_interval_ms": cfg.query_interval.map(|q| q.as_millis() as u64),
        },
        "counts": serde_json::to_value(c).expect("counts serialize"),
        "stored": o.stored.as_ref().map(|s| s.stored),
        "stored_equals_acked": o.stored.as_ref().map(|s| s.stored == c.entries_accepted),
        "acked_missing_from_db": o.stored.as_ref().and_then(|s| s.missing),
        "measured_s": o.measured.as_secs_f64(),
        "throughput_logs_per_s": o.throughput(),
        "payload_mb_per_s": o.throughput() * cfg.message_size as f64 / 1e6,
        "latency": {
            "ack": Percentiles::of(&o.ack).json(),
            "service": Percentiles::of(&o.service).json(),
            "ping": Percentiles::of(&o.ping).json(),
            "query": Percentiles::of(&o.query).json(),
        },
        "daemon": o.daemon.as_ref().map(|(pid, before, after, peak)| json!({
            "pid": pid,
            "cpu_percent": cpu_percent(after.cpu.saturating_sub(before.cpu), o.wall),
            "rss_kib_end": after.rss_kib,
            "peak_rss_kib": after.hwm_kib.max(*peak),
        })),
        "loadgen": { "cpu_percent": cpu_percent(o.self_cpu, o.wall) },
        "ceiling": o.ceiling.as_ref().map(ceiling_json),
        "daemon_over_ceiling": o.ceiling.as_ref().map(|ceil| o.throughput() / ceil.rows_per_sec()),
        "errors": o.errors,
    })
}

/// The ceiling's numbers as JSON.
pub fn ceiling_json(c: &CeilingResult) -> Value {
    json!({
        "rows": c.rows,
        "batch": c.batch,
        "message_size": c.message_size,
        "busy_s": c.busy.as_secs_f64(),
        "wall_s": c.wall.as_secs_f64(),
        "rows_per_s": c.rows_per_sec(),
        "payload_mb_per_s": c.payload_mb_per_sec(),
        "checkpoints": c.checkpoints,
        "wal_restarts": c.trim_wal,
        "longest_transaction_us": c.longest.as_micros() as u64,
        "stalls_over_100ms": c.stalls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Args;
    use argh::FromArgs;

    fn cfg(args: &[&str]) -> RunConfig {
        let crate::args::Command::Run(run) =
            Args::from_args(&["codi-loadgen"], args).unwrap().command
        else {
            panic!()
        };
        run.validate().unwrap()
    }

    #[test]
    fn connections_are_spread_over_threads() {
        let c = cfg(&[
            "run",
            "--socket",
            "/s",
            "--clients",
            "5",
            "--threads",
            "2",
            "--idle",
            "3",
            "--ping-rate",
            "10",
            "--query-interval",
            "100",
            "--rate",
            "1000",
            "--duration",
            "1",
        ]);
        let p = plans(&c);
        assert_eq!(p.len(), 2);
        let ids: Vec<Vec<usize>> = p
            .iter()
            .map(|p| p.clients.iter().map(|(i, _)| *i).collect())
            .collect();
        assert_eq!(ids, [vec![0, 2, 4], vec![1, 3]]);
        assert_eq!((p[0].idle, p[1].idle), (2, 1));
        assert!(p.iter().all(|p| p.ping.is_some()));
        assert!(p[0].query.is_some() && p[1].query.is_none());
        // 1,000 logs/s over 5 clients for 1 s: 200 frames each, 1,000 in all.
        let frames: u64 = p
            .iter()
            .flat_map(|p| p.clients.iter().map(|(_, s)| s.unwrap().frames()))
            .sum();
        assert_eq!(frames, 1000);
        // 10 pings/s over 2 threads for 1 s, 10 queries/s.
        let pings: u64 = p.iter().map(|p| p.ping.unwrap().frames()).sum();
        assert_eq!(pings, 10);
        assert_eq!(p[0].query.unwrap().frames(), 10);
    }
}

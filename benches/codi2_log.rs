//! End-to-end latency of `codi2 log` against a running daemon: process
//! start, connect, send, durable commit, acknowledgment, exit.
//!
//! `cargo bench --bench codi2_log` runs 1,000 invocations (set
//! `CODI_BENCH_RUNS` to change it) and prints hdrhistogram percentiles next
//! to the floor of spawning `/bin/true` measured in the same run, so results
//! read as a ratio. Under `cargo test` it runs a 5-invocation smoke check.

use hdrhistogram::Histogram;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let runs: u64 = match std::env::var("CODI_BENCH_RUNS") {
        Ok(v) => v.parse().expect("CODI_BENCH_RUNS must be a number"),
        Err(_) if benching => 1000,
        Err(_) => 5,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("run/m.sock");
    let db = dir.path().join("data/codi.db");
    let mut daemon = start_daemon(&socket, &db);

    let codi2 = env!("CARGO_BIN_EXE_codi2");
    let log_run = || {
        let status = Command::new(codi2)
            .arg("--socket")
            .arg(&socket)
            .arg("--db")
            .arg(&db)
            .args([
                "log",
                "-l",
                "info",
                "-c",
                "bench",
                "codi2 end-to-end latency probe",
            ])
            .stdout(Stdio::null())
            .status()
            .expect("run codi2");
        assert!(status.success(), "codi2 log failed: {status}");
    };
    let spawn_floor = || {
        let status = Command::new("/bin/true").status().expect("run /bin/true");
        assert!(status.success());
    };

    // Warm the page cache and the daemon's connection path first.
    for _ in 0..runs.min(20) {
        log_run();
    }
    let floor = measure(runs, spawn_floor);
    let codi2_log = measure(runs, log_run);

    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let _ = daemon.wait();

    println!(
        "codi2 log end to end, {runs} runs ({} cores):",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    report("/bin/true spawn floor", &floor);
    report("codi2 log", &codi2_log);
    println!(
        "ratio codi2 log / spawn floor: p50 {:.2}x, p99 {:.2}x",
        codi2_log.value_at_quantile(0.5) as f64 / floor.value_at_quantile(0.5).max(1) as f64,
        codi2_log.value_at_quantile(0.99) as f64 / floor.value_at_quantile(0.99).max(1) as f64
    );
}

fn measure(runs: u64, mut f: impl FnMut()) -> Histogram<u64> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    for _ in 0..runs {
        let start = Instant::now();
        f();
        hist.saturating_record(start.elapsed().as_micros() as u64);
    }
    hist
}

fn report(name: &str, h: &Histogram<u64>) {
    println!(
        "  {name:<24} p50 {:>6} us  p90 {:>6} us  p99 {:>6} us  p99.9 {:>6} us  max {:>6} us",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    );
}

fn start_daemon(socket: &Path, db: &Path) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_codi-monitor"))
        .arg("--socket")
        .arg(socket)
        .arg("--db")
        .arg(db)
        .args(["--log-level", "warn"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start codi-monitor");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read READY line");
    assert!(line.starts_with("READY"), "daemon did not start: {line:?}");
    child
}

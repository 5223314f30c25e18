//! Assembles the daemon: binds the listeners, opens the database, builds
//! every thread and queue before any loop runs, then waits for a signal.
//!
//! Shutdown order matters for the delivery promise: loops stop accepting,
//! answer what they already read and exit; the threads that write through
//! the merger (the export watcher, with its final flush, the salvager, hub
//! sync) stop next; then the last sender of the writer's queue goes, so the
//! writer drains, commits and checkpoints, and the merger finishes; only
//! then does the process exit. Those threads start after the writer, so
//! the merger is there for their first write.

use crate::access::Access;
use crate::admin::{self, AdminHandle};
use crate::budget::InflightBudget;
use crate::config::{Config, Overrides};
use crate::export::{spawn_watcher, ExportSettings};
use crate::health::report::{HealthSettings, Sources};
use crate::health::watchdog::{spawn_watchdog, DiskThresholds};
use crate::health::Severity;
use crate::hub::sync::{LiveTuning, Tuning};
use crate::io::answers::answer_pool_bytes;
use crate::io::event_loop::{Acceptor, EventLoop, LoopLimits, Peer, WAKER};
use crate::io::listener::{bind_tcp, bind_unix, ListenError, UnixEndpoint};
use crate::io::request::{AuthGuard, LiveSettings, Services};
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::reply::{self, Replies};
use crate::store::lock::DatabaseLock;
use crate::store::reader::spawn_readers;
use crate::store::recovery;
use crate::store::retention::{RetentionPolicy, SizeCap};
use crate::store::salvager::spawn_salvager;
use crate::store::writer::{spawn_writer, WriterSettings};
use crate::store::StoreError;
use mio::{Poll, Waker};
use parking_lot::Mutex;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Stack of each event loop: decoding recurses once per nesting level of a
/// frame (capped by `proto::MAX_NESTING`); this leaves a wide margin even in
/// debug builds. Untouched stack costs address space, not memory.
const LOOP_STACK: usize = 8 * 1024 * 1024;
/// Queries waiting for a reader before new ones are turned away.
const QUERY_QUEUE: usize = 256;

/// Why the daemon could not start or stopped abnormally.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// A listener could not be set up.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// The database could not be opened.
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// Threads, polls or signal handlers could not be created.
    #[error("{0}: {1}")]
    Os(&'static str, io::Error),
    /// A user or group the configuration names does not exist.
    #[error("{0}")]
    Access(String),
    /// A storage thread found a file corrupt; the next start salvages it.
    #[error(
        "stopped to salvage a corrupt database file; start the daemon again (systemd does) to \
         move it aside and salvage its rows"
    )]
    StoppedToSalvage,
}

/// Runs the daemon until SIGTERM or SIGINT; `overrides` are re-applied when
/// SIGHUP reloads the configuration file.
pub fn run(config: Config, overrides: Overrides) -> Result<(), DaemonError> {
    let started = Instant::now();
    let metrics = Arc::new(Metrics::default());
    // Before any component registers its heartbeat (see `notify`).
    let notifier = Notifier::from_env();
    notifier.arm(&metrics.heartbeats);
    // First of all, so a second daemon on this database touches nothing
    // (not even a socket) before it is refused.
    let db_lock = DatabaseLock::acquire(&config.storage.sqlite_path)?;
    let unchecked = recover_damaged_files(&config.storage.sqlite_path, &db_lock)?;
    let access = resolve_access(&config).map_err(DaemonError::Access)?;
    let max_connections = fit_to_descriptor_limit(
        config.monitor.max_connections,
        config.monitor.workers,
        config.storage.reader_threads,
    );

    let unix = config
        .monitor
        .unix_socket_path
        .as_deref()
        .map(|p| bind_unix(p, config.monitor.socket_group.as_deref()))
        .transpose()?;
    let tcp = config.monitor.tcp_listen.map(bind_tcp).transpose()?;
    let tcp_addr = tcp
        .as_ref()
        .map(|t| t.local_addr())
        .transpose()
        .map_err(|e| DaemonError::Os("cannot read the TCP address", e))?;

    let workers = config.monitor.workers.max(1);
    let mut polls = Vec::with_capacity(workers);
    let mut sinks = Vec::with_capacity(workers);
    let mut completion_rxs = Vec::with_capacity(workers);
    let mut peers = Vec::with_capacity(workers);
    let mut incoming_rxs = Vec::with_capacity(workers);
    for _ in 0..workers {
        let poll = Poll::new().map_err(|e| DaemonError::Os("cannot create a poll", e))?;
        let waker = Arc::new(
            Waker::new(poll.registry(), WAKER)
                .map_err(|e| DaemonError::Os("cannot create a waker", e))?,
        );
        let (sink, rx) = reply::channel(Arc::clone(&waker));
        let (tx, incoming) = crossbeam_channel::unbounded();
        polls.push(poll);
        sinks.push(sink);
        completion_rxs.push(rx);
        peers.push(Peer { tx, waker });
        incoming_rxs.push(incoming);
    }
    let wakers: Vec<Arc<Waker>> = peers.iter().map(|p| Arc::clone(&p.waker)).collect();
    let replies = Replies::new(sinks);

    let db = &config.storage.sqlite_path;
    let budget = Arc::new(InflightBudget::new(config.storage.inflight_bytes));
    let receive = Arc::new(InflightBudget::new(config.storage.inflight_bytes));
    let health_settings = HealthSettings {
        disk_min_free_bytes: config.health.disk_min_free_mb.saturating_mul(1 << 20),
        disk_min_free_percent: config.health.disk_min_free_percent,
        failing_for: config.health.failing_for,
        queue_capacity: WriterSettings::default().queue_capacity,
        max_connections,
    };
    let writer_settings = WriterSettings {
        cache_size_mb: config.storage.cache_size_mb,
        batch_max_rows: config.storage.batch_max_rows,
        commit_delay: Duration::from_micros(config.storage.commit_delay_us),
        retention: RetentionPolicy::new(
            config.storage.retention_days,
            config.general.session_timeout,
            archive_dir(db),
        )
        .with_hub_sync(config.server_hub.enabled)
        .with_cap(SizeCap::from_mib(
            config.storage.max_db_size_mb,
            DiskThresholds::of(&health_settings),
        )),
        ..WriterSettings::default()
    };
    let answer_pool = Arc::new(InflightBudget::new(answer_pool_bytes(
        config.storage.inflight_bytes,
    )));
    let (writer_tx, mut writer) = spawn_writer(
        db,
        &writer_settings,
        replies.clone(),
        Arc::clone(&metrics),
        Arc::clone(&budget),
    )?;
    let health = Arc::new(Sources {
        metrics: Arc::clone(&metrics),
        budget: Arc::clone(&budget),
        answer_pool: Arc::clone(&answer_pool),
        started,
        settings: health_settings,
        db: db.clone(),
        storage: Mutex::new(None),
        admin: Mutex::new("off (admin.enabled = false)".into()),
        hub: Mutex::new(match (&config.server_hub.enabled, &config.server_hub.url) {
            (true, Some(url)) => format!("shipping to {url} as host {}", config.server_hub.host_id),
            _ => "off (server_hub.enabled = false)".into(),
        }),
        watermarks: writer.watermarks(),
    });
    // Keeps the writer, and so the merger, running once the loops have
    // exited, until every thread that writes through the merger has
    // stopped (the export watcher's final flush goes through it).
    let writer_kept = writer_tx.clone();
    let salvager = writer.take_salvage_link().and_then(|link| {
        match spawn_salvager(db, link, Arc::clone(&metrics)) {
            Ok(s) => Some(s),
            Err(e) => {
                log::error!("cannot start the salvage thread: {e}");
                None
            }
        }
    });
    let hub_tuning: LiveTuning =
        Arc::new(parking_lot::RwLock::new(Tuning::from(&config.server_hub)));
    let hub_sync = if config.server_hub.enabled {
        match crate::hub::sync::spawn_sync(
            db,
            &config.server_hub,
            Arc::clone(&hub_tuning),
            Some(writer.main_write_link()),
            writer.watermarks(),
            Arc::clone(&metrics),
        ) {
            Ok(s) => Some(s),
            Err(e) => {
                log::error!("cannot start hub sync: {e}");
                None
            }
        }
    } else {
        if let Err(e) = crate::hub::sync::forget_changes(db) {
            log::warn!("cannot clear the hub's record of changed sessions and exports: {e}");
        }
        None
    };
    let (reader_tx, readers) = spawn_readers(
        db,
        config.storage.reader_threads.max(1),
        QUERY_QUEUE,
        replies.clone(),
        Arc::clone(&metrics),
    )?;
    let watcher = spawn_watcher(
        db,
        writer.main_write_link(),
        writer.archive_claims(),
        ExportSettings {
            default_patterns: config.monitor.export_patterns.clone(),
            scan_interval: config.monitor.scan_interval,
            batch_size: config.monitor.file_batch_size.max(1),
            archive_dir: archive_dir(db),
            mode: config.monitor.archive_mode,
            max_watches_per_root: config.monitor.max_watches_per_root,
        },
        replies,
        Arc::clone(&metrics),
    );
    // Without inotify (instance limit) or an archive directory the daemon
    // still serves logs; monitoring requests then get `Unavailable`.
    let (exports_tx, exports) = match watcher {
        Ok((tx, handle)) => (Some(tx), Some(handle)),
        Err(e) => {
            log::error!("export detection is off: {e}");
            metrics.health.set(
                "exports/off",
                Some((Severity::Degraded, format!("export detection is off: {e}"))),
            );
            (None, None)
        }
    };

    let live = Arc::new(LiveSettings::default());
    *live.access.write() = access;
    apply_live(&live, &config);
    let supervised = Arc::clone(&metrics);
    let services = Arc::new(Services {
        writer: writer_tx,
        readers: reader_tx,
        exports: exports_tx,
        budget,
        receive,
        auth_guard: Mutex::new(AuthGuard::default()),
        answer_pool,
        metrics: Arc::clone(&metrics),
        live: Arc::clone(&live),
        health: Arc::clone(&health),
        default_workspace: config
            .general
            .workspace
            .as_ref()
            .map(|w| w.to_string_lossy().into_owned()),
    });
    let m = &config.monitor;
    let reserved = m
        .reserved_unix_connections
        .min(max_connections.saturating_sub(1));
    let limits = LoopLimits {
        max_pending_per_connection: m.max_pending_per_connection.max(1),
        max_connections,
        max_tcp_connections: max_connections - reserved,
        unauthenticated_per_loop: m.max_unauthenticated.div_ceil(m.workers.max(1)).max(1),
        auth_timeout: m.auth_timeout,
        idle_timeout: m.idle_timeout,
        write_timeout: m.write_timeout,
    };
    let shutdown = Arc::new(AtomicBool::new(false));

    // Before any loop accepts a client, so a signal in that window is
    // handled rather than fatal.
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| DaemonError::Os("cannot install signal handlers", e))?;
    let watchdog = spawn_watchdog(Arc::clone(&health))
        .map_err(|e| DaemonError::Os("cannot spawn the health watchdog", e))?;
    let (admin, admin_addr) = start_admin(&config, &health);
    let ready_line = ready_line(unix.as_ref(), tcp_addr, admin_addr, &config);
    let mut acceptor = Some(Acceptor::new(unix, tcp, peers));
    let mut loops: Vec<JoinHandle<()>> = Vec::with_capacity(workers);
    for (id, ((poll, completions), incoming)) in polls
        .into_iter()
        .zip(completion_rxs)
        .zip(incoming_rxs)
        .enumerate()
    {
        let event_loop = EventLoop::new(
            id,
            poll,
            completions,
            incoming,
            if id == 0 { acceptor.take() } else { None },
            Arc::clone(&services),
            limits,
            Arc::clone(&shutdown),
        )
        .map_err(|e| DaemonError::Os("cannot register the listeners", e))?;
        let handle = thread::Builder::new()
            .name(format!("codi-loop-{id}"))
            .stack_size(LOOP_STACK)
            .spawn(move || event_loop.run())
            .map_err(|e| DaemonError::Os("cannot spawn an event loop", e))?;
        loops.push(handle);
    }
    // From here on only the loops hold the writer's and readers' queues.
    drop(services);

    // A storage thread that meets corruption stops the daemon as SIGTERM
    // does, so that the next start salvages the file.
    recovery::watch_for_corruption(db, || {
        let _ = signal_hook::low_level::raise(SIGTERM);
    });
    if !unchecked.is_empty() {
        if let Err(e) = recovery::spawn_background_check(unchecked) {
            log::error!("cannot start the background check of the database: {e}");
        }
    }
    let signal_handle = signals.handle();
    let signal_thread = {
        let shutdown = Arc::clone(&shutdown);
        let wakers = wakers.clone();
        thread::Builder::new()
            .name("codi-signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    if signal == SIGHUP {
                        notifier.reloading();
                        let outcome = if reload(&config, &overrides, &live, &hub_tuning) {
                            "configuration reloaded"
                        } else {
                            "reload refused, running configuration kept (see the log)"
                        };
                        notifier.ready(&format!("ready: {outcome}"));
                    } else if shutdown.swap(true, Ordering::AcqRel) {
                        log::warn!("second stop signal: exiting without waiting for the drain");
                        std::process::exit(1);
                    } else {
                        notifier.stopping();
                        log::info!("stop signal received: draining connections");
                        for waker in &wakers {
                            let _ = waker.wake();
                        }
                    }
                }
            })
            .map_err(|e| DaemonError::Os("cannot spawn the signal thread", e))?
    };

    log::info!("{ready_line}");
    let mut stdout = io::stdout().lock();
    let _ = writeln!(stdout, "{ready_line}");
    let _ = stdout.flush();
    drop(stdout);
    // Listeners bound, database open and migrated, every loop running.
    notifier.ready(&ready_line.replacen("READY", "ready:", 1));
    // Serving already: without the thread the daemon runs on unwatched
    // (and a systemd watchdog, missing its pings, restarts it).
    let supervisor = notifier
        .supervise(supervised, Arc::clone(&shutdown))
        .unwrap_or_else(|e| {
            log::error!("cannot spawn the systemd notification thread: {e}");
            None
        });

    for handle in loops {
        if handle.join().is_err() {
            log::error!("an event loop panicked");
        }
    }
    if let Some(supervisor) = supervisor {
        supervisor.stop();
    }
    if let Some(exports) = exports {
        exports.stop();
    }
    if let Some(salvager) = salvager {
        salvager.stop();
    }
    if let Some(hub_sync) = hub_sync {
        hub_sync.stop();
    }
    drop(writer_kept);
    writer.join();
    readers.join();
    if let Some(admin) = admin {
        admin.stop();
    }
    watchdog.stop();
    signal_handle.close();
    let _ = signal_thread.join();
    log::info!("stopped after {:.1?}", started.elapsed());
    if recovery::stopping_to_salvage() {
        return Err(DaemonError::StoppedToSalvage);
    }
    Ok(())
}

/// Finishes a recovery a crash interrupted, then checks both database
/// files and, if one is damaged, moves it aside for fresh ones whose rows
/// the salvage thread fills in while the daemon serves
/// ([`crate::store::recovery`]).
///
/// Returns the files served before their check finished.
fn recover_damaged_files(
    db: &std::path::Path,
    lock: &DatabaseLock,
) -> Result<Vec<std::path::PathBuf>, StoreError> {
    recovery::finish_set_aside(db)?;
    let started = Instant::now();
    let found = recovery::inspect(db, recovery::CHECK_DEADLINE, false)?;
    if !found.damage.is_empty() {
        let moved = recovery::set_aside(db, lock, &found.damage)?;
        log::error!(
            "{} damaged file(s) replaced in {:.1?}; serving on fresh files while their rows are \
             salvaged",
            moved.len(),
            started.elapsed()
        );
    }
    Ok(found.unchecked)
}

/// Descriptors the daemon needs besides its clients': listeners, each
/// loop's poll and waker, the database connections (three files each), the
/// checkpointers, the watcher and the spare kept for refusing clients.
fn descriptor_overhead(workers: usize, readers: usize) -> u64 {
    64 + 4 * workers as u64 + 8 * readers as u64
}

/// Raises the soft descriptor limit toward the hard one so that
/// `max_connections` clients fit beside the daemon's own descriptors, and
/// returns how many clients really fit: `max_connections`, or fewer (with a
/// warning) when the limit cannot be raised far enough. Beyond that limit
/// new clients would hang in the backlog instead of being told why.
fn fit_to_descriptor_limit(max_connections: usize, workers: usize, readers: usize) -> usize {
    let overhead = descriptor_overhead(workers, readers);
    let wanted = (max_connections as u64).saturating_add(overhead);
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let maximum = limit.maximum;
    // No soft limit at all: everything fits.
    let Some(current) = limit.current else {
        return max_connections;
    };
    if current >= wanted {
        return max_connections;
    }
    let target = maximum.map_or(wanted, |max| wanted.min(max));
    let raised = rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(target),
            maximum,
        },
    )
    .is_ok();
    let usable = if raised { target } else { current };
    if usable >= wanted {
        return max_connections;
    }
    let fit = usable.saturating_sub(overhead).max(1) as usize;
    log::warn!(
        "monitor.max_connections lowered from {max_connections} to {fit}: the open-file limit is {usable} (hard {}) and the daemon needs {overhead} descriptors of its own; raise LimitNOFILE (ulimit -n) to at least {wanted}",
        maximum.map_or_else(|| "unlimited".to_owned(), |m| m.to_string())
    );
    fit
}

/// Where archived exports go: `archive/` beside the database.
pub fn archive_dir(db: &std::path::Path) -> std::path::PathBuf {
    db.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
        .join("archive")
}

/// Binds and starts the admin endpoint if it is on. A port that cannot be
/// bound (a second daemon on the host, say) leaves the daemon running
/// without it, with the `admin` component degraded and saying why:
/// metrics are not worth refusing logs for.
fn start_admin(
    config: &Config,
    health: &Arc<Sources>,
) -> (Option<AdminHandle>, Option<std::net::SocketAddr>) {
    let Some(addr) = config.admin.listen_on() else {
        return (None, None);
    };
    let started = admin::bind(addr).and_then(|listener| {
        let bound = listener.local_addr()?;
        Ok((admin::spawn(listener, Arc::clone(health))?, bound))
    });
    match started {
        Ok((handle, bound)) => {
            *health.admin.lock() = format!("serving /metrics and /health on http://{bound}");
            (Some(handle), Some(bound))
        }
        Err(e) => {
            let reason = format!("the admin endpoint is off: cannot listen on {addr}: {e}");
            log::error!("{reason}");
            *health.admin.lock() = format!("not listening (admin.listen {addr})");
            health
                .metrics
                .health
                .set("admin/listen", Some((Severity::Degraded, reason)));
            (None, None)
        }
    }
}

fn ready_line(
    unix: Option<&UnixEndpoint>,
    tcp: Option<std::net::SocketAddr>,
    admin: Option<std::net::SocketAddr>,
    config: &Config,
) -> String {
    let mut line = String::from("READY");
    if let Some(u) = unix {
        line.push_str(&format!(" unix={}", u.path.display()));
    }
    if let Some(addr) = tcp {
        line.push_str(&format!(" tcp={addr}"));
    }
    if let Some(addr) = admin {
        line.push_str(&format!(" admin={addr}"));
    }
    line.push_str(&format!(" db={}", config.storage.sqlite_path.display()));
    line
}

fn resolve_access(config: &Config) -> Result<Access, String> {
    Access::resolve(
        &config.monitor.query_all_users,
        &config.monitor.query_all_groups,
        config.monitor.service_user.as_deref(),
    )
}

fn apply_live(live: &LiveSettings, config: &Config) {
    *live.token.write() = config.monitor.token.clone();
    live.rate_limit
        .store(config.monitor.rate_limit, Ordering::Relaxed);
    live.rate_burst
        .store(config.monitor.rate_burst, Ordering::Relaxed);
    log::set_max_level(config.general.log_level);
}

/// Re-reads the configuration; applies what can change live and names what
/// needs a restart. False if the new configuration was refused.
fn reload(
    running: &Config,
    overrides: &Overrides,
    live: &LiveSettings,
    hub_tuning: &LiveTuning,
) -> bool {
    let new = match Config::load(overrides) {
        Ok(new) => new,
        Err(e) => {
            log::error!("reload refused, keeping the running configuration: {e}");
            return false;
        }
    };
    // Names that do not resolve are left out, never the whole new list: the
    // previous one may hold users this reload removes.
    let (access, unknown) = Access::resolve_known(
        &new.monitor.query_all_users,
        &new.monitor.query_all_groups,
        new.monitor.service_user.as_deref(),
    );
    for e in unknown {
        log::error!("{e}; left out of who may query all logs until the next reload");
    }
    *live.access.write() = access;
    apply_live(live, &new);
    *hub_tuning.write() = Tuning::from(&new.server_hub);
    macro_rules! changed_keys {
        ($($section:ident . $field:ident),* $(,)?) => {
            [$((
                running.$section.$field != new.$section.$field,
                concat!(stringify!($section), ".", stringify!($field)),
            )),*]
        };
    }
    let restart_needed: Vec<&str> = changed_keys![
        monitor.unix_socket_path,
        monitor.socket_group,
        monitor.tcp_listen,
        monitor.workers,
        monitor.max_connections,
        monitor.max_pending_per_connection,
        storage.sqlite_path,
        storage.reader_threads,
        storage.cache_size_mb,
        storage.batch_max_rows,
        storage.commit_delay_us,
        storage.inflight_bytes,
        storage.retention_days,
        storage.max_db_size_mb,
        general.session_timeout,
        admin.enabled,
        admin.listen,
        admin.allow_remote,
        health.disk_min_free_mb,
        health.disk_min_free_percent,
        health.failing_for,
        server_hub.enabled,
        server_hub.url,
        server_hub.kind,
        server_hub.ca_file,
        server_hub.content_type,
        server_hub.database,
        server_hub.tables,
        server_hub.user,
        server_hub.password_file,
        server_hub.host_id,
    ]
    .into_iter()
    .filter_map(|(changed, key)| changed.then_some(key))
    .collect();
    log::info!(
        "configuration reloaded: log_level={}, rate_limit={}/s, rate_burst={}, token {}",
        new.general.log_level,
        new.monitor.rate_limit,
        new.monitor.rate_burst,
        if new.monitor.token.is_some() {
            "set"
        } else {
            "not set"
        }
    );
    if !restart_needed.is_empty() {
        log::warn!(
            "changed but not applied until restart: {}",
            restart_needed.join(", ")
        );
    }
    true
}

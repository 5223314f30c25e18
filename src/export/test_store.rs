//! For the watcher's unit tests: the real storage threads (writer, merger,
//! checkpointers) on a fresh database, which the watcher writes through as
//! it does in the daemon, and a watcher on it that the test drives.

use super::{ArchiveMode, ExportSettings, Watcher};
use crate::budget::InflightBudget;
use crate::metrics::Metrics;
use crate::reply::Replies;
use crate::store::merger::MainWriteLink;
use crate::store::writer::{spawn_writer, WriterHandle, WriterSettings};
use crate::store::WriteJob;
use crossbeam_channel::Sender;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// The running storage threads of the database at `db`.
pub(super) struct TestStore {
    pub(super) db: PathBuf,
    jobs: Option<Sender<WriteJob>>,
    writer: Option<WriterHandle>,
}

impl TestStore {
    /// Opens (creating it) the database at `db` and starts its threads.
    pub(super) fn start(db: &Path) -> TestStore {
        let (jobs, writer) = spawn_writer(
            db,
            &WriterSettings::default(),
            Replies::new(Vec::new()),
            Arc::new(Metrics::default()),
            Arc::new(InflightBudget::new(1 << 20)),
        )
        .unwrap();
        TestStore {
            db: db.to_owned(),
            jobs: Some(jobs),
            writer: Some(writer),
        }
    }

    /// A link to the merger, as the daemon hands the watcher.
    pub(super) fn link(&self) -> MainWriteLink {
        self.writer.as_ref().expect("running").main_write_link()
    }

    /// Stops the threads as the daemon does (the merger finishes) and
    /// waits for them.
    pub(super) fn stop(&mut self) {
        drop(self.jobs.take());
        if let Some(writer) = self.writer.take() {
            writer.join();
        }
    }

    /// A watcher on this database, archiving `*.md` into `archive` in
    /// `mode`, not running: the test drives its steps.
    pub(super) fn watcher(&self, archive: &Path, mode: ArchiveMode) -> Watcher {
        let writer = self.writer.as_ref().expect("running");
        let settings = ExportSettings {
            default_patterns: vec!["*.md".into()],
            scan_interval: Duration::from_secs(3600),
            batch_size: 100,
            archive_dir: archive.to_owned(),
            mode,
            max_watches_per_root: 1000,
        };
        Watcher::open(
            &self.db,
            writer.main_write_link(),
            writer.archive_claims(),
            settings,
            Replies::new(Vec::new()),
            Arc::new(Metrics::default()),
            Arc::new(AtomicBool::new(false)),
        )
        .unwrap()
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        self.stop();
    }
}

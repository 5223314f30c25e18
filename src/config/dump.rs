//! The effective configuration written back as TOML (`config check`).

use super::values::format_duration;
use super::*;
use crate::export::ArchiveMode;

impl Config {
    /// The effective configuration as TOML (for `config check`); the token
    /// itself is never written, only whether one is set.
    pub fn to_toml(&self) -> String {
        let raw = RawConfig {
            general: Some(RawGeneral {
                workspace: self
                    .general
                    .workspace
                    .as_ref()
                    .map(|p| p.display().to_string()),
                log_level: Some(self.general.log_level.as_str().to_ascii_lowercase()),
                session_timeout: Some(format_duration(self.general.session_timeout)),
            }),
            storage: Some(RawStorage {
                sqlite_path: Some(self.storage.sqlite_path.display().to_string()),
                wal_mode: Some(true),
                cache_size_mb: Some(self.storage.cache_size_mb),
                retention_days: Some(self.storage.retention_days),
                max_db_size_mb: Some(self.storage.max_db_size_mb),
                reader_threads: Some(self.storage.reader_threads),
                batch_max_rows: Some(self.storage.batch_max_rows),
                commit_delay_us: Some(self.storage.commit_delay_us),
                inflight_bytes: Some(self.storage.inflight_bytes),
            }),
            monitor: Some(RawMonitor {
                unix_socket_path: Some(
                    self.monitor
                        .unix_socket_path
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                ),
                socket_group: self.monitor.socket_group.clone(),
                tcp_port: None,
                tcp_address: self.monitor.tcp_listen.map(|a| a.to_string()),
                workers: Some(self.monitor.workers),
                token_file: self
                    .monitor
                    .token_file
                    .as_ref()
                    .map(|p| p.display().to_string()),
                rate_limit: Some(self.monitor.rate_limit),
                rate_burst: Some(self.monitor.rate_burst),
                max_connections: Some(self.monitor.max_connections),
                max_pending_per_connection: Some(self.monitor.max_pending_per_connection),
                file_batch_size: Some(self.monitor.file_batch_size),
                export_patterns: Some(self.monitor.export_patterns.clone()),
                scan_interval: Some(format_duration(self.monitor.scan_interval)),
                archive_mode: Some(
                    match self.monitor.archive_mode {
                        ArchiveMode::Copy => "copy",
                        ArchiveMode::Move => "move",
                    }
                    .into(),
                ),
                allow_unauthenticated_tcp: Some(self.monitor.allow_unauthenticated_tcp),
                auth_timeout: Some(format_duration(self.monitor.auth_timeout)),
                max_unauthenticated: Some(self.monitor.max_unauthenticated),
                reserved_unix_connections: Some(self.monitor.reserved_unix_connections),
                idle_timeout: Some(format_duration(self.monitor.idle_timeout)),
                write_timeout: Some(format_duration(self.monitor.write_timeout)),
                service_user: self.monitor.service_user.clone(),
                query_all_users: Some(self.monitor.query_all_users.clone()),
                query_all_groups: Some(self.monitor.query_all_groups.clone()),
                max_watches_per_root: Some(self.monitor.max_watches_per_root),
            }),
            server_hub: Some(RawServerHub {
                enabled: Some(self.server_hub.enabled),
                url: self.server_hub.url.clone(),
                batch_size: Some(self.server_hub.batch_size),
                sync_interval: Some(format_duration(self.server_hub.sync_interval)),
                batch_bytes: Some(self.server_hub.batch_bytes),
                database: Some(self.server_hub.database.clone()),
                logs_table: Some(self.server_hub.tables.logs.clone()),
                sessions_table: Some(self.server_hub.tables.sessions.clone()),
                exports_table: Some(self.server_hub.tables.exports.clone()),
                user: self.server_hub.user.clone(),
                password_file: self
                    .server_hub
                    .password_file
                    .as_ref()
                    .map(|p| p.to_string_lossy().into_owned()),
                host_id: Some(self.server_hub.host_id.clone()),
                backoff_min: Some(format_duration(self.server_hub.backoff_min)),
                backoff_max: Some(format_duration(self.server_hub.backoff_max)),
                kind: Some(self.server_hub.kind.name().into()),
                ca_file: self
                    .server_hub
                    .ca_file
                    .as_ref()
                    .map(|p| p.to_string_lossy().into_owned()),
                content_type: Some(self.server_hub.content_type.into()),
            }),
            admin: Some(RawAdmin {
                enabled: Some(self.admin.enabled),
                listen: Some(self.admin.listen.to_string()),
                allow_remote: Some(self.admin.allow_remote),
            }),
            health: Some(RawHealth {
                disk_min_free_mb: Some(self.health.disk_min_free_mb),
                disk_min_free_percent: Some(self.health.disk_min_free_percent),
                failing_for: Some(format_duration(self.health.failing_for)),
            }),
        };
        let source = match &self.source {
            Some(p) => p.display().to_string(),
            None => "built-in defaults".to_owned(),
        };
        let token = if self.monitor.token.is_some() {
            "set (redacted)"
        } else {
            "none"
        };
        let body = toml::to_string(&raw).expect("a RawConfig always serializes");
        let warnings: String = self
            .warnings
            .iter()
            .map(|w| format!("# warning: {w}\n"))
            .collect();
        format!("# Effective configuration (file: {source})\n# token: {token}\n{warnings}\n{body}")
    }
}

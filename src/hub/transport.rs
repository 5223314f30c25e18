//! How a batch reaches the hub: one HTTP or HTTPS `POST` of its body,
//! accepted only on a 2xx answer.
//!
//! Two kinds of hub (`server_hub.kind`):
//!
//! - **ClickHouse** (the default): the body goes to
//!   `{url}/?insert_distributed_sync=1&query=INSERT INTO {database}.{table}
//!   FORMAT JSONEachRow`, so a 2xx means the rows are in a replicated table.
//! - **NDJSON**: the same body goes to `url` as written (path kept), for a
//!   generic receiver such as Vector's `http_server` source or Fluent Bit's
//!   `http` input, with `X-Codi-Table`, `X-Codi-Host` and `X-Codi-Batch`
//!   (the batch's stable name, the same on every re-send, so a receiver can
//!   drop a repeat).
//!
//! TLS is rustls (through ureq): the server's certificate is always
//! verified, against `server_hub.ca_file` when set (*instead of* the
//! built-in web roots) or else the web roots ureq carries
//! (`webpki-roots`). There is no switch to turn verification off.
//! Redirects are not followed: a 3xx is a failure, so no answer from
//! elsewhere (or over plain HTTP) can pass for the hub's.

use crate::config::{HubKind, ServerHubConfig};
use base64::Engine;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How long connecting to the hub (TCP and TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one request to the hub may take, besides the body's upload
/// at [`MIN_UPLOAD_RATE`].
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The slowest upload a request allows for (bytes per second): a full
/// batch (`batch_bytes`, 32 MiB by default) may take 32 s more. With one
/// bound for every body, a batch too large to upload in it would be
/// re-sent, and time out, for ever.
const MIN_UPLOAD_RATE: u64 = 1 << 20;
/// Most bytes of an error answer kept for the log (a hostile hub cannot
/// make the daemon hold more).
const MAX_ERROR_BODY: u64 = 4096;
/// Most characters of an error answer shown.
const MAX_ERROR_CHARS: usize = 300;
/// Most bytes of a 2xx answer read (so the connection can be reused);
/// the rest is not read.
const MAX_ANSWER_BODY: u64 = 64 << 10;
/// Largest `server_hub.ca_file` read (a full web bundle is about 200 KiB).
const MAX_CA_FILE: u64 = 4 << 20;

/// Where a batch goes.
#[derive(Debug)]
enum Target {
    /// ClickHouse's HTTP interface at this base URL (no trailing `/`).
    ClickHouse {
        /// The URL, without its trailing `/`.
        base: String,
        /// The hub's database.
        database: String,
    },
    /// A generic NDJSON receiver at this URL, as written.
    Ndjson {
        /// The URL.
        url: String,
    },
}

/// The sender of batches to the hub, built once from `[server_hub]`.
#[derive(Debug)]
pub struct Transport {
    agent: ureq::Agent,
    target: Target,
    host_id: String,
    content_type: &'static str,
    user: Option<String>,
    password_file: Option<PathBuf>,
}

impl Transport {
    /// A transport for `hub` (which must have a URL). Fails only when
    /// `server_hub.ca_file` cannot be read or holds no certificate (the
    /// configuration check refuses that before the daemon starts).
    pub fn new(hub: &ServerHubConfig) -> Result<Transport, String> {
        let mut builder = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .redirects(0);
        if let Some(file) = &hub.ca_file {
            builder = builder.tls_config(tls_config(file)?);
        }
        let url = hub.url.clone().unwrap_or_default();
        let target = match hub.kind {
            HubKind::ClickHouse => Target::ClickHouse {
                base: url.trim_end_matches('/').to_owned(),
                database: hub.database.clone(),
            },
            HubKind::Ndjson => Target::Ndjson { url },
        };
        Ok(Transport {
            agent: builder.build(),
            target,
            host_id: hub.host_id.clone(),
            content_type: hub.content_type,
            user: hub.user.clone(),
            password_file: hub.password_file.clone(),
        })
    }

    /// POSTs `body`, a batch named `batch_name` (see [`batch_name`]) of
    /// rows for the hub's table `table`; `Ok` only on a 2xx answer. The
    /// error says why, fit for the log and the health report (never the
    /// password).
    pub fn send(&self, table: &str, batch_name: &str, body: &[u8]) -> Result<(), String> {
        if !is_identifier(table) {
            return Err(format!(
                "the hub table name `{}` is not letters, digits and _",
                crate::text::escape_controls(table)
            ));
        }
        let request = match &self.target {
            Target::ClickHouse { base, database } => self.agent.post(&format!(
                "{base}/?insert_distributed_sync=1&query=INSERT%20INTO%20{database}.{table}%20FORMAT%20JSONEachRow"
            )),
            Target::Ndjson { url } => self
                .agent
                .post(url)
                .set("X-Codi-Table", table)
                .set("X-Codi-Host", &self.host_id)
                .set("X-Codi-Batch", batch_name),
        };
        let mut request = request
            .set("Content-Type", self.content_type)
            .timeout(request_timeout(body.len()));
        if let Some(user) = &self.user {
            let password = match &self.password_file {
                Some(file) => std::fs::read_to_string(file)
                    .map_err(|e| format!("cannot read server_hub.password_file: {e}"))?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
                None => String::new(),
            };
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            request = request.set("Authorization", &format!("Basic {token}"));
        }
        match request.send_bytes(body) {
            Ok(answer) if (200..300).contains(&answer.status()) => {
                // Read (a bounded part of) the answer so that the
                // connection may serve the next batch.
                let _ = std::io::copy(
                    &mut answer.into_reader().take(MAX_ANSWER_BODY),
                    &mut std::io::sink(),
                );
                Ok(())
            }
            Ok(answer) | Err(ureq::Error::Status(_, answer)) => {
                let code = answer.status();
                let mut text = Vec::new();
                let _ = answer
                    .into_reader()
                    .take(MAX_ERROR_BODY)
                    .read_to_end(&mut text);
                let text = String::from_utf8_lossy(&text);
                let text: String = crate::text::escape_controls(text.trim())
                    .chars()
                    .take(MAX_ERROR_CHARS)
                    .collect();
                Err(format!("the hub answered HTTP {code}: {text}"))
            }
            Err(e) => Err(format!("cannot reach the hub: {e}")),
        }
    }
}

/// How long the request sending a body of `len` bytes may take.
fn request_timeout(len: usize) -> Duration {
    REQUEST_TIMEOUT + Duration::from_secs_f64(len as f64 / MIN_UPLOAD_RATE as f64)
}

/// The stable name of a batch of `target` (`logs`, ...) ending at id (or
/// seq) `last` whose body has the SHA-256 `digest` (hex, as
/// [`super::batch::Batch::digest`]): `{target}-{last}-{its first 16 hex
/// digits}`. A re-sent batch has the same body, hence the same name; a
/// different body never shares it (unless SHA-256 collides).
pub fn batch_name(target: &str, last: i64, digest: &str) -> String {
    let short = digest.get(..16).unwrap_or(digest);
    format!("{target}-{last}-{short}")
}

/// The certificates of the PEM file `path` (`server_hub.ca_file`) as the
/// only roots trusted: refused when it cannot be read, is larger than 4 MiB,
/// may be written by group or others (whoever can write it could make the
/// daemon trust their own certificate), holds a malformed PEM section, or
/// holds no certificate rustls accepts. The error names the key and file.
pub fn trust_roots(path: &Path) -> Result<RootCertStore, String> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let fail = |why: String| format!("server_hub.ca_file `{shown}`: {why}");
    let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 {
        return Err(fail(format!(
            "may be written by others (mode {:o}): whoever can write it chooses whom the \
             daemon trusts; chmod go-w it",
            mode & 0o777
        )));
    }
    let mut pem = Vec::new();
    file.take(MAX_CA_FILE + 1)
        .read_to_end(&mut pem)
        .map_err(|e| fail(e.to_string()))?;
    if pem.len() as u64 > MAX_CA_FILE {
        return Err(fail(format!(
            "larger than {} MiB: not a file of CA certificates",
            MAX_CA_FILE >> 20
        )));
    }
    let mut roots = RootCertStore::empty();
    for (n, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let cert = cert.map_err(|e| fail(format!("certificate {}: {e}", n + 1)))?;
        roots
            .add(cert)
            .map_err(|e| fail(format!("certificate {}: {e}", n + 1)))?;
    }
    if roots.is_empty() {
        return Err(fail(
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    Ok(roots)
}

/// A rustls client configuration trusting only `roots`: *ring* (as ureq
/// uses it), TLS 1.2 and 1.3, no client certificate.
/// The TLS client configuration that trusts only the certificates of the
/// PEM file `ca_file` (see [`trust_roots`]): the daemon's and `codi2 logs
/// --hub`'s, so both check a hub's certificate alike.
pub fn tls_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    Ok(Arc::new(client_config(trust_roots(ca_file)?)))
}

// rustls 0.23.48 deprecates *ring*'s provider for lacking post-quantum key
// exchange; ureq 2's own configuration (the one used without a ca_file) is
// *ring*'s, and aws-lc-rs would be a second, C-built crypto library.
#[allow(deprecated)]
fn client_config(roots: RootCertStore) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
        .with_safe_default_protocol_versions()
        .expect("ring's default provider supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

fn is_identifier(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_batch_name_is_stable_for_a_body_and_differs_for_another() {
        let digest = |body: &[u8]| -> String {
            Sha256::digest(body)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        let one = digest(b"{\"id\":1}\n");
        let a = batch_name("logs", 700, &one);
        assert_eq!(a, format!("logs-700-{}", &one[..16]));
        assert_ne!(a, batch_name("logs", 700, &digest(b"{\"id\":2}\n")));
        assert_ne!(a, batch_name("sessions", 700, &one));
        assert_eq!(
            batch_name("logs", 1, "abc"),
            "logs-1-abc",
            "no panic on a short one"
        );
    }

    #[test]
    fn a_ca_file_with_a_certificate_is_trusted_and_anything_else_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["hub.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let good = write(dir.path(), "ca.pem", &cert.pem(), 0o644);
        assert_eq!(trust_roots(&good).unwrap().len(), 1);

        let err = |path: &Path| trust_roots(path).unwrap_err();
        let e = err(&dir.path().join("missing.pem"));
        assert!(
            e.starts_with("server_hub.ca_file `") && e.contains("missing.pem"),
            "{e}"
        );
        let e = err(&write(dir.path(), "empty.pem", "", 0o644));
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let e = err(&write(dir.path(), "key.pem", &key.serialize_pem(), 0o600));
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let e = err(&write(
            dir.path(),
            "bad.pem",
            "-----BEGIN CERTIFICATE-----\nnot base64 !!\n-----END CERTIFICATE-----\n",
            0o644,
        ));
        assert!(e.contains("certificate 1"), "{e}");
        let e = err(&write(
            dir.path(),
            "junk.pem",
            "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
            0o644,
        ));
        assert!(e.contains("certificate 1"), "{e}");
        let e = err(&write(dir.path(), "open.pem", &cert.pem(), 0o666));
        assert!(e.contains("may be written by others"), "{e}");
        let e = err(dir.path());
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn a_large_body_has_time_to_upload() {
        assert_eq!(request_timeout(0), REQUEST_TIMEOUT);
        assert_eq!(
            request_timeout(32 << 20),
            REQUEST_TIMEOUT + Duration::from_secs(32)
        );
    }

    #[test]
    fn a_table_name_that_is_not_an_identifier_is_not_sent() {
        let text = "[server_hub]\nenabled = true\nurl = \"http://127.0.0.1:9/\"\nhost_id = \"h\"\n";
        let config =
            crate::config::Config::from_toml_str(text, &crate::config::Overrides::default())
                .unwrap();
        let t = Transport::new(&config.server_hub).unwrap();
        let e = t.send("logs; DROP", "x", b"").unwrap_err();
        assert!(e.contains("not letters, digits and _"), "{e}");
    }
}

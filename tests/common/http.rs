//! Plain HTTP against the admin endpoint, and reading its metrics.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};

use super::*;

/// An HTTP response from the admin endpoint.
#[allow(dead_code)]
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: HashMap<String, String>,
    /// The body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body as text.
    #[allow(dead_code)]
    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("a UTF-8 body")
    }
}

/// The value of one series (`name{labels}`) in a Prometheus exposition.
#[allow(dead_code)]
pub fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series `{name}` in:\n{text}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("`{name}`: {e}"))
}

/// Sends `request` (raw bytes) to `addr`, reads the answer to the end of
/// the stream and parses its head with `httparse`.
#[allow(dead_code)]
pub fn http_request(addr: SocketAddr, request: &[u8]) -> io::Result<HttpResponse> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(READ_TIMEOUT))?;
    s.write_all(request)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_http_response(&raw)
}

/// Parses a complete HTTP response.
#[allow(dead_code)]
pub fn parse_http_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(bad(format!("incomplete response: {raw:?}"))),
        Err(e) => return Err(bad(format!("bad response ({e}): {raw:?}"))),
    };
    let headers: HashMap<String, String> = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    Ok(HttpResponse {
        status: resp.code.unwrap_or(0),
        headers,
        body: raw[head_len..].to_vec(),
    })
}

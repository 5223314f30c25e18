//! The little HTTP the admin endpoint speaks: a request head parsed by
//! `httparse` (never by hand), and a complete response with
//! `Content-Length` and `Connection: close`. No bodies are read, no
//! keep-alive, no chunking: one request per connection.

/// Largest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// Most headers a request may have.
pub const MAX_HEADERS: usize = 32;

/// What a request asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET` or `HEAD` (others are answered 405 before this is built).
    pub head_only: bool,
    /// The path without its query string.
    pub path: String,
}

/// What the bytes received so far amount to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A complete request for a method the endpoint serves.
    Request(Request),
    /// The head is not complete yet.
    Partial,
    /// Answer this (an error) and close.
    Refuse(Response),
}

/// Parses the request head in `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Parsed::Refuse(Response::error(431, "request head larger than 8 KiB"))
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Refuse(Response::error(431, "more than 32 headers"))
        }
        Err(e) => return Parsed::Refuse(Response::error(400, &format!("bad request: {e}"))),
    }
    let head_only = match req.method {
        Some("GET") => false,
        Some("HEAD") => true,
        _ => {
            let mut r = Response::error(405, "only GET and HEAD are served");
            r.extra = Some("Allow: GET, HEAD");
            return Parsed::Refuse(r);
        }
    };
    let target = req.path.unwrap_or("/");
    let path = target.split(['?', '#']).next().unwrap_or("/").to_owned();
    Parsed::Request(Request { head_only, path })
}

/// A complete response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The `Content-Type`.
    pub content_type: &'static str,
    /// One extra header line, if any (without the line end).
    pub extra: Option<&'static str>,
    /// The body.
    pub body: Vec<u8>,
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

impl Response {
    /// A response with this status, type and body.
    pub fn new(status: u16, content_type: &'static str, body: Vec<u8>) -> Self {
        Response {
            status,
            content_type,
            extra: None,
            body,
        }
    }

    /// A plain-text error with a one-line explanation.
    pub fn error(status: u16, text: &str) -> Self {
        Response::new(
            status,
            "text/plain; charset=utf-8",
            format!("{text}\n").into_bytes(),
        )
    }

    /// The bytes to send; without the body for `HEAD` (the length stays).
    pub fn to_bytes(&self, head_only: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            reason_phrase(self.status),
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if let Some(line) = self.extra {
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(buf: &[u8]) -> u16 {
        match parse(buf) {
            Parsed::Refuse(r) => r.status,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn get_and_head_with_or_without_a_query() {
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Parsed::Request(Request {
                head_only: false,
                path: "/metrics".into()
            })
        );
        assert_eq!(
            parse(b"HEAD /health?verbose=1 HTTP/1.0\r\n\r\n"),
            Parsed::Request(Request {
                head_only: true,
                path: "/health".into()
            })
        );
    }

    #[test]
    fn incomplete_heads_wait_and_bad_ones_are_refused() {
        assert_eq!(parse(b"GET /metr"), Parsed::Partial);
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"),
            Parsed::Partial
        );
        assert_eq!(refused(b"\x00\x01garbage\r\n\r\n"), 400);
        assert_eq!(refused(b"GET /metrics HTTP/9.9\r\n\r\n"), 400);
        assert_eq!(refused(b"POST /metrics HTTP/1.1\r\n\r\n"), 405);
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEAD, b'a');
        assert_eq!(refused(&long), 431);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("H{i}: v\r\n")).collect();
        assert_eq!(
            refused(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()),
            431
        );
    }

    #[test]
    fn responses_carry_their_length_and_close() {
        let mut r = Response::error(405, "no");
        r.extra = Some("Allow: GET, HEAD");
        let text = String::from_utf8(r.to_bytes(false)).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        assert!(text.contains("Content-Length: 3\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"), "{text}");
        assert!(text.contains("Allow: GET, HEAD\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nno\n"), "{text}");
        let head = String::from_utf8(r.to_bytes(true)).unwrap();
        assert!(head.ends_with("\r\n\r\n") && head.contains("Content-Length: 3"));
    }
}

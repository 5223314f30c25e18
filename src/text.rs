//! Making text that others control safe to show on a terminal or in a log
//! line.
//!
//! A log message, a component name or a directory name comes from a
//! client (or from whoever named a file). Printed raw, a newline forges a
//! row of `codi2 logs` or a line of the daemon's own log, and an escape
//! sequence moves the cursor, rewrites the title bar or hides what follows.
//! Every human-readable output therefore passes such text through
//! [`escape_controls`]; machine-readable output (JSON) escapes on its own.

use std::borrow::Cow;
use std::fmt::Write;

/// True for characters a terminal may act on rather than show: C0
/// controls (newline, carriage return, escape, ...), DEL, C1 controls
/// (U+0080 to U+009F, which some terminals take as escape sequences), and
/// the bidirectional overrides and isolates that reorder what is shown
/// (U+202A to U+202E, U+2066 to U+2069).
pub fn is_unsafe(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every [`is_unsafe`] character written as a visible escape:
/// `\n`, `\r` and `\t` by name, other controls as `\x1b`, the rest as
/// `\u{202e}`. Borrowed when there is nothing to escape.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x80 && is_unsafe(c) => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if is_unsafe(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// JSON text with the [`is_unsafe`] characters that JSON itself allows raw
/// (DEL, C1 controls, bidirectional overrides) written as `\uXXXX`
/// escapes. Such characters can only occur inside JSON strings, so the
/// result is the same JSON value.
pub fn json_escape_unsafe(json: &str) -> Cow<'_, str> {
    if !json.chars().any(is_unsafe) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 8);
    for c in json.chars() {
        if is_unsafe(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_and_controls_become_visible() {
        assert!(matches!(escape_controls("disk 91% full"), Cow::Borrowed(_)));
        assert_eq!(escape_controls("a\nb\rc\td"), "a\\nb\\rc\\td");
        assert_eq!(escape_controls("\x1b[31mred"), "\\x1b[31mred");
        assert_eq!(escape_controls("\x7f\u{9b}"), "\\x7f\\u{9b}");
        assert_eq!(escape_controls("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(escape_controls("naïve ✓"), "naïve ✓");
        assert!(!escape_controls("\x00\x01\x1f\u{2066}")
            .chars()
            .any(is_unsafe));
    }

    #[test]
    fn json_keeps_its_value() {
        let value = serde_json::json!({"m": "a\u{9b}b\u{202e}c\u{7f}"});
        let text = serde_json::to_string(&value).unwrap();
        let safe = json_escape_unsafe(&text);
        assert!(!safe.chars().any(is_unsafe), "{safe}");
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, value);
    }
}

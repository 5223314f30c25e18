//! The packaged manual pages (packaging/man) against the binaries' own
//! `--help`: every command and every option the binaries accept must be in
//! the page, so a new flag cannot ship undocumented.

use std::collections::BTreeSet;
use std::process::Command;

/// The `--help` text of `binary` with `args` before it.
fn help(binary: &str, args: &[&str]) -> String {
    let out = Command::new(binary)
        .args(args)
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success(), "{binary} {args:?} --help failed");
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

/// The names listed in one section of argh's help (`Options:`,
/// `Commands:`): the first word of every entry line, and for options every
/// `-x`/`--name` before the description.
fn section_entries(text: &str, heading: &str) -> Vec<String> {
    let mut entries = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line == heading {
            inside = true;
            continue;
        }
        if !inside {
            continue;
        }
        if line.is_empty() {
            break;
        }
        // Entries start two spaces in; continuation lines further.
        let Some(entry) = line.strip_prefix("  ") else {
            continue;
        };
        if entry.starts_with(' ') {
            continue;
        }
        let names = entry.split("  ").next().unwrap_or_default();
        for name in names.split(", ") {
            entries.push(name.trim().to_owned());
        }
    }
    entries
}

/// Every command path below `binary` (the empty path is the binary itself)
/// with the options of each.
fn walk(binary: &str) -> Vec<(Vec<String>, Vec<String>)> {
    let mut found = Vec::new();
    let mut todo = vec![Vec::<String>::new()];
    while let Some(path) = todo.pop() {
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        let text = help(binary, &args);
        let options = section_entries(&text, "Options:")
            .into_iter()
            .filter(|o| o != "--help" && o != "help")
            .collect();
        for command in section_entries(&text, "Commands:") {
            let mut sub = path.clone();
            sub.push(command);
            todo.push(sub);
        }
        found.push((path, options));
    }
    found
}

/// The page's text with roff's font changes and escaped hyphens undone.
fn page_text(roff: &str) -> String {
    roff.replace("\\-", "-")
        .replace("\\fB", "")
        .replace("\\fI", "")
        .replace("\\fR", "")
        .replace("\\fP", "")
        .replace("\\&", "")
}

/// Words of the page's macro lines (`.B`, `.BI`, ...) and text, so that a
/// name matches only as a whole word.
fn words(text: &str) -> BTreeSet<String> {
    text.split(|c: char| c.is_whitespace() || matches!(c, ',' | '[' | ']' | '(' | ')' | '"'))
        .map(|w| w.trim_end_matches(['.', ';', ':']).to_owned())
        .filter(|w| !w.is_empty())
        .collect()
}

fn check(binary: &str, roff: &str) {
    let text = page_text(roff);
    let known = words(&text);
    let mut missing = Vec::new();
    for (path, options) in walk(binary) {
        if let Some(command) = path.last() {
            if !known.contains(command) {
                missing.push(format!("command `{}`", path.join(" ")));
            }
        }
        for option in options {
            if !known.contains(&option) {
                missing.push(format!("option `{option}` of `{}`", path.join(" ")));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the manual page of {binary} lacks: {}",
        missing.join(", ")
    );
}

#[test]
fn the_codi_monitor_page_documents_every_command_and_option() {
    check(
        env!("CARGO_BIN_EXE_codi-monitor"),
        include_str!("../packaging/man/codi-monitor.8"),
    );
}

#[test]
fn the_codi2_page_documents_every_command_and_option() {
    check(
        env!("CARGO_BIN_EXE_codi2"),
        include_str!("../packaging/man/codi2.1"),
    );
}

#[test]
fn a_page_without_an_option_is_caught() {
    let page = include_str!("../packaging/man/codi2.1").replace("\\-\\-contains", "");
    let caught = std::panic::catch_unwind(|| check(env!("CARGO_BIN_EXE_codi2"), &page));
    let message = *caught
        .expect_err("a page without --contains passed")
        .downcast::<String>()
        .unwrap();
    assert!(
        message.contains("option `--contains` of `logs`"),
        "{message}"
    );
}

//! Running short commands (codi2, tools) with hang protection.

use std::io::{Read, Write};
use std::process::{Child, Command, Output, Stdio};
use std::thread;

use super::*;

/// Runs a command with stdin and returns its output (hang-protected by
/// the command itself finishing; the tests only run short commands).
pub fn run_with_stdin(mut cmd: Command, stdin: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let feeder = thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let output = wait_output(child);
    feeder.join().unwrap();
    output
}

/// Runs a command without stdin and returns its output.
pub fn run(mut cmd: Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_output(child)
}

/// Collects a child's output, killing it if it outlives the hang deadline.
fn wait_output(mut child: Child) -> Output {
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let mut status = None;
    if !wait_until(START_DEADLINE, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    }) {
        let _ = child.kill();
        status = Some(child.wait().unwrap());
    }
    Output {
        status: status.unwrap(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

//! What the C library's test programs share: running a command and showing its output.

use std::process::Command;

/// Runs `cmd`, printing its output, and fails the test when it fails (or cannot start; tools
/// such as cmake come from scripts/setup.sh); returns its stdout.
pub fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e} (scripts/setup.sh installs the tools)"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{what}:\n{stdout}{stderr}");
    assert!(out.status.success(), "{what} failed ({})", out.status);
    stdout
}

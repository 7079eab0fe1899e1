//! The `edgetune` command, built here from the `edgetune-cli` library so that the CLI tests of
//! this package can run it (`CARGO_BIN_EXE_edgetune-under-test`; cargo gives that only for a
//! package's own binaries).

fn main() -> std::process::ExitCode {
    edgetune_cli::main()
}

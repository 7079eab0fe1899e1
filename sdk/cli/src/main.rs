//! The `edgetune` command (see the library's docs for what it does).

fn main() -> std::process::ExitCode {
    edgetune_cli::main()
}

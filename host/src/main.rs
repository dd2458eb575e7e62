//! The `gorch-host` binary: everything happens in [`gorch_host::cli::main`].

fn main() -> std::process::ExitCode {
    gorch_host::cli::main(std::env::args_os())
}

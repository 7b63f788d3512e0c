//! The shipped `runnel-agent` binary under a test-only name: the same `cli::main`, so the
//! end-to-end tests run exactly the code users run.

fn main() -> std::process::ExitCode {
    runnel_agent::cli::main()
}

fn main() -> std::process::ExitCode {
    runnel_agent::cli::main()
}

fn main() -> std::process::ExitCode {
    runnel_aggregator::cli::main()
}

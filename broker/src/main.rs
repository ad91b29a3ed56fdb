fn main() -> std::process::ExitCode {
    habar_broker::cli::main()
}

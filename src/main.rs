use clap::Parser;
use shardpush::cli::CommandLine;
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // A usage error exits with status 2 here; --help and --version exit with 0.
    shardpush::cli::run(CommandLine::parse())
}

//! The `moeshard` command line: one binary for single-process runs, the coordinator and workers.

mod bench;
mod bench_serve;
mod cli;
mod cluster;
mod discovery;
mod doctor;
mod manifest;
mod plan;
mod quantize;
mod serve;
mod validate;

use std::process::ExitCode;

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

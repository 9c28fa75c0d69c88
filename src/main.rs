//! The `milo-workers` command: reads the command line, sets up logging, and hands over to
//! [`cli::run`].

mod cli;
mod demo;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let args = cli::Cli::parse();

    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,tokio_postgres=warn,refinery_core=warn"));
    let terminal = std::io::stderr().is_terminal();
    let json = match args.log_format {
        Some(cli::LogFormat::Json) => true,
        Some(cli::LogFormat::Text) => false,
        None => !terminal,
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    if json {
        // One object per line with the event's fields flattened, for log collectors.
        logs.json().flatten_event(true).with_span_list(false).init();
    } else {
        logs.with_ansi(terminal).init();
    }

    match cli::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

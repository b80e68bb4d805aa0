//! The binary edge: parse configuration, set up logging, run, map the result
//! to an exit code.

use std::process::ExitCode;

use clap::Parser;
use metabridge::{
    app,
    config::{Cli, Command, IptablesCommand},
    intercept::Interceptor,
    telemetry,
};

/// EX_USAGE: invalid configuration.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            use clap::error::ErrorKind;
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = err.print();
                return ExitCode::SUCCESS;
            }
            // One line naming the bad value, not a page of usage.
            let rendered = err.to_string();
            let first_paragraph: Vec<&str> = rendered
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!(
                "metabridge: {}",
                first_paragraph.join(" ").trim_start_matches("error: ")
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match cli.command {
        Command::Run(config) => {
            if let Err(err) = config.validate() {
                eprintln!("metabridge: {err}");
                return ExitCode::from(EXIT_CONFIG);
            }
            telemetry::init(config.log_format);
            match runtime.block_on(app::run(*config, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!(error = %err, "metabridge failed");
                    eprintln!("metabridge: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Iptables {
            action: IptablesCommand::Remove(config),
        } => {
            let interceptor = Interceptor::new(&config, Vec::new(), None);
            match runtime.block_on(interceptor.remove()) {
                Ok(()) => {
                    println!(
                        "removed metabridge's rules and chain {}",
                        config.iptables_chain
                    );
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("metabridge: {err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Resolves on SIGTERM (kubelet) or SIGINT (an operator's Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

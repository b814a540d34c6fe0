//! The `ldt` binary: parse the command line, set up logging, run the chosen services.

use std::process::ExitCode;

use clap::Parser;
use ldt::configuration::{Cli, Command};
use ldt::contract::Service;
use ldt::startup::{Application, shutdown_signal};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let (services, settings) = match cli.command {
        Command::Up(settings) => (Service::ALL.to_vec(), settings),
        Command::Serve { services, settings } => (services, settings),
        Command::Chaos(args) => {
            ldt::telemetry::init("text");
            return match ldt::chaos::run(args).await {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("ldt: error: chaos run failed: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Bench(args) => {
            ldt::telemetry::init("text");
            let json = args.json;
            return match ldt::bench::run(args).await {
                Ok(report) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&report).unwrap_or_default()
                        );
                    } else {
                        print!("{}", report.human());
                    }
                    if report.ok() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("ldt: error: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Purge { yes, settings } => {
            ldt::telemetry::init(&settings.log_format);
            if !yes {
                eprintln!(
                    "ldt: error: purge deletes every order, user and token of namespace {:?}; pass --yes to confirm",
                    settings.namespace
                );
                return ExitCode::FAILURE;
            }
            return match ldt::startup::purge(&settings).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ldt: error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    ldt::telemetry::init(&settings.log_format);
    match run(&services, settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ldt: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(services: &[Service], settings: ldt::configuration::Settings) -> anyhow::Result<()> {
    let addr = settings.http_addr;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let app = Application::build(services, settings, listener).await?;
    let local = app.local_addr()?;
    let names: Vec<&str> = services.iter().map(|s| s.as_str()).collect();
    tracing::info!(services = ?names, "ready: API on http://{local}, Swagger UI on http://{local}/docs");
    println!("ldt ready: http://{local}/docs");
    app.run_until(shutdown_signal()).await
}

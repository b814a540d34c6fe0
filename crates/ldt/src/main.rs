//! The `ldt` binary: parse the command line, set up logging, run the chosen services.

use std::process::ExitCode;

mod cli;

use cli::{Cli, Command};
use ldt::startup::Application;
use ldt_contract::Service;
use ldt_runtime::signal::shutdown_signal;

fn main() -> ExitCode {
    let matches = match <Cli as clap::CommandFactory>::command().try_get_matches() {
        Ok(matches) => matches,
        Err(e) => cli::explain(e).exit(),
    };
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => cli::explain(e).exit(),
    };
    // `--worker-threads` sizes the runtime of the services; the tools take the default.
    let tokio_env = std::env::var_os("TOKIO_WORKER_THREADS").is_some();
    let threads = match &cli.command {
        Command::Up(settings) => settings.runtime_threads(Service::ALL.len(), tokio_env),
        Command::Serve { settings, services } => {
            settings.runtime_threads(services.len(), tokio_env)
        }
        _ => None,
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        builder.worker_threads(n);
    }
    match builder.enable_all().build() {
        Ok(runtime) => runtime.block_on(run_command(cli, matches)),
        Err(e) => {
            eprintln!("ldt: error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_command(cli: Cli, matches: clap::ArgMatches) -> ExitCode {
    // A URL that cannot work is said at once, not retried as if the server were slow.
    if let Some((_, sub)) = matches.subcommand()
        && let Some(problem) = cli.command.url_problem()
    {
        let (id, flag, env, what) = problem;
        let source = match sub.try_get_raw(id).ok().flatten().and(sub.value_source(id)) {
            Some(clap::parser::ValueSource::EnvVariable) => format!("{env} (the environment)"),
            _ => flag.to_owned(),
        };
        eprintln!("ldt: error: {source}: {what}");
        return ExitCode::from(2);
    }
    let (services, settings) = match cli.command {
        Command::Up(settings) => (Service::ALL.to_vec(), settings),
        Command::Serve { services, settings } => {
            if settings.amqp_url.is_none() {
                eprintln!(
                    "ldt: error: `ldt serve` runs services as separate processes, which talk over \
                     RabbitMQ: set --amqp-url or LDT_AMQP_URL (e.g. \
                     amqp://guest:guest@127.0.0.1:5672/%2f). To run everything in one process \
                     without a broker, use `ldt up`."
                );
                return ExitCode::from(2);
            }
            (services, settings)
        }
        Command::Chaos(args) => {
            ldt_runtime::telemetry::init_plain(ldt_runtime::telemetry::LogFormat::Text);
            return match ldt_tools::chaos::run(args).await {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("ldt: error: chaos run failed: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Bench(args) => {
            ldt_runtime::telemetry::init_plain(ldt_runtime::telemetry::LogFormat::Text);
            let json = args.json;
            return match ldt_tools::bench::run(args).await {
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
        Command::Orders { cmd, target } => {
            return exit(ldt_tools::ctl::orders(&target, cmd).await);
        }
        Command::Sagas { cmd, target } => {
            return exit(ldt_tools::ctl::sagas(&target, cmd).await);
        }
        Command::DeadLetters { cmd, target } => {
            return exit(ldt_tools::ctl::dead_letters(&target, cmd).await);
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "ldt", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Purge(args) => {
            ldt_runtime::telemetry::init_plain(ldt_runtime::telemetry::LogFormat::Text);
            if !args.yes {
                eprintln!(
                    "ldt: error: purge deletes every order, user and token of namespace {:?}; pass --yes to confirm",
                    args.namespace
                );
                return ExitCode::FAILURE;
            }
            let settings = match args.settings() {
                Ok(settings) => settings,
                Err(e) => cli::explain(e).exit(),
            };
            let settings = match with_service_databases(settings) {
                Ok(settings) => settings,
                Err(code) => return code,
            };
            return match ldt_runtime::namespace::purge(&settings).await {
                Ok(deleted) if deleted.is_empty() => {
                    println!("namespace {:?}: nothing to delete", args.namespace);
                    ExitCode::SUCCESS
                }
                Ok(deleted) => {
                    println!("namespace {:?}:", args.namespace);
                    for line in deleted {
                        println!("  {line}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ldt: error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    let settings = match with_service_databases(settings) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    // One service per process: it is named after it (ldt-payment); several: ldt.
    let name = match services.as_slice() {
        [one] => format!("ldt-{}", one.as_str()),
        _ => "ldt".to_owned(),
    };
    let telemetry = ldt_runtime::telemetry::Telemetry::init(settings.log_format, &name);
    let metrics = ldt_runtime::metrics::Metrics::with_meter(telemetry.meter());
    let result = run(&services, settings, metrics).await;
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ldt: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The exit code of an operator's command: 1 when it failed, with one line saying why.
fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ldt: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    services: &[Service],
    settings: ldt_runtime::configuration::Settings,
    metrics: ldt_runtime::metrics::Metrics,
) -> anyhow::Result<()> {
    let addr = settings.http_addr.clone();
    let settings_summary = (
        settings.amqp_url.is_some(),
        settings.backend().name(),
        if settings.ephemeral {
            "in memory".to_owned()
        } else if settings.uses_data_dir() {
            settings.data_dir.display().to_string()
        } else {
            "on the servers".to_owned()
        },
    );
    let listener = tokio::net::TcpListener::bind(addr.as_str())
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let app = Application::build_with_metrics(services, settings, listener, metrics).await?;
    let local = app.local_addr()?;
    let names: Vec<&str> = services.iter().map(|s| s.as_str()).collect();
    let bus = if settings_summary.0 {
        "RabbitMQ"
    } else {
        "in-process bus"
    };
    tracing::info!(services = ?names, database = settings_summary.1, bus, data = %settings_summary.2, "ready: console on http://{local}/, API on http://{local}/docs");
    // The console first: it is where a newcomer starts. (Scripts read the first URL.)
    println!("ldt ready: http://{local}/ (console), http://{local}/docs (API, Swagger UI)");
    app.run_until(shutdown_signal()).await
}

/// The `LDT_DATABASE_URL_<SERVICE>` variables added to the settings, each URL checked like
/// --database-url's.
fn with_service_databases(
    settings: ldt_runtime::configuration::Settings,
) -> Result<ldt_runtime::configuration::Settings, ExitCode> {
    let settings = settings
        .with_service_database_urls_from(std::env::vars())
        .map_err(|e| {
            eprintln!("ldt: error: {e}");
            ExitCode::from(2)
        })?;
    for (service, url) in &settings.service_database_urls {
        if let Some(why) = ldt_runtime::urls::database_url_problem(url) {
            eprintln!(
                "ldt: error: the database of {} (--service-database-url or LDT_DATABASE_URL_{}): {why}",
                service.as_str(),
                service.as_str().to_uppercase().replace('-', "_")
            );
            return Err(ExitCode::from(2));
        }
    }
    Ok(settings)
}

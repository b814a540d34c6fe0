//! The command line: the subcommands, each with its own flags.

use clap::{Parser, Subcommand};
use ldt_contract::Service;
use ldt_runtime::configuration::Settings;

#[derive(Debug, Parser)]
#[command(
    name = "ldt",
    version,
    about = "Late-Day Tokens Marketplace: an order saga across services, over RabbitMQ and \
             PostgreSQL or embedded",
    long_about = "Late-Day Tokens Marketplace: orders run as a saga (payment → inventory → \
                  delivery, compensated in reverse on failure) across services that each own \
                  a database and talk over a message bus.\n\n\
                  `ldt up` runs every service in one process. With no --amqp-url and no \
                  --database-url it needs nothing installed: each service keeps a SQLite file \
                  in --data-dir (default ./ldt-data) and the services talk over an in-process \
                  bus journaled there too. `ldt serve <service>...` runs only the named ones, \
                  so each can be its own process or container; they talk over RabbitMQ."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run every service in this process, behind one HTTP address.
    Up(Settings),
    /// Run only the named services in this process.
    Serve {
        /// The services to run (order, orchestrator, payment, inventory, delivery, dead-letter).
        #[arg(required = true, value_enum)]
        services: Vec<Service>,
        #[command(flatten)]
        settings: Settings,
    },
    /// Run the marketplace as one process per service under SIGKILLs, broker restarts and
    /// duplicate deliveries, then check the invariants (exit code 1 if one is broken).
    Chaos(ldt_tools::chaos::ChaosArgs),
    /// Load-test a running marketplace and check the invariants afterwards.
    Bench(ldt_tools::bench::BenchArgs),
    /// Orders of a running marketplace: list, show (with the saga's timeline), cancel.
    Orders {
        #[command(subcommand)]
        cmd: ldt_tools::ctl::OrdersCmd,
        #[command(flatten)]
        target: ldt_tools::ctl::Target,
    },
    /// Sagas of a running marketplace: the stuck ones, the long-compensating ones, retry.
    Sagas {
        #[command(subcommand)]
        cmd: ldt_tools::ctl::SagasCmd,
        #[command(flatten)]
        target: ldt_tools::ctl::Target,
    },
    /// Dead letters of a running marketplace: list, replay.
    DeadLetters {
        #[command(subcommand)]
        cmd: ldt_tools::ctl::DeadLettersCmd,
        #[command(flatten)]
        target: ldt_tools::ctl::Target,
    },
    /// Print a completion script for a shell (`ldt completions bash > /etc/bash_completion.d/ldt`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Delete every database and queue of a namespace (all its orders, users and stock).
    Purge(PurgeArgs),
}

impl Command {
    /// The first configured URL that cannot work, as (argument id, flag, variable, why).
    pub fn url_problem(&self) -> Option<(&'static str, &'static str, &'static str, String)> {
        let (amqp, db) = match self {
            Command::Up(s) | Command::Serve { settings: s, .. } => {
                (s.amqp_url.as_deref(), s.database_url.as_deref())
            }
            Command::Purge(p) => (p.amqp_url.as_deref(), p.database_url.as_deref()),
            _ => return None,
        };
        if let Some(why) = amqp.and_then(ldt_runtime::urls::amqp_url_problem) {
            return Some(("amqp_url", "--amqp-url", "LDT_AMQP_URL", why));
        }
        if let Some(why) = db.and_then(ldt_runtime::urls::database_url_problem) {
            return Some(("database_url", "--database-url", "LDT_DATABASE_URL", why));
        }
        None
    }
}

/// What `ldt purge` needs to know: where the namespace lives.
#[derive(Debug, clap::Args)]
pub struct PurgeArgs {
    /// Required: purging cannot be undone.
    #[arg(long)]
    pub yes: bool,
    /// The namespace to delete.
    #[arg(long, env = "LDT_NAMESPACE", default_value = "ldt")]
    pub namespace: String,
    /// Its RabbitMQ (its queues are deleted); unset: the in-process bus's journal.
    #[arg(long, env = "LDT_AMQP_URL", hide_env_values = true)]
    pub amqp_url: Option<String>,
    /// Its PostgreSQL server (its databases are dropped); unset: its SQLite files.
    #[arg(long, env = "LDT_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Where the embedded mode keeps its files.
    #[arg(long, env = "LDT_DATA_DIR", default_value = "ldt-data")]
    pub data_dir: std::path::PathBuf,
}

impl PurgeArgs {
    /// The settings of the namespace to purge.
    pub fn settings(&self) -> Result<Settings, clap::Error> {
        let mut settings = Settings::try_parse_from(["ldt", "--namespace", &self.namespace])?;
        settings.amqp_url = self.amqp_url.clone();
        settings.database_url = self.database_url.clone();
        settings.data_dir = self.data_dir.clone();
        settings.ephemeral = false;
        Ok(settings)
    }
}

/// A clap error in words that name what was wrong where: a bad value that came from the
/// environment names the variable, not the flag it stands for.
pub fn explain(error: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        error.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return error;
    }
    let Some(ContextValue::String(arg)) = error.get(ContextKind::InvalidArg) else {
        return error;
    };
    let Some(long) = arg
        .split_whitespace()
        .next()
        .and_then(|a| a.strip_prefix("--"))
    else {
        return error;
    };
    let on_command_line =
        std::env::args().any(|a| a == format!("--{long}") || a.starts_with(&format!("--{long}=")));
    if on_command_line {
        return error;
    }
    let cmd = <Cli as clap::CommandFactory>::command();
    let env = cmd
        .get_subcommands()
        .flat_map(|sub| sub.get_arguments())
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned());
    let Some(env) = env.filter(|e| std::env::var_os(e).is_some()) else {
        return error;
    };
    let text = error.to_string();
    let first = text.lines().next().unwrap_or_default();
    let reason = first.trim_start_matches("error: ");
    let reason = reason.replace(
        &format!("for '{arg}'"),
        &format!("in the environment variable {env}"),
    );
    let mut cmd = cmd;
    cmd.error(ErrorKind::InvalidValue, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_needs_known_services_and_namespaces_are_checked() {
        assert!(Cli::try_parse_from(["ldt", "serve"]).is_err());
        assert!(Cli::try_parse_from(["ldt", "serve", "bogus"]).is_err());
        assert!(Cli::try_parse_from(["ldt", "serve", "payment", "dead-letter"]).is_ok());
        assert!(Cli::try_parse_from(["ldt", "up", "--namespace", "Bad-Name"]).is_err());
    }
}

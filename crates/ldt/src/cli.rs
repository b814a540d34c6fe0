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
    Purge {
        /// Required: purging cannot be undone.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        settings: Settings,
    },
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

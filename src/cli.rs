//! The command line: `swarmgate [run] [--config PATH]`, `swarmgate check [--config PATH]`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "swarmgate", version, about = "TLS-terminating ingress gateway for Docker Swarm services")]
pub struct Cli {
    /// Configuration file (TOML).
    #[arg(long, global = true, env = "SWARMGATE_CONFIG", default_value = "config/swarmgate.toml")]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand, PartialEq, Eq)]
pub enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate the configuration and exit: 0 with a summary, 1 with every problem.
    Check,
}

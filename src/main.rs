//! The `swarmgate` binary: parses the command line, validates the configuration
//! (`check`, exit 0/1) or runs the gateway (exit 0 after a graceful shutdown, 1 on an
//! invalid config, 2 when a listener cannot bind).

use std::process::ExitCode;

/// jemalloc: per-thread caches suit thread-per-core workers (measured in the README).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use clap::Parser;

/// A line to stderr; one that cannot be written is lost rather than a panic (`eprintln!`).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
use swarmgate::cli::{Cli, Command};
use swarmgate::lifecycle::{self, exit};
use swarmgate::{config, tls};

fn main() -> ExitCode {
    let cli = Cli::parse();
    swarmgate::install_crypto_provider();
    let env = lifecycle::environment();
    match cli.command.as_ref().unwrap_or(&Command::Run) {
        Command::Check => ExitCode::from(check(&cli, &env)),
        Command::Run => {
            swarmgate::telemetry::init(&env);
            let config = match config::load(&cli.config, &env) {
                Ok(c) => c,
                Err(problems) => {
                    // With JSON logs every stderr line stays a JSON object.
                    let json = env.get("SWARMGATE_LOG_FORMAT").is_some_and(|f| f.eq_ignore_ascii_case("json"));
                    for p in &problems {
                        if json {
                            tracing::error!(location = %p.location, "{}", p.message);
                        } else {
                            say!("{p}");
                        }
                    }
                    tracing::error!(problems = problems.len(), "invalid configuration; not starting");
                    return ExitCode::from(exit::INVALID_CONFIG);
                }
            };
            ExitCode::from(lifecycle::run(config))
        }
    }
}

/// `swarmgate check`: every problem as `FILE:LINE:COL: message`, or a summary.
fn check(cli: &Cli, env: &std::collections::BTreeMap<String, String>) -> u8 {
    let config = match config::load(&cli.config, env) {
        Ok(c) => c,
        Err(problems) => {
            for p in &problems {
                say!("{p}");
            }
            say!("{} problem(s) in {}", problems.len(), cli.config.display());
            return exit::INVALID_CONFIG;
        }
    };
    let statics = match tls::CertStore::load_dir(&config.tls.certs_dir, &[tls::devcert::DEV_CERT_STEM]) {
        Ok(s) => s,
        Err(errors) => {
            for e in &errors {
                say!("{e}");
            }
            say!("{} problem(s) with certificates in {}", errors.len(), config.tls.certs_dir.display());
            return exit::INVALID_CONFIG;
        }
    };
    if let Err(e) = swarmgate::gateway::check_acme(&config, &statics) {
        say!("{e}");
        if let swarmgate::gateway::ApplyError::Acme(problems) = &e {
            say!("{} problem(s) in {}", problems.len(), cli.config.display());
        }
        return exit::INVALID_CONFIG;
    }
    let mut out = config.summary();
    let certs: Vec<String> = statics.infos().map(|i| i.names.join(",")).collect();
    out += &format!("static certificates: {}\n", if certs.is_empty() { "none".to_string() } else { certs.join("; ") });
    if config.listen.https.is_some() && config.acme.is_none() {
        let missing = tls::devcert::uncovered(config.routes.iter().map(|r| &r.host), &statics);
        if !missing.is_empty() {
            out += &format!(
                "no certificate for: {} (a self-signed development certificate will be used)\n",
                missing.join(", ")
            );
        }
    }
    // A closed stdout (`swarmgate check | head`) is not a config problem.
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes());
    exit::OK
}

//! One file per subcommand, plus what they share.

use braid::{Backend, Reactor};

pub mod echo;
pub mod exec;

/// The backend named by `--reactor`, else by `BRAID_REACTOR`, else the
/// platform default. An unknown name is an error listing the valid ones.
pub fn backend(flag: Option<&str>) -> Result<Backend, String> {
    match flag {
        Some(name) => name.parse().map_err(|e: braid::Error| e.to_string()),
        None => Backend::from_env().map_err(|e| e.to_string()),
    }
}

/// Installs the reactor for this thread and runs it until SIGINT/SIGTERM.
pub fn serve(reactor: &Reactor) -> Result<(), String> {
    reactor.run().map_err(|e| e.to_string())?;
    if let Some(sig) = reactor.exit_signal() {
        tracing::info!("stopped by signal {sig}; clean shutdown");
    }
    Ok(())
}

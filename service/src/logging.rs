//! Logging on stderr (text or JSON lines, `RUNNEL_LOG` filters), how `main` ends (the whole
//! error chain, a non-zero exit code) and waiting for the signals that stop a service.

use std::process::ExitCode;

/// `--log-format`: what stderr gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured only on a terminal.
    Text,
    /// One JSON object a line, for log shippers.
    Json,
}

/// The filter when `RUNNEL_LOG` is unset or invalid: Runnel's own `info`, and only warnings from
/// the Delta Lake libraries, which log every snapshot and scan at `info`.
pub const DEFAULT_FILTER: &str = "info,buoyant_kernel=warn,deltalake_core=warn";

/// Installs the process's tracing subscriber: stderr, `RUNNEL_LOG` as the filter
/// ([`DEFAULT_FILTER`] when unset or invalid), colours only on a terminal (journald and log files
/// get plain text).
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUNNEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The exit of a command of `binary`: success, or the whole error chain on stderr
/// (`binary: error: outer: inner: cause`) and a failure code.
pub fn exit(binary: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{binary}: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Waits for SIGINT (Ctrl-C) or SIGTERM (systemd stop). `what` names the process in the
/// warning logged when SIGTERM cannot be listened for.
pub async fn wait_for_signal(what: &str) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(term) => term,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the {what}");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = what;
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(exit("runnel-test", Ok(())), ExitCode::SUCCESS);
        let failed = exit(
            "runnel-test",
            Err(anyhow::anyhow!("inner").context("outer")),
        );
        assert_eq!(failed, ExitCode::FAILURE);
    }
}

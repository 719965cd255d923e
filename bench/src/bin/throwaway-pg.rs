//! `throwaway-pg`: a throwaway PostgreSQL cluster for scripts (`scripts/throwaway-pg` builds and runs this), over
//! `nudge::throwaway`.
//!
//! ```text
//! throwaway-pg [-c name=value]...
//! ```
//!
//! Prints the cluster's URL as the first line on stdout, then keeps the cluster until its stdin closes or it gets
//! SIGTERM or SIGINT; then stops it, deletes it and exits 0. The defaults are for tests: fsync=off and
//! synchronous_commit=off (a crash of the machine may lose the cluster, which is thrown away anyway), and
//! max_connections=200; each `-c` comes after them and overrides them. Exit 2: bad usage, or no server binaries;
//! exit 1: the cluster did not start (the server's log, or initdb's output, on stderr).

use std::io::{Read, Write};
use std::process::ExitCode;

use nudge::throwaway::{Builder, Error};
use tokio::signal::unix::{signal, SignalKind};

const USAGE: &str = "usage: throwaway-pg [-c name=value]...";

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let builder = match builder(std::env::args().skip(1)) {
        Ok(builder) => builder,
        Err(message) => {
            eprintln!("throwaway-pg: {message}");
            return ExitCode::from(2);
        }
    };
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("throwaway-pg: cannot handle signals: {e}");
            return ExitCode::from(1);
        }
    };
    // A signal while the cluster starts drops the start: the cluster's guard deletes whatever was made.
    let cluster = tokio::select! {
        started = builder.start() => started,
        _ = term.recv() => return ExitCode::SUCCESS,
        _ = int.recv() => return ExitCode::SUCCESS,
    };
    let cluster = match cluster {
        Ok(cluster) => cluster,
        Err(Error::NoBinaries) => {
            eprintln!("throwaway-pg: {}", Error::NoBinaries);
            return ExitCode::from(2);
        }
        Err(Error::Failed { step, output }) => {
            eprintln!("throwaway-pg: {step} failed:\n{}", output.trim_end());
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("throwaway-pg: {e}");
            return ExitCode::from(1);
        }
    };
    let mut stdout = std::io::stdout();
    if writeln!(stdout, "{}", cluster.url()).and_then(|()| stdout.flush()).is_err() {
        // Nobody reads the URL: nothing to keep the cluster for.
        let _ = cluster.stop().await;
        return ExitCode::from(1);
    }

    // Reading stdin blocks, so a thread of its own does it; it is left behind when a signal ends the wait.
    let (closed, stdin_closed) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut sink = [0u8; 1024];
        let mut stdin = std::io::stdin().lock();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        let _ = closed.send(());
    });
    tokio::select! {
        _ = stdin_closed => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    match cluster.stop().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("throwaway-pg: {e}");
            ExitCode::from(1)
        }
    }
}

/// The cluster the command line asks for, or what is wrong with the command line.
fn builder(mut args: impl Iterator<Item = String>) -> Result<Builder, String> {
    let mut builder =
        Builder::new().setting("fsync", "off").setting("synchronous_commit", "off").setting("max_connections", "200");
    while let Some(arg) = args.next() {
        if arg != "-c" {
            return Err(format!("unknown argument {arg} ({USAGE})"));
        }
        let setting = args.next().ok_or("-c needs name=value")?;
        let (name, value) = setting.split_once('=').ok_or("-c needs name=value")?;
        builder = builder.setting(name, value);
    }
    Ok(builder)
}

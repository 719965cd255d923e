//! A throwaway PostgreSQL cluster for `nudge demo`: found on this machine, started in a temporary directory,
//! stopped and deleted when nudge exits, however it exits.
//!
//! The server runs under a small `sh` wrapper whose stdin is a pipe held by nudge. When nudge exits (even on
//! SIGKILL) the pipe closes, the wrapper's `read` returns, and it stops the postmaster and removes the directory.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "no PostgreSQL server binaries found (looked on PATH, pg_config --bindir, /usr/lib/postgresql/*/bin, Homebrew); \
         install them (Debian/Ubuntu: sudo apt-get install postgresql; macOS: brew install postgresql) or pass --database-url"
    )]
    NotFound,
    #[error("cannot prepare {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{step} failed: {detail}")]
    Failed { step: &'static str, detail: String },
}

pub struct Cluster {
    /// The wrapper; dropping its stdin stops the server.
    wrapper: Child,
    pub url: String,
}

impl Cluster {
    pub async fn start() -> Result<Cluster, ClusterError> {
        let bindir = find_bindir(std::env::var_os("PATH"), SEARCHED).ok_or(ClusterError::NotFound)?;
        let as_user = unprivileged_user();
        let dir = std::env::temp_dir().join(format!("nudge-demo-{}", std::process::id()));
        let io = |source| ClusterError::Io { path: dir.clone(), source };
        std::fs::create_dir_all(&dir).map_err(io)?;
        if let Some(user) = &as_user {
            let status = Command::new("chown").arg(user).arg(&dir).status().map_err(io)?;
            if !status.success() {
                return Err(ClusterError::Failed { step: "chown", detail: format!("chown {user} {}", dir.display()) });
            }
        }
        let data = dir.join("data");
        let log = dir.join("postgres.log");
        tracing::info!(bindir = %bindir.display(), dir = %dir.display(), "starting a throwaway PostgreSQL");

        let initdb = command(&as_user, &bindir.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .output()
            .map_err(io)?;
        if !initdb.status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(ClusterError::Failed {
                step: "initdb",
                detail: String::from_utf8_lossy(&initdb.stderr).trim().into(),
            });
        }

        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(io)?.port();
        let mut server = command(&as_user, &bindir.join("postgres"));
        server.arg("-D").arg(&data).args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"]);
        server.arg("-c").arg(format!("unix_socket_directories={}", dir.display()));
        let program = server.get_program().to_owned();
        let args: Vec<_> = server.get_args().map(|a| a.to_owned()).collect();
        let script = r#"
            "$@" >"$NUDGE_PG_LOG" 2>&1 &
            pg=$!
            read _ignored
            kill -QUIT "$(head -n 1 "$NUDGE_PG_DATA/postmaster.pid" 2>/dev/null)" 2>/dev/null
            wait "$pg"
            rm -rf "$NUDGE_PG_DIR"
        "#;
        let wrapper = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(program)
            .args(args)
            .env("NUDGE_PG_LOG", &log)
            .env("NUDGE_PG_DATA", &data)
            .env("NUDGE_PG_DIR", &dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: Ctrl-C in the terminal stops nudge, and nudge stops the cluster, in order.
            .process_group(0)
            .spawn()
            .map_err(io)?;
        let mut cluster = Cluster { wrapper, url: format!("postgres://postgres@127.0.0.1:{port}/postgres") };
        cluster.wait_ready(&log).await?;
        Ok(cluster)
    }

    async fn wait_ready(&mut self, log: &Path) -> Result<(), ClusterError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio_postgres::connect(&self.url, NoTls).await.is_ok() {
                return Ok(());
            }
            let exited = matches!(self.wrapper.try_wait(), Ok(Some(_)));
            if exited || Instant::now() > deadline {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(5).collect();
                let detail = tail.into_iter().rev().collect::<Vec<_>>().join(" | ");
                return Err(ClusterError::Failed { step: "starting postgres", detail });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Closing the wrapper's stdin is the stop signal; waiting lets it delete the directory before we exit.
        drop(self.wrapper.stdin.take());
        let _ = self.wrapper.wait();
    }
}

/// `runuser -u USER -- program` when running as root (initdb and postgres refuse root), else `program`.
fn command(as_user: &Option<String>, program: &Path) -> Command {
    match as_user {
        Some(user) => {
            let mut command = Command::new("runuser");
            command.args(["-u", user, "--"]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

fn unprivileged_user() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return None;
    }
    let has = |user: &str| Command::new("id").arg("-u").arg(user).output().is_ok_and(|o| o.status.success());
    ["postgres", "nobody"].into_iter().find(|u| has(u)).map(str::to_owned)
}

/// Where server binaries are looked for after PATH and `pg_config`: Debian's versioned directories, Homebrew.
const SEARCHED: &[&str] = &["/usr/lib/postgresql", "/opt/homebrew/opt", "/usr/local/opt"];

fn find_bindir(path: Option<std::ffi::OsString>, searched: &[&str]) -> Option<PathBuf> {
    let usable = |dir: &Path| dir.join("postgres").is_file() && dir.join("initdb").is_file();
    // PATH: resolve symlinks, since Debian links /usr/local/bin/postgres into a versioned directory.
    if let Some(path) = path {
        for dir in std::env::split_paths(&path) {
            if let Ok(real) = std::fs::canonicalize(dir.join("postgres")) {
                if let Some(bindir) = real.parent().filter(|d| usable(d)) {
                    return Some(bindir.to_owned());
                }
            }
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").env("PATH", &path).output() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if out.status.success() && usable(&dir) {
                return Some(dir);
            }
        }
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    for parent in searched {
        if let Ok(entries) = std::fs::read_dir(parent) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if *parent == "/usr/lib/postgresql" || name.starts_with("postgresql") {
                    candidates.push(entry.path().join("bin"));
                }
            }
        }
    }
    // Newest version first: compare the numbers in the path.
    let version = |p: &PathBuf| -> Vec<u32> {
        p.to_string_lossy().split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect()
    };
    candidates.sort_by_key(|p| std::cmp::Reverse(version(p)));
    let homebrew_bins =
        if searched.is_empty() { vec![] } else { vec!["/opt/homebrew/bin".into(), "/usr/local/bin".into()] };
    candidates.into_iter().chain(homebrew_bins).find(|d| usable(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_debian_binaries_and_reports_none_when_nothing_is_there() {
        let empty = Some(std::ffi::OsString::from("/nonexistent"));
        assert_eq!(find_bindir(empty.clone(), &[]), None);
        if Path::new("/usr/lib/postgresql").is_dir() {
            let found = find_bindir(empty, SEARCHED).expect("Debian's server binaries");
            assert!(found.join("initdb").is_file());
        }
    }
}

//! A throwaway PostgreSQL cluster: found on this machine, created in a directory of its own, started on a free
//! port, and stopped and deleted when its owner is done with it or dies, however it dies. `nudge demo`, the Rust
//! test harness (`tests/common`) and `scripts/throwaway-pg` (the `throwaway-pg` binary of `bench/`) all use it.
//!
//! ```no_run
//! # async fn run() -> Result<(), nudge::throwaway::Error> {
//! let cluster = nudge::throwaway::Builder::new().setting("fsync", "off").start().await?;
//! println!("{}", cluster.url()); // postgres://postgres@127.0.0.1:PORT/postgres, trust authentication
//! cluster.stop().await
//! # }
//! ```
//!
//! The cluster's lifetime is tied to its owner's process by a *guard*: a small `sh` process whose stdin is a pipe
//! only the owner holds. When that pipe closes (an explicit [`Cluster::stop`], a drop, or the owner's exit, even by
//! SIGKILL, or a test binary that never runs the destructor of a static), the guard stops the postmaster with an
//! immediate shutdown, waits for it, and deletes the directory. So nothing here ever has to wait in `Drop`.
//!
//! Everything that runs a program or touches a file in the async paths goes through `tokio::process` and
//! `tokio::fs` (binary discovery, which may run `pg_config`, on a blocking thread), so that starting a cluster never
//! blocks a runtime thread.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin, Command};

/// How long a start may take before it counts as failed (initdb excluded).
const READY_WITHIN: Duration = Duration::from_secs(60);
/// How long a fast shutdown may take before [`Cluster::stop_server`] gives up on it.
const STOPPED_WITHIN: Duration = Duration::from_secs(60);
/// Starts attempted on different ports when the chosen free port was taken before postgres bound it.
const PORT_ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no PostgreSQL server binaries found (looked on PATH, pg_config --bindir, /usr/lib/postgresql/*/bin, \
         Homebrew); install them (Debian/Ubuntu: sudo apt-get install postgresql; macOS: brew install postgresql)"
    )]
    NoBinaries,
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    /// A step that failed, with what it printed (for `starting postgres`, the server's log).
    #[error("{step} failed: {}", tail(output, 5))]
    Failed { step: &'static str, output: String },
}

fn io_error(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> Error {
    let what = what.to_string();
    move |source| Error::Io { what, source }
}

/// The last `lines` lines of `text`, joined by " | ": enough of a log for a one-line error.
fn tail(text: &str, lines: usize) -> String {
    let last: Vec<&str> = text.lines().rev().take(lines).collect();
    last.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

type Configure = Box<dyn FnOnce(&Path) -> io::Result<()> + Send>;

/// What the cluster will be; [`Builder::start`] makes it.
#[derive(Default)]
pub struct Builder {
    directory: Option<PathBuf>,
    settings: Settings,
    postgresql_conf: String,
    pg_hba_conf: Option<String>,
    configure: Option<Configure>,
}

impl Builder {
    pub fn new() -> Builder {
        Builder::default()
    }

    /// Where the cluster lives (created; deleted with the cluster). By default a new directory
    /// `/tmp/nudge-pg.<unique>`: under /tmp rather than `$TMPDIR`, so that the server's Unix socket path stays
    /// within its length limit, and so that `scripts/bench` finds it.
    pub fn directory(mut self, path: impl Into<PathBuf>) -> Builder {
        self.directory = Some(path.into());
        self
    }

    /// A server setting, passed as `-c name=value`; a later value for the same name replaces an earlier one.
    pub fn setting(mut self, name: &str, value: &str) -> Builder {
        self.settings.set(name, value);
        self
    }

    /// Lines appended to `postgresql.conf` before the first start (for what `-c` cannot say as well, such as
    /// file paths relative to the data directory).
    pub fn postgresql_conf(mut self, lines: &str) -> Builder {
        self.postgresql_conf.push_str(lines);
        self.postgresql_conf.push('\n');
        self
    }

    /// `pg_hba.conf`'s whole content, instead of initdb's (which trusts every local and loopback connection).
    pub fn pg_hba_conf(mut self, content: &str) -> Builder {
        self.pg_hba_conf = Some(content.to_owned());
        self
    }

    /// Run `configure` on the data directory after initdb and before the first start (to put certificates there,
    /// say). It runs on a blocking thread.
    pub fn configure(mut self, configure: impl FnOnce(&Path) -> io::Result<()> + Send + 'static) -> Builder {
        self.configure = Some(Box::new(configure));
        self
    }

    /// Create the cluster and start it; returns once it accepts connections.
    pub async fn start(self) -> Result<Cluster, Error> {
        let bindir = tokio::task::spawn_blocking(server_binaries)
            .await
            .map_err(|e| io_error("looking for PostgreSQL")(io::Error::other(e)))?
            .ok_or(Error::NoBinaries)?;
        let dir = match self.directory {
            Some(dir) => {
                tokio::fs::create_dir_all(&dir).await.map_err(io_error(format!("creating {}", dir.display())))?;
                dir
            }
            None => unique_directory().await?,
        };
        let root = tokio::fs::metadata(&dir).await.map_err(io_error(dir.display()))?.uid() == 0;
        let guard = match guard(&dir).await {
            Ok(guard) => guard,
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&dir).await;
                return Err(e);
            }
        };
        // From here on the guard deletes the directory whatever happens, including an early return.
        let mut cluster = Cluster {
            bindir,
            run_as: if root { Some(unprivileged_user().await) } else { None },
            port: free_port().map_err(io_error("choosing a port"))?,
            settings: self.settings,
            dir,
            server: None,
            guard_stdin: Some(guard.0),
            guard: guard.1,
        };
        cluster.chown().await?;
        tracing::info!(bindir = %cluster.bindir.display(), dir = %cluster.dir.display(), "starting a throwaway PostgreSQL");
        let initdb = cluster
            .command(&cluster.bindir.join("initdb"))
            .arg("-D")
            .arg(cluster.data())
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"])
            .output()
            .await
            .map_err(io_error("running initdb"))?;
        if !initdb.status.success() {
            let mut output = String::from_utf8_lossy(&initdb.stdout).into_owned();
            output.push_str(&String::from_utf8_lossy(&initdb.stderr));
            return Err(Error::Failed { step: "initdb", output });
        }
        if !self.postgresql_conf.is_empty() {
            let path = cluster.data().join("postgresql.conf");
            let mut conf =
                tokio::fs::OpenOptions::new().append(true).open(&path).await.map_err(io_error(path.display()))?;
            let lines = format!("\n{}", self.postgresql_conf);
            conf.write_all(lines.as_bytes()).await.map_err(io_error(path.display()))?;
        }
        if let Some(content) = &self.pg_hba_conf {
            let path = cluster.data().join("pg_hba.conf");
            tokio::fs::write(&path, content).await.map_err(io_error(path.display()))?;
        }
        if let Some(configure) = self.configure {
            let data = cluster.data();
            let configured = tokio::task::spawn_blocking(move || configure(&data)).await;
            configured
                .unwrap_or_else(|e| Err(io::Error::other(e)))
                .map_err(io_error("configuring the data directory"))?;
            // What it wrote is root's when we are root, and postgres refuses files it does not own.
            cluster.chown().await?;
        }
        let mut attempts = 1;
        loop {
            match cluster.start_server().await {
                Err(Error::Failed { output, .. })
                    if attempts < PORT_ATTEMPTS
                        && (output.contains("could not bind") || output.contains("Address already in use")) =>
                {
                    attempts += 1;
                    cluster.port = free_port().map_err(io_error("choosing a port"))?;
                }
                Err(e) => return Err(e),
                Ok(()) => return Ok(cluster),
            }
        }
    }
}

/// A running throwaway cluster. Its superuser is `postgres`, trusted without a password on 127.0.0.1 and on the
/// Unix socket in [`Cluster::directory`].
pub struct Cluster {
    bindir: PathBuf,
    /// The user that owns and runs the cluster when we are root (initdb and postgres refuse root).
    run_as: Option<String>,
    port: u16,
    settings: Settings,
    dir: PathBuf,
    /// The postmaster (or `runuser` in front of it), while it runs.
    server: Option<Child>,
    /// The guard's stdin: closing it stops and deletes the cluster. Lines written to it say whether a server may
    /// be starting (`running`) or is known to be down (`stopped`).
    guard_stdin: Option<ChildStdin>,
    guard: Child,
}

impl Cluster {
    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// The URL of database `name` as the superuser.
    pub fn database_url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's directory: `data/`, `postgres.log`, and the server's Unix socket.
    pub fn directory(&self) -> &Path {
        &self.dir
    }

    /// The server's log (stdout and stderr, every start).
    pub async fn log(&self) -> String {
        tokio::fs::read_to_string(self.dir.join("postgres.log")).await.unwrap_or_default()
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Stop the server as an operator's restart does (fast shutdown: the server ends every session), keeping the
    /// cluster for [`Cluster::start_server`].
    pub async fn stop_server(&mut self) -> Result<(), Error> {
        self.end_server("-INT").await
    }

    /// Crash the server: an immediate shutdown (SIGQUIT), in which no process writes anything more, so WAL not
    /// yet written from shared memory (commits with `synchronous_commit = off`) is lost, as in a power cut. The
    /// next [`Cluster::start_server`] runs crash recovery.
    pub async fn crash_server(&mut self) -> Result<(), Error> {
        self.end_server("-QUIT").await
    }

    async fn end_server(&mut self, signal: &str) -> Result<(), Error> {
        let Some(mut server) = self.server.take() else {
            return Ok(());
        };
        if let Some(pid) = self.postmaster_pid().await {
            self.kill(signal, &pid).await;
        }
        let exited = tokio::time::timeout(STOPPED_WITHIN, server.wait()).await;
        self.tell_guard("stopped").await;
        match exited {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(io_error("waiting for postgres")(e)),
            Err(_) => Err(Error::Failed { step: "stopping postgres", output: self.log().await }),
        }
    }

    /// Start the server (again, on the same port) and wait until it accepts connections.
    pub async fn start_server(&mut self) -> Result<(), Error> {
        if self.server.is_some() {
            return Ok(());
        }
        let path = self.dir.join("postgres.log");
        let log = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await
            .map_err(io_error(path.display()))?
            .into_std()
            .await;
        let logged = log.metadata().map(|m| m.len()).unwrap_or(0) as usize;
        let stderr = log.try_clone().map_err(io_error(path.display()))?;
        self.tell_guard("running").await;
        let server = self
            .command(&self.bindir.join("postgres"))
            .args(server_args(&self.data(), self.port, &self.dir, &self.settings))
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .map_err(io_error("starting postgres"))?;
        self.server = Some(server);
        if self.wait_ready().await {
            return Ok(());
        }
        let _ = self.stop_server().await;
        let log = self.log().await;
        Err(Error::Failed { step: "starting postgres", output: log.get(logged..).unwrap_or(&log).to_owned() })
    }

    /// Whether the server accepts a session on its Unix socket (whatever pg_hba.conf says of TCP) before
    /// [`READY_WITHIN`] and before it exits.
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + READY_WITHIN;
        let mut config = tokio_postgres::Config::new();
        config.host_path(&self.dir).port(self.port).user("postgres").dbname("postgres");
        config.connect_timeout(Duration::from_secs(5));
        loop {
            if let Ok((client, connection)) = config.connect(tokio_postgres::NoTls).await {
                drop(client);
                let _ = connection.await;
                return true;
            }
            let exited = self.server.as_mut().is_none_or(|s| matches!(s.try_wait(), Ok(Some(_))));
            if exited || Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stop the server and delete the cluster; returns when both are done.
    pub async fn stop(mut self) -> Result<(), Error> {
        // The guard sends the postmaster an immediate shutdown; we reap it meanwhile, so that the guard, which
        // waits for it to be gone, is not kept waiting by a zombie.
        drop(self.guard_stdin.take());
        if let Some(mut server) = self.server.take() {
            server.wait().await.map_err(io_error("waiting for postgres"))?;
        }
        self.guard.wait().await.map_err(io_error("waiting for the cluster's guard"))?;
        Ok(())
    }

    /// Tell the guard whether a server may be starting, so that a guard woken in between waits for its pid file.
    async fn tell_guard(&mut self, state: &str) {
        if let Some(stdin) = &mut self.guard_stdin {
            let _ = stdin.write_all(format!("{state}\n").as_bytes()).await;
        }
    }

    async fn postmaster_pid(&self) -> Option<String> {
        let pid = tokio::fs::read_to_string(self.data().join("postmaster.pid")).await.ok()?;
        pid.lines().next().map(str::to_owned)
    }

    /// `kill SIGNAL PID`: the postmaster itself, since `runuser` in front of it forwards no signal.
    async fn kill(&self, signal: &str, pid: &str) {
        let _ = Command::new("kill").args([signal, pid]).stderr(Stdio::null()).status().await;
    }

    async fn chown(&self) -> Result<(), Error> {
        let Some(user) = &self.run_as else {
            return Ok(());
        };
        let status = Command::new("chown")
            .arg("-R")
            .arg(format!("{user}:"))
            .arg(&self.dir)
            .status()
            .await
            .map_err(io_error("running chown"))?;
        if !status.success() {
            return Err(Error::Failed { step: "chown", output: format!("chown -R {user}: {}", self.dir.display()) });
        }
        Ok(())
    }

    /// `program`, run as [`Cluster::run_as`] when there is one, in the cluster's directory, in a process group of
    /// its own: Ctrl-C in a terminal reaches the owner, which stops the cluster in order, and not the server.
    fn command(&self, program: &Path) -> Command {
        let mut command = match &self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(program);
                command
            }
            None => Command::new(program),
        };
        command.current_dir(&self.dir).stdin(Stdio::null()).process_group(0);
        command
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The fallback to `stop`: closing the pipe is the signal; the guard does the rest without us.
        drop(self.guard_stdin.take());
    }
}

/// The guard (see the module doc). `$1` is the cluster's directory. It remembers the last state line it read;
/// after `running` the postmaster may not have written its pid file yet, so it gives it a moment.
const GUARD: &str = r#"
state=stopped
while read -r line; do state=$line; done
data=$1/data
if [ "$state" = running ]; then
    n=0
    while [ ! -e "$data/postmaster.pid" ] && [ $n -lt 40 ]; do sleep 0.05; n=$((n + 1)); done
fi
pid=$(head -n 1 "$data/postmaster.pid" 2>/dev/null)
if [ -n "$pid" ] && kill -QUIT "$pid" 2>/dev/null; then
    # Until the postmaster is gone (it removes its pid file once its children have exited): no server process
    # may write into the directory once it is deleted.
    n=0
    while [ -e "$data/postmaster.pid" ] && kill -0 "$pid" 2>/dev/null && [ $n -lt 300 ]; do
        sleep 0.05; n=$((n + 1))
    done
fi
rm -rf "$1"
"#;

async fn guard(dir: &Path) -> Result<(ChildStdin, Child), Error> {
    let mut guard = Command::new("sh")
        .arg("-c")
        .arg(GUARD)
        .arg("throwaway-pg-guard")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(io_error("starting the cluster's guard (sh)"))?;
    let stdin = guard.stdin.take().expect("piped");
    Ok((stdin, guard))
}

/// A new directory `/tmp/nudge-pg.<pid>-<nanos>-<n>`.
async fn unique_directory() -> Result<PathBuf, Error> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    loop {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = PathBuf::from(format!("/tmp/nudge-pg.{}-{nanos}-{n}", std::process::id()));
        match tokio::fs::create_dir(&dir).await {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_error(format!("creating {}", dir.display()))(e)),
            Ok(()) => return Ok(dir),
        }
    }
}

/// `postgres` when that user exists, else `nobody`.
async fn unprivileged_user() -> String {
    let exists = Command::new("id").args(["-u", "postgres"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    if exists.await.is_ok_and(|s| s.success()) {
        "postgres".into()
    } else {
        "nobody".into()
    }
}

/// A port nobody listens on now. Another process may take it before postgres binds it: [`Builder::start`] then
/// tries another.
fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Server settings in the order given, each name once (PostgreSQL's names are case-insensitive).
#[derive(Debug, Default, Clone, PartialEq)]
struct Settings(Vec<(String, String)>);

impl Settings {
    fn set(&mut self, name: &str, value: &str) {
        match self.0.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            Some(setting) => setting.1 = value.to_owned(),
            None => self.0.push((name.to_owned(), value.to_owned())),
        }
    }
}

/// The postgres command line after the program: loopback only, the socket in the cluster's directory, then the
/// builder's settings (which may override those two).
fn server_args(data: &Path, port: u16, dir: &Path, settings: &Settings) -> Vec<OsString> {
    let mut socket_dir = OsString::from("unix_socket_directories=");
    socket_dir.push(dir);
    let mut args: Vec<OsString> = vec!["-D".into(), data.into(), "-p".into(), port.to_string().into()];
    args.extend(["-c".into(), "listen_addresses=127.0.0.1".into(), "-c".into(), socket_dir]);
    for (name, value) in &settings.0 {
        args.extend(["-c".into(), format!("{name}={value}").into()]);
    }
    args
}

/// Where server binaries are looked for after PATH and `pg_config`: directories with one subdirectory per version
/// (Debian's `/usr/lib/postgresql/15`, Homebrew's `postgresql@16`), and the prefix of those subdirectories' names.
const VERSIONED: &[(&str, &str)] =
    &[("/usr/lib/postgresql", ""), ("/opt/homebrew/opt", "postgresql"), ("/usr/local/opt", "postgresql")];

/// The directory holding this machine's PostgreSQL server binaries (`postgres` and `initdb`), if any: the first
/// of PATH, `pg_config --bindir`, the newest version under [`VERSIONED`]. Runs `pg_config`: blocking.
pub fn server_binaries() -> Option<PathBuf> {
    find_bindir(std::env::var_os("PATH").as_deref(), VERSIONED)
}

fn find_bindir(path: Option<&OsStr>, versioned: &[(&str, &str)]) -> Option<PathBuf> {
    let usable = |dir: &Path| dir.join("postgres").is_file() && dir.join("initdb").is_file();
    let on_path = |program: &str| -> Vec<PathBuf> {
        path.map(|p| std::env::split_paths(p).map(|dir| dir.join(program)).filter(|f| f.is_file()).collect())
            .unwrap_or_default()
    };
    // Symlinks resolved: Debian links /usr/bin/pg_config and the like into a versioned directory.
    for postgres in on_path("postgres") {
        if let Some(dir) = std::fs::canonicalize(postgres).ok().and_then(|p| p.parent().map(Path::to_owned)) {
            if usable(&dir) {
                return Some(dir);
            }
        }
    }
    if let Some(pg_config) = on_path("pg_config").into_iter().next() {
        if let Ok(out) = std::process::Command::new(pg_config).arg("--bindir").stderr(Stdio::null()).output() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if out.status.success() && usable(&dir) {
                return Some(dir);
            }
        }
    }
    let mut candidates: Vec<(Vec<u32>, PathBuf)> = Vec::new();
    for (parent, prefix) in versioned {
        for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix) {
                let version = name.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect();
                candidates.push((version, entry.path().join("bin")));
            }
        }
    }
    candidates.sort_by(|a, b| b.0.cmp(&a.0));
    candidates.into_iter().map(|(_, dir)| dir).find(|dir| usable(dir))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A scratch directory removed at the end of the test.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("nudge-throwaway-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        /// `dir` (relative) with executable files `names`; returns its path.
        fn programs(&self, dir: &str, names: &[&str], script: &str) -> PathBuf {
            let dir = self.0.join(dir);
            std::fs::create_dir_all(&dir).unwrap();
            for name in names {
                let file = dir.join(name);
                std::fs::write(&file, script).unwrap();
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
            dir
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const SERVER: &[&str] = &["postgres", "initdb"];

    #[test]
    fn the_newest_version_wins_and_an_incomplete_one_is_skipped() {
        let scratch = Scratch::new("versions");
        let debian = scratch.0.join("lib");
        scratch.programs("lib/9.6/bin", SERVER, "");
        scratch.programs("lib/13/bin", SERVER, "");
        scratch.programs("lib/14/bin", &["postgres"], "");
        let brew = scratch.0.join("opt");
        scratch.programs("opt/postgresql@12/bin", SERVER, "");
        scratch.programs("opt/other@99/bin", SERVER, "");
        let versioned = [(debian.to_str().unwrap(), ""), (brew.to_str().unwrap(), "postgresql")];
        let nothing = Some(OsStr::new("/nonexistent"));
        assert_eq!(find_bindir(nothing, &versioned), Some(debian.join("13/bin")));
        assert_eq!(find_bindir(nothing, &versioned[1..]), Some(brew.join("postgresql@12/bin")));
        assert_eq!(find_bindir(nothing, &[]), None);
        assert_eq!(find_bindir(None, &[]), None);
    }

    #[test]
    fn path_comes_first_through_symlinks_then_pg_config() {
        let scratch = Scratch::new("path");
        let versioned_bin = scratch.programs("lib/15/bin", SERVER, "");
        let older = scratch.0.join("old");
        scratch.programs("old/11/bin", SERVER, "");
        let linked = scratch.0.join("linked");
        std::fs::create_dir_all(&linked).unwrap();
        std::os::unix::fs::symlink(versioned_bin.join("postgres"), linked.join("postgres")).unwrap();
        let versioned = [(older.to_str().unwrap(), "")];
        // A symlink on PATH stands for the directory it points into (initdb is there, not beside the link).
        assert_eq!(find_bindir(Some(linked.as_os_str()), &versioned), Some(versioned_bin.clone()));

        // Without postgres on PATH, pg_config names the directory.
        let script = format!("#!/bin/sh\necho {}\n", versioned_bin.display());
        let tools = scratch.programs("tools", &["pg_config"], &script);
        assert_eq!(find_bindir(Some(tools.as_os_str()), &versioned), Some(versioned_bin));

        // A pg_config naming a directory without the server falls through to the versioned directories.
        let client_only = scratch.programs("client", &["pg_config"], "#!/bin/sh\necho /nonexistent\n");
        assert_eq!(find_bindir(Some(client_only.as_os_str()), &versioned), Some(older.join("11/bin")));
    }

    #[test]
    fn settings_follow_the_fixed_ones_once_each_the_later_value_winning() {
        let mut settings = Settings::default();
        settings.set("fsync", "off");
        settings.set("max_connections", "200");
        settings.set("FSYNC", "on");
        settings.set("listen_addresses", "*");
        let args = server_args(Path::new("/c/data"), 5433, Path::new("/c"), &settings);
        let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "-D",
                "/c/data",
                "-p",
                "5433",
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=/c",
                "-c",
                "fsync=on",
                "-c",
                "max_connections=200",
                "-c",
                "listen_addresses=*",
            ]
        );
    }

    #[test]
    fn a_failed_step_reads_as_the_end_of_its_output() {
        let failed = Error::Failed { step: "starting postgres", output: "a\nb\nc\nd\ne\nf\ng\n".into() };
        assert_eq!(failed.to_string(), "starting postgres failed: c | d | e | f | g");
        assert!(Error::NoBinaries.to_string().contains("apt-get install postgresql"));
    }
}

//! The container image (Dockerfile), checked without a container engine: the build stage compiles nudge from
//! exactly the files its COPY lines put in the build context, the image runs as a numeric non-root user, and its
//! HEALTHCHECK command answers what /readyz answers.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The Dockerfile's instructions, continuation lines joined and comments dropped: (INSTRUCTION, arguments).
fn instructions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).expect("read the Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (instruction, args) = current.split_once(char::is_whitespace).unwrap_or((&current, ""));
        out.push((instruction.to_ascii_uppercase(), args.trim().to_owned()));
        current.clear();
    }
    out
}

/// The instructions of one stage (0 = the first FROM).
fn stage(n: usize) -> Vec<(String, String)> {
    let mut stage = None;
    let mut out = Vec::new();
    for (instruction, args) in instructions() {
        if instruction == "FROM" {
            stage = Some(stage.map_or(0, |s| s + 1));
        }
        if stage == Some(n) {
            out.push((instruction, args));
        }
    }
    assert!(!out.is_empty(), "the Dockerfile has no stage {n}");
    out
}

/// Arguments of a COPY/ADD, shell form or JSON form, without its `--flags`.
fn copy_arguments(args: &str) -> Vec<String> {
    if args.starts_with('[') {
        return serde_json::from_str(args).expect("COPY in JSON form");
    }
    args.split_whitespace().filter(|a| !a.starts_with("--")).map(str::to_owned).collect()
}

/// Copy `from` (a file or a directory) to `to`, keeping modification times (so that cargo, seeing sources older
/// than its last build of them, does not compile them again).
fn copy_keeping_times(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    let status = Command::new("cp").arg("-pR").arg(from).arg(to).status().expect("run cp");
    assert!(status.success(), "cp -pR {} {}", from.display(), to.display());
}

/// Lay out in `context` what the build stage's COPY lines put under its WORKDIR, from the repository.
fn lay_out_build_context(context: &Path) {
    assert!(
        !Path::new(ROOT).join(".dockerignore").exists(),
        "the Dockerfile copies paths one by one; with a .dockerignore, teach this test to apply it"
    );
    let mut workdir = PathBuf::from("/");
    let mut copies = 0;
    for (instruction, args) in stage(0) {
        match instruction.as_str() {
            "WORKDIR" => workdir = workdir.join(&args),
            "ADD" => panic!("ADD in the build stage: this test only knows COPY"),
            "COPY" if args.contains("--from") => {}
            "COPY" => {
                let mut paths = copy_arguments(&args);
                let dest = paths.pop().expect("COPY without a destination");
                let dest = workdir.join(&dest);
                let dest = context.join(dest.strip_prefix(&workdir).unwrap_or_else(|_| {
                    panic!("COPY to {} outside WORKDIR {}: teach this test", dest.display(), workdir.display())
                }));
                let into_dir = dest.as_os_str().to_string_lossy().ends_with('/') || paths.len() > 1;
                for source in &paths {
                    assert!(!source.contains(['*', '?', '[']), "COPY {source}: globs are not supported here");
                    let from = Path::new(ROOT).join(source);
                    assert!(from.exists(), "COPY {source}: no such path in the repository");
                    if from.is_dir() {
                        // `COPY dir dest` copies the directory's contents into dest.
                        std::fs::create_dir_all(&dest).unwrap();
                        for entry in std::fs::read_dir(&from).unwrap() {
                            let entry = entry.unwrap();
                            copy_keeping_times(&entry.path(), &dest.join(entry.file_name()));
                        }
                    } else if into_dir {
                        copy_keeping_times(&from, &dest.join(from.file_name().unwrap()));
                    } else {
                        copy_keeping_times(&from, &dest);
                    }
                    copies += 1;
                }
            }
            _ => {}
        }
    }
    assert!(copies > 0, "the build stage copies nothing");
}

/// The build stage's `cargo build` builds what this test builds.
#[test]
fn the_build_stage_runs_a_locked_build_of_the_nudge_binary() {
    let runs: Vec<String> = stage(0).into_iter().filter(|(i, _)| i == "RUN").map(|(_, a)| a).collect();
    assert!(
        runs.iter().any(|r| r.contains("cargo build") && r.contains("--locked") && r.contains("--bin nudge")),
        "no `cargo build --locked --bin nudge` in the build stage: {runs:?}"
    );
}

/// `docker build` fails when the build stage misses a file the build reads (an `include_str!` outside the
/// copied paths, a new top-level directory): this compiles nudge from exactly what the COPY lines copy.
#[test]
fn nudge_compiles_from_exactly_the_files_the_build_stage_copies() {
    // The target directory the tests were built in: its dependencies are reused (cargo's build-dir), so only
    // nudge itself is compiled, and not even that when its sources have not changed since the last run.
    let bin = PathBuf::from(nudge_bin());
    let shared = bin.parent().and_then(Path::parent).expect("target/<profile>/nudge").to_owned();
    let context = shared.join("docker-context");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context).unwrap();
    lay_out_build_context(&context);

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    // What cargo sets for a test process is not the build's environment: a build script that watches one of
    // these (ring's watches CARGO_MANIFEST_DIR) would otherwise be run again here, and again by the next
    // plain `cargo build`.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let set_by_cargo = ["CARGO_MANIFEST_", "CARGO_PKG_", "CARGO_CRATE_", "CARGO_BIN_", "CARGO_PRIMARY_PACKAGE"]
            .iter()
            .any(|prefix| name.starts_with(prefix))
            || ["CARGO_TARGET_TMPDIR", "CARGO_RUSTC_CURRENT_DIR", "OUT_DIR"].contains(&name.as_ref());
        if set_by_cargo {
            build.env_remove(name.as_ref());
        }
    }
    let out = build
        .args(["build", "--locked", "--offline", "--bin", "nudge"])
        .current_dir(&context)
        .env("CARGO_BUILD_BUILD_DIR", std::env::var_os("CARGO_BUILD_BUILD_DIR").unwrap_or(shared.into()))
        // The final binary goes here, not over the one the other tests run.
        .env("CARGO_TARGET_DIR", context.join("target"))
        // No second incremental cache of nudge in the shared directory: unchanged sources are not compiled
        // again anyway (their times are kept), changed ones are compiled once.
        .env("CARGO_INCREMENTAL", "0")
        .stdin(Stdio::null())
        .output()
        .expect("run cargo");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "nudge does not compile from the Dockerfile's build context (what its COPY lines copy), so \
         `docker build` would fail the same way:\n{err}"
    );
    assert!(context.join("target/debug/nudge").exists(), "no binary after the build:\n{err}");
}

/// The image's USER: numeric (Kubernetes' runAsNonRoot can only check a number) and not root.
#[test]
fn the_image_runs_as_a_numeric_non_root_user() {
    let last = instructions().into_iter().filter(|(i, _)| i == "FROM").count() - 1;
    let user = stage(last).into_iter().filter(|(i, _)| i == "USER").map(|(_, a)| a).next_back();
    let user = user.expect("the final stage has no USER: the image would run as root");
    let uid = user.split(':').next().unwrap();
    let uid: u32 = uid.parse().unwrap_or_else(|_| panic!("USER {user}: not numeric"));
    assert_ne!(uid, 0, "USER {user} is root");
    let manifests = std::fs::read_to_string(Path::new(ROOT).join("deploy/kubernetes/deployment.yaml")).unwrap();
    assert!(
        manifests.contains(&format!("runAsUser: {uid}")),
        "deploy/kubernetes/deployment.yaml runs as another user than the image's {uid}"
    );
}

/// The HEALTHCHECK's command, as Docker runs it (exec form).
fn healthcheck() -> Vec<String> {
    let last = instructions().into_iter().filter(|(i, _)| i == "FROM").count() - 1;
    let args = stage(last)
        .into_iter()
        .find(|(i, _)| i == "HEALTHCHECK")
        .map(|(_, a)| a)
        .expect("the final stage has no HEALTHCHECK");
    let cmd = &args[args.find("CMD").expect("HEALTHCHECK without CMD") + 3..];
    serde_json::from_str(cmd.trim()).expect("HEALTHCHECK CMD in exec (JSON) form")
}

fn run_healthcheck(listen: &str) -> bool {
    let cmd = healthcheck();
    let status = Command::new(&cmd[0])
        .args(&cmd[1..])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("NUDGE_LISTEN", listen)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run the HEALTHCHECK command");
    status.success()
}

/// The image has no curl: the HEALTHCHECK asks /readyz over bash's /dev/tcp, on NUDGE_LISTEN's port. It passes
/// exactly when /readyz says 200.
#[tokio::test(flavor = "multi_thread")]
async fn the_healthcheck_passes_exactly_when_readyz_says_ready() {
    let db = TestDb::new().await;
    // Not ready: --no-migrate on an empty database waits for the schema.
    let waiting = Nudge::start_unready(&db.url, &[("NUDGE_NO_MIGRATE", "true")]).await;
    assert_eq!(waiting.get("/readyz").await.0, 503);
    let listen = format!("0.0.0.0:{}", waiting.port);
    assert!(!run_healthcheck(&listen), "HEALTHCHECK passed while /readyz says 503");

    let ready = Nudge::start(&db.url, &[]).await;
    assert!(run_healthcheck(&format!("0.0.0.0:{}", ready.port)), "HEALTHCHECK failed while /readyz says 200");
    assert!(!run_healthcheck(&format!("0.0.0.0:{}", free_port())), "HEALTHCHECK passed with nothing listening");
}

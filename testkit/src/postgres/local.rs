//! A throwaway Postgres cluster from the binaries installed on this machine.
//!
//! `initdb` into a temp dir, then `postgres` as a child of a dedicated keeper thread, with
//! `fsync=off`. Postgres refuses to run as root, so when the test process is root both run as
//! the `postgres` user (or `nobody`), in a directory chowned to it.
//!
//! **Who can connect.** The cluster trusts whoever reaches it (superuser `postgres`, no
//! password), so it must be reachable by the test process only: it listens on no TCP address
//! (`listen_addresses = ''`), only on a unix socket inside its own directory, which is mode
//! 0700 and owned by the user the server runs as (the test process's user, or the unprivileged
//! user a root test process starts it as; root passes the permission check). Any other local
//! user gets `permission denied` on the socket: tested in `tests/testkit_fixture.rs`.
//!
//! Nothing outlives the test process: on Linux the server gets `SIGQUIT` through
//! `PR_SET_PDEATHSIG` when the keeper thread (which lives as long as the process) goes away;
//! everywhere an exit hook stops it and removes its directory, and directories left by killed
//! runs are swept at the next start. Unix only (a socket directory, uids); the system calls go
//! through `nix`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Prefix of the temp dirs, for sweeping.
const DIR_PREFIX: &str = "postbox-pg-";

/// The port number that names the socket (`.s.PGSQL.5432`). No TCP port is opened, and the
/// socket lives in the cluster's own directory, so every cluster can use the same number.
const SOCKET_PORT: u16 = 5432;

/// A running local cluster.
#[derive(Debug)]
pub(crate) struct LocalCluster {
    pub(crate) pid: i32,
    pub(crate) port: u16,
    pub(crate) dir: PathBuf,
}

impl LocalCluster {
    /// The admin URL (superuser `postgres`, trust auth, database `postgres`).
    pub(crate) fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// The URL of `database`: the unix socket in the cluster's directory, as the `host`
    /// parameter (percent-encoded), which libpq, psql and sqlx all understand.
    pub(crate) fn url_of(&self, database: &str) -> String {
        let dir = self.dir.to_string_lossy();
        let mut host = String::with_capacity(dir.len() * 3);
        for b in dir.bytes() {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                host.push(char::from(b));
            } else {
                host.push_str(&format!("%{b:02X}"));
            }
        }
        format!(
            "postgres://postgres@localhost:{}/{database}?host={host}",
            self.port
        )
    }

    /// Stops the server at once and removes its directory. Best effort; used at exit.
    pub(crate) fn stop(&self) {
        signal(self.pid, Signal::SIGQUIT);
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(self.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Restarts `cluster` in place (same directory and port): a fast shutdown (SIGINT: clients
/// are disconnected, in-flight transactions roll back), then a new postmaster.
pub(crate) fn restart(cluster: &mut LocalCluster) -> Result<(), String> {
    signal(cluster.pid, Signal::SIGINT);
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(cluster.pid) {
        if Instant::now() > deadline {
            return Err(format!(
                "postgres (pid {}) did not stop within 30 s",
                cluster.pid
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let bin = find_bin_dir()?;
    let user = run_as()?;
    let data = cluster.dir.join("data");
    cluster.pid = spawn_server(&bin, &cluster.dir, &data, cluster.port, user)?;
    Ok(())
}

/// Starts a cluster, or says why it cannot.
pub(crate) fn start() -> Result<LocalCluster, String> {
    sweep();
    let bin = find_bin_dir()?;
    let user = run_as()?;
    let dir = std::env::temp_dir().join(format!(
        "{DIR_PREFIX}{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let data = dir.join("data");
    if let Some((uid, gid)) = user {
        chown(&dir, uid, gid)?;
    }
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot chmod {}: {e}", dir.display()))?;

    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ])
        .current_dir(&dir)
        .stdin(Stdio::null());
    as_user(&mut initdb, user);
    let out = initdb
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.join("initdb").display()))?;
    if !out.status.success() {
        let _ = fs::remove_dir_all(&dir);
        return Err(format!(
            "initdb failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }

    match spawn_server(&bin, &dir, &data, SOCKET_PORT, user) {
        Ok(pid) => Ok(LocalCluster {
            pid,
            port: SOCKET_PORT,
            dir,
        }),
        Err(e) => {
            let _ = fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

fn spawn_server(
    bin: &Path,
    dir: &Path,
    data: &Path,
    port: u16,
    user: Option<(u32, u32)>,
) -> Result<i32, String> {
    let log = fs::File::create(dir.join("postgres.log"))
        .map_err(|e| format!("cannot create the server log: {e}"))?;
    let mut cmd = Command::new(bin.join("postgres"));
    cmd.arg("-D")
        .arg(data)
        .arg("-p")
        .arg(port.to_string())
        .arg("-k")
        .arg(dir)
        .args([
            "-c",
            "listen_addresses=",
            "-c",
            "unix_socket_permissions=0700",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=300",
            "-c",
            "shared_buffers=64MB",
        ])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    as_user(&mut cmd, user);
    die_with_parent(&mut cmd);
    // The keeper thread owns the child for the life of the process: PR_SET_PDEATHSIG fires
    // when the *thread* that forked the child ends, so it must not be a short-lived test thread.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("postbox-pg-keeper".into())
        .spawn(move || match cmd.spawn() {
            Ok(mut child) => {
                let _ = tx.send(Ok(child.id()));
                let _ = child.wait();
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        })
        .map_err(|e| format!("cannot spawn the keeper thread: {e}"))?;
    let pid = rx
        .recv()
        .map_err(|_| "the keeper thread died".to_owned())?
        .map_err(|e| format!("cannot start {}: {e}", bin.join("postgres").display()))?;
    let pid = i32::try_from(pid).map_err(|_| "pid out of range".to_owned())?;

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if fs::read_to_string(data.join("postmaster.pid"))
            .map(|s| s.lines().nth(7).map(str::trim) == Some("ready"))
            .unwrap_or(false)
        {
            return Ok(pid);
        }
        if !alive(pid) || Instant::now() > deadline {
            signal(pid, Signal::SIGQUIT);
            let log = fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            return Err(format!(
                "postgres did not become ready on its socket (port {port}): {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Linux: the server gets SIGQUIT (immediate shutdown) when the thread that started it ends,
/// even if the test process is killed and its exit hook never runs.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and makes one
    // async-signal-safe call (prctl), after the uid change that would otherwise clear it.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGQUIT).map_err(std::io::Error::from)
        });
    }
}

/// Elsewhere no such signal exists: the exit hook stops the server, and the next run's
/// [`sweep`] stops what a killed process left.
#[cfg(not(target_os = "linux"))]
fn die_with_parent(_: &mut Command) {}

/// Sends `sig` to `pid`, best effort (it may have exited already).
fn signal(pid: i32, sig: Signal) {
    let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
}

/// Whether `pid` exists (a zombie counts until its parent reaps it).
fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok()
}

/// The directory holding `initdb` and `postgres`: on PATH, else the newest
/// `/usr/lib/postgresql/<version>/bin`.
fn find_bin_dir() -> Result<PathBuf, String> {
    let has_both = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(path) = std::env::var_os("PATH")
        && let Some(d) = std::env::split_paths(&path).find(|d| has_both(d))
    {
        return Ok(d);
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| has_both(d))
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d).ok_or_else(|| {
        "no initdb and postgres binaries on PATH or under /usr/lib/postgresql/*/bin".to_owned()
    })
}

/// `None` when not root; otherwise the unprivileged (uid, gid) to run as.
fn run_as() -> Result<Option<(u32, u32)>, String> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| format!("cannot look up user {name}: {e}"))?;
        if let Some(user) = user.filter(|u| !u.uid.is_root()) {
            return Ok(Some((user.uid.as_raw(), user.gid.as_raw())));
        }
    }
    Err("running as root and no unprivileged user (postgres or nobody) to run Postgres as".into())
}

fn as_user(cmd: &mut Command, user: Option<(u32, u32)>) {
    if let Some((uid, gid)) = user {
        cmd.uid(uid)
            .gid(gid)
            .env("HOME", "/tmp")
            .env_remove("PGDATA");
    }
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), String> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| format!("cannot chown {}: {e}", path.display()))
}

/// Removes directories of earlier runs whose test process is gone, stopping their server if
/// it still runs.
fn sweep() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(DIR_PREFIX) {
            continue;
        }
        let dir = entry.path();
        // The name is `postbox-pg-<owner pid>-<random>`.
        let owner = name[DIR_PREFIX.len()..]
            .split('-')
            .next()
            .and_then(|p| p.parse::<i32>().ok());
        if owner.is_some_and(alive) {
            continue;
        }
        if let Some(pid) = fs::read_to_string(dir.join("data/postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
            && alive(pid)
        {
            signal(pid, Signal::SIGQUIT);
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

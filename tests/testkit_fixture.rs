//! `testkit::postgres()`: isolation and cleanup of fixture databases.

mod support;

use anyhow::Result;
use postbox::prelude::*;
use postbox::sqlx::{self, PgPool};
use postbox::{FetchParams, Message};

async fn database_exists(pool: &PgPool, name: &str) -> Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(pool)
            .await?,
    )
}

#[tokio::test]
async fn two_fixtures_created_in_parallel_are_isolated() -> Result<()> {
    let (a, b) = tokio::try_join!(postbox::testkit::postgres(), postbox::testkit::postgres())?;
    assert_ne!(a.database(), b.database());
    assert!(a.database().starts_with("postbox_test_") && a.database().len() <= 63);

    let mut tx = a.backend().begin().await?;
    a.backend()
        .publish(&mut tx, Message::new("q", "only in a"))
        .await?;
    a.backend().commit(tx).await?;

    assert_eq!(
        a.backend().fetch(&FetchParams::new(["q"], 10)).await?.len(),
        1
    );
    assert!(
        b.backend()
            .fetch(&FetchParams::new(["q"], 10))
            .await?
            .is_empty()
    );
    // Both start from the migrated template.
    a.backend().validate_schema().await?;
    b.backend().validate_schema().await?;
    a.close().await?;
    b.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_dropped_or_closed_fixture_takes_its_database_with_it() -> Result<()> {
    let observer = postbox::testkit::postgres().await?;
    let dropped = postbox::testkit::postgres().await?;
    let closed = postbox::testkit::postgres().await?;
    let (dropped_name, closed_name) = (dropped.database().to_owned(), closed.database().to_owned());
    assert!(database_exists(observer.pool(), &dropped_name).await?);

    // A connection still checked out must not keep the database alive.
    let held = dropped.pool().acquire().await?;
    drop(dropped);
    drop(held);
    assert!(
        !database_exists(observer.pool(), &dropped_name).await?,
        "dropped"
    );

    let listener = sqlx::postgres::PgListener::connect_with(closed.pool()).await?;
    closed.close().await?;
    drop(listener);
    assert!(
        !database_exists(observer.pool(), &closed_name).await?,
        "closed"
    );
    observer.close().await?;
    Ok(())
}

#[tokio::test]
async fn the_fixture_url_reaches_the_same_database() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    let pool = PgPool::connect(db.url()).await?;
    let name: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&pool)
        .await?;
    assert_eq!(name, db.database());
    assert!(!format!("{db:?}").contains("password"));
    pool.close().await;
    db.close().await?;
    Ok(())
}

/// Under the Docker provider (CI runs the suite once with `POSTBOX_TEST_PG=docker`), the
/// container publishes Postgres on 127.0.0.1 only. Other providers have no container to check.
#[tokio::test]
async fn a_docker_fixture_listens_on_loopback_only() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    if db.provider() != postbox::testkit::Provider::Docker {
        db.close().await?;
        return Ok(());
    }
    assert!(db.url().contains("@127.0.0.1:"), "{}", db.url());
    let out = std::process::Command::new("docker")
        .args([
            "ps",
            "--filter",
            &format!("label=postbox.testkit.pid={}", std::process::id()),
            "--format",
            "{{.Ports}}",
        ])
        .output()?;
    let ports = String::from_utf8(out.stdout)?;
    assert!(ports.contains("127.0.0.1:"), "published ports: {ports:?}");
    assert!(
        !ports.contains("0.0.0.0") && !ports.contains(":::"),
        "published ports: {ports:?}"
    );
    db.close().await?;
    Ok(())
}

/// The socket directory named by a local fixture's URL (`?host=<percent-encoded dir>`).
fn socket_dir(url: &str) -> Option<std::path::PathBuf> {
    let encoded = url.split_once("?host=")?.1.split('&').next()?;
    let mut bytes = Vec::new();
    let mut rest = encoded.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' && tail.len() >= 2 {
            let hex = std::str::from_utf8(&tail[..2]).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    Some(std::path::PathBuf::from(String::from_utf8(bytes).ok()?))
}

/// A local user other than root and `owner`, to play the neighbour on a shared machine.
fn another_local_user(owner: u32) -> Option<(String, u32, u32)> {
    ["nobody", "daemon", "postgres", "bin"]
        .iter()
        .find_map(|name| {
            let c = std::ffi::CString::new(*name).ok()?;
            // SAFETY: getpwnam returns NULL or static storage, copied out at once (one thread
            // of this test calls it).
            let pw = unsafe { libc::getpwnam(c.as_ptr()) };
            if pw.is_null() {
                return None;
            }
            // SAFETY: checked non-null above.
            let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
            (uid != 0 && uid != owner).then(|| ((*name).to_owned(), uid, gid))
        })
}

/// `psql`: on PATH, or beside the newest `/usr/lib/postgresql/<version>/bin/postgres`.
fn psql() -> Option<std::path::PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("psql"))
            .find(|f| f.is_file())
    });
    on_path.or_else(|| {
        let mut bins: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .flatten()
            .map(|e| e.path().join("bin/psql"))
            .filter(|f| f.is_file())
            .collect();
        bins.sort();
        bins.pop()
    })
}

/// Under the local provider, the cluster trusts whoever reaches it, so nobody else may reach
/// it: no TCP address, and a socket in a directory only the server's user can enter. As root,
/// another local user really tries (`psql` with the fixture's own URL) and is refused.
#[tokio::test]
async fn another_local_user_cannot_connect_to_the_local_cluster() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;

    let db = postbox::testkit::postgres().await?;
    if db.provider() != postbox::testkit::Provider::Local {
        db.close().await?;
        return Ok(());
    }
    let listen: String = sqlx::query_scalar("SHOW listen_addresses")
        .fetch_one(db.pool())
        .await?;
    assert_eq!(listen, "", "the local cluster must open no TCP address");
    let dir = socket_dir(db.url()).unwrap_or_else(|| panic!("no socket dir in {}", db.url()));
    let meta = std::fs::metadata(&dir)?;
    assert_eq!(
        meta.mode() & 0o777,
        0o700,
        "socket directory {} must be private",
        dir.display()
    );

    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0
        && let (Some(psql), Some((name, uid, gid))) = (psql(), another_local_user(meta.uid()))
    {
        let out = std::process::Command::new(&psql)
            .args([db.url(), "-Atc", "SELECT 1"])
            .uid(uid)
            .gid(gid)
            .env("HOME", "/tmp")
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "user {name} connected to the local cluster: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            stderr.contains("Permission denied"),
            "user {name} failed for another reason: {stderr}"
        );
        // The same command as ourselves works: the refusal is about who asks.
        let ours = std::process::Command::new(&psql)
            .args([db.url(), "-Atc", "SELECT 1"])
            .output()?;
        assert!(
            ours.status.success(),
            "{}",
            String::from_utf8_lossy(&ours.stderr)
        );
    }
    db.close().await?;
    Ok(())
}

/// Under the Docker provider, the container's superuser has a random password: the URL's
/// works, another does not (no trust authentication over TCP).
#[tokio::test]
async fn a_docker_fixture_needs_its_random_password() -> Result<()> {
    let db = postbox::testkit::postgres().await?;
    if db.provider() != postbox::testkit::Provider::Docker {
        db.close().await?;
        return Ok(());
    }
    let url = db.url();
    let password = url
        .split_once("://postgres:")
        .and_then(|(_, rest)| rest.split_once('@'))
        .map(|(p, _)| p.to_owned())
        .unwrap_or_default();
    assert_eq!(password.len(), 32, "a random password in {url}");
    let wrong = url.replacen(&format!(":{password}@"), ":postgres@", 1);
    let err = PgPool::connect(&wrong)
        .await
        .expect_err("a wrong password must be refused");
    assert!(err.to_string().contains("password"), "{err}");
    db.close().await?;
    Ok(())
}

/// Run in a child process by `a_killed_test_process_takes_its_local_cluster_with_it`: starts a
/// private cluster, prints its URL, and waits to be killed.
#[test]
#[ignore = "helper: runs in the child process of a_killed_test_process_takes_its_local_cluster_with_it"]
fn helper_start_a_cluster_and_wait_to_be_killed() {
    if std::env::var_os("POSTBOX_KILL_HELPER").is_none() {
        return;
    }
    let server = postbox::testkit::LocalServer::start().expect("a local cluster");
    println!("CLUSTER_URL={}", server.url("postgres"));
    loop {
        std::thread::park();
    }
}

/// Whether `pid` is a running process (a zombie waiting to be reaped is not).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// A test process killed with SIGKILL runs no exit hook; on Linux the server still goes,
/// through its parent-death signal.
#[cfg(target_os = "linux")]
#[test]
fn a_killed_test_process_takes_its_local_cluster_with_it() -> Result<()> {
    use std::io::BufRead;

    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "helper_start_a_cluster_and_wait_to_be_killed",
            "--ignored",
            "--nocapture",
        ])
        .env("POSTBOX_KILL_HELPER", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    let url = std::io::BufReader::new(stdout)
        .lines()
        .map_while(std::io::Result::ok)
        .find_map(|line| line.strip_prefix("CLUSTER_URL=").map(str::to_owned))
        .expect("the child prints its cluster's URL");
    let dir = socket_dir(&url).expect("a socket directory in the URL");
    let pid: i32 = std::fs::read_to_string(dir.join("data/postmaster.pid"))?
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("postmaster.pid names the server");
    assert!(running(pid), "the server runs while its test process lives");

    child.kill()?; // SIGKILL: no exit hook, no unwinding
    child.wait()?;
    let deadline = std::time::Instant::now() + postbox::testkit::deadline();
    while running(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "waiting for postgres (pid {pid}) to exit after its test process was killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The directory stays until the next run's sweep; remove it now.
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

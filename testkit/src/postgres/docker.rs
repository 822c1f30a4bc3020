//! A Postgres container started with testcontainers.
//!
//! The container lives on a dedicated thread with its own runtime for the whole test process
//! (a container must not depend on any one test's runtime); an exit hook removes it.
//!
//! Readiness: the official image prints "ready to accept connections" twice (its init phase
//! runs a temporary server on a unix socket only), a pre-initialised image once. The wait
//! condition accepts the first line and the testkit then connects over TCP until a query
//! succeeds, which works for both. The port is published on 127.0.0.1 only, and the
//! superuser's password is random, made for this test process (`POSTGRES_PASSWORD`, which both
//! the official image and the locally built one apply; neither trusts TCP connections).
//!
//! Offline (no registry), build an image from the machine's own Postgres binaries with
//! `testkit/docker/build-local-image.sh` and set `POSTBOX_TEST_PG_IMAGE=postbox/postgres-local:15`.

use std::time::{Duration, Instant};

use sqlx::Connection;
use testcontainers_modules::testcontainers::bollard::models::{HostConfig, PortBinding};
use testcontainers_modules::testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers_modules::testcontainers::runners::AsyncRunner;
use testcontainers_modules::testcontainers::{GenericImage, ImageExt};

use super::provider::docker_answers;

/// A running container.
#[derive(Debug)]
pub(crate) struct DockerServer {
    pub(crate) url: String,
    pub(crate) id: String,
}

impl DockerServer {
    /// Removes the container. Best effort; used at exit.
    pub(crate) fn stop(&self) {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", "-v", &self.id])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Starts `image` (name, tag) and waits until it accepts queries.
pub(crate) fn start(image: &(String, String)) -> Result<DockerServer, String> {
    docker_answers()?;
    let (name, tag) = image.clone();
    // 128 random bits, hex: nothing to escape in a URL or in SQL.
    let password = uuid::Uuid::new_v4().simple().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("postbox-pg-docker".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(format!("cannot build a runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(async move {
                let request = GenericImage::new(name.as_str(), tag.as_str())
                    .with_exposed_port(5432.tcp())
                    .with_wait_for(WaitFor::message_on_stderr(
                        "database system is ready to accept connections",
                    ))
                    .with_env_var("POSTGRES_PASSWORD", password.as_str())
                    .with_label("postbox.testkit.pid", std::process::id().to_string())
                    .with_host_config_modifier(loopback_only)
                    .with_startup_timeout(Duration::from_secs(120));
                let container = match request.start().await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(format!("cannot start {name}:{tag}: {e}")));
                        return;
                    }
                };
                let port = match container.get_host_port_ipv4(5432).await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(format!("container has no mapped port: {e}")));
                        return;
                    }
                };
                let url = format!("postgres://postgres:{password}@127.0.0.1:{port}/postgres");
                let ready = wait_for_queries(&url).await;
                let _ = tx.send(ready.map(|()| DockerServer {
                    url,
                    id: container.id().to_owned(),
                }));
                // Keep the container (and this runtime) for the life of the process.
                std::future::pending::<()>().await;
            });
        })
        .map_err(|e| format!("cannot spawn the docker thread: {e}"))?;
    rx.recv().map_err(|_| "the docker thread died".to_owned())?
}

/// Publishes 5432 on 127.0.0.1 only (a random port), never on every interface.
fn loopback_only(host: &mut HostConfig) {
    host.publish_all_ports = Some(false);
    host.port_bindings = Some(
        [(
            "5432/tcp".to_owned(),
            Some(vec![PortBinding {
                host_ip: Some("127.0.0.1".to_owned()),
                host_port: Some(String::new()),
            }]),
        )]
        .into(),
    );
}

async fn wait_for_queries(url: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = async {
            let mut conn = sqlx::PgConnection::connect(url).await?;
            sqlx::query("SELECT 1").execute(&mut conn).await?;
            conn.close().await
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(format!("container never accepted queries: {e}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

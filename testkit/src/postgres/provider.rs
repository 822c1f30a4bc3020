//! Choosing where the test server comes from.
//!
//! Unless `POSTBOX_TEST_PG` forces one, providers are tried in this order: an existing server
//! (`POSTBOX_TEST_DATABASE_URL`, then `DATABASE_URL`), a testcontainers Postgres when a Docker
//! engine answers (with the `docker` feature), and a throwaway cluster from the local Postgres
//! binaries.

use std::fmt;
#[cfg(feature = "docker")]
use std::io::{Read, Write};
#[cfg(feature = "docker")]
use std::time::Duration;

use crate::error::TestkitError;

/// Where a test server comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// An existing server, from `POSTBOX_TEST_DATABASE_URL` or `DATABASE_URL`.
    Url,
    /// A container started with testcontainers.
    Docker,
    /// A cluster made with the local `initdb` and `postgres` binaries.
    Local,
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Provider::Url => "url",
            Provider::Docker => "docker",
            Provider::Local => "local",
        })
    }
}

/// The default Docker image, `postgres:17-alpine`.
pub const DEFAULT_IMAGE: &str = "postgres:17-alpine";

/// The provider settings read from the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Config {
    /// `POSTBOX_TEST_PG`.
    pub(crate) forced: Option<Provider>,
    /// `POSTBOX_TEST_DATABASE_URL`, else `DATABASE_URL`.
    pub(crate) url: Option<String>,
    /// `POSTBOX_TEST_PG_IMAGE` as (name, tag).
    pub(crate) image: (String, String),
}

impl Config {
    /// Reads the settings through `var` (the environment, in production).
    pub(crate) fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, TestkitError> {
        let non_empty = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        let forced = match non_empty("POSTBOX_TEST_PG").as_deref().map(str::trim) {
            None => None,
            Some("url") => Some(Provider::Url),
            Some("docker") => Some(Provider::Docker),
            Some("local") => Some(Provider::Local),
            Some(other) => return Err(TestkitError::UnknownProvider(other.to_owned())),
        };
        let image = non_empty("POSTBOX_TEST_PG_IMAGE").unwrap_or_else(|| DEFAULT_IMAGE.into());
        let image = match image.rsplit_once(':') {
            Some((name, tag)) if !tag.contains('/') => (name.to_owned(), tag.to_owned()),
            _ => (image, "latest".to_owned()),
        };
        Ok(Config {
            forced,
            url: non_empty("POSTBOX_TEST_DATABASE_URL").or_else(|| non_empty("DATABASE_URL")),
            image,
        })
    }

    /// The providers to try, in order.
    pub(crate) fn candidates(&self) -> Vec<Provider> {
        match self.forced {
            Some(p) => vec![p],
            None if self.url.is_some() => vec![Provider::Url],
            None if cfg!(feature = "docker") => vec![Provider::Docker, Provider::Local],
            None => vec![Provider::Local],
        }
    }

    pub(crate) fn image_ref(&self) -> String {
        format!("{}:{}", self.image.0, self.image.1)
    }
}

/// Whether a Docker engine answers `GET /_ping` at `DOCKER_HOST` or the default socket.
#[cfg(feature = "docker")]
pub(crate) fn docker_answers() -> Result<(), String> {
    let host = std::env::var("DOCKER_HOST").unwrap_or_default();
    let timeout = Duration::from_secs(2);
    let request = b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n";
    let mut response = Vec::new();
    let result = if let Some(addr) = host.strip_prefix("tcp://") {
        let addr = addr.trim_end_matches('/');
        std::net::TcpStream::connect(addr).and_then(|mut s| {
            s.set_read_timeout(Some(timeout))?;
            s.write_all(request)?;
            s.read_to_end(&mut response)
        })
    } else {
        unix_ping(&host, timeout, request, &mut response)
    };
    match result {
        Ok(_) if response.starts_with(b"HTTP/1.0 200") || response.starts_with(b"HTTP/1.1 200") => {
            Ok(())
        }
        Ok(_) => Err("the Docker engine did not answer its ping with 200".into()),
        Err(e) => Err(format!(
            "no Docker engine answers at {}: {e}",
            if host.is_empty() {
                "/var/run/docker.sock"
            } else {
                &host
            }
        )),
    }
}

#[cfg(all(feature = "docker", unix))]
fn unix_ping(
    host: &str,
    timeout: Duration,
    request: &[u8],
    response: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let path = host
        .strip_prefix("unix://")
        .filter(|p| !p.is_empty())
        .unwrap_or("/var/run/docker.sock");
    std::os::unix::net::UnixStream::connect(path).and_then(|mut s| {
        s.set_read_timeout(Some(timeout))?;
        s.write_all(request)?;
        s.read_to_end(response)
    })
}

#[cfg(all(feature = "docker", not(unix)))]
fn unix_ping(_: &str, _: Duration, _: &[u8], _: &mut Vec<u8>) -> std::io::Result<usize> {
    Err(std::io::Error::other(
        "set DOCKER_HOST=tcp://host:port: only TCP engines are reached on this platform",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, TestkitError> {
        Config::from_vars(|k| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn order_without_settings_is_docker_then_local() {
        let c = config(&[]).expect("valid");
        if cfg!(feature = "docker") {
            assert_eq!(c.candidates(), [Provider::Docker, Provider::Local]);
        } else {
            assert_eq!(c.candidates(), [Provider::Local]);
        }
        assert_eq!(c.image_ref(), DEFAULT_IMAGE);
    }

    #[test]
    fn a_url_wins_and_the_postbox_variable_beats_database_url() {
        let c = config(&[
            ("DATABASE_URL", "postgres://a"),
            ("POSTBOX_TEST_DATABASE_URL", "postgres://b"),
        ])
        .expect("valid");
        assert_eq!(c.candidates(), [Provider::Url]);
        assert_eq!(c.url.as_deref(), Some("postgres://b"));
    }

    #[test]
    fn forcing_selects_exactly_one() {
        let c = config(&[
            ("POSTBOX_TEST_PG", "local"),
            ("DATABASE_URL", "postgres://a"),
        ])
        .expect("valid");
        assert_eq!(c.candidates(), [Provider::Local]);
        let err = config(&[("POSTBOX_TEST_PG", "podman")]).expect_err("unknown");
        assert!(err.to_string().contains("url, docker or local"), "{err}");
    }

    #[test]
    fn image_override_splits_name_and_tag() {
        let c = config(&[("POSTBOX_TEST_PG_IMAGE", "postbox/postgres-local:15")]).expect("valid");
        assert_eq!(c.image, ("postbox/postgres-local".into(), "15".into()));
        let c = config(&[("POSTBOX_TEST_PG_IMAGE", "localhost:5000/pg")]).expect("valid");
        assert_eq!(c.image, ("localhost:5000/pg".into(), "latest".into()));
    }
}

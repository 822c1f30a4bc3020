//! The process's termination signals, as a future to shut subscribers down on.

use std::future::Future;
use std::io;

/// A future that resolves when the process is asked to terminate: `SIGTERM` (what
/// Kubernetes, systemd and `docker stop` send) or `SIGINT` (Ctrl-C) on Unix, Ctrl-C
/// elsewhere. Pass it to [`SubscriberHandle::shutdown_on`](crate::runtime::SubscriberHandle::shutdown_on).
///
/// The signal handlers are installed when this is called, not when the future is first
/// polled, so a signal arriving in between is not missed. From then on these signals no
/// longer end the process by themselves (tokio's handlers stay installed for its lifetime):
/// the program decides when to exit.
///
/// ```no_run
/// # async fn run(backend: postbox_core::PgBackend) -> Result<(), Box<dyn std::error::Error>> {
/// use postbox_core::{Delivery, HandlerError, Subscriber, SubscriberOptions};
///
/// let handle = Subscriber::new(backend, SubscriberOptions::new(["emails"]), |_: Delivery| async {
///     Ok::<(), HandlerError>(())
/// })?
/// .spawn();
/// let report = handle.shutdown_on(postbox_core::runtime::shutdown_signal()?).await?;
/// println!("stopped: {report:?}");
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// The I/O error of installing a handler (on Unix, when the signal driver cannot be set up).
///
/// # Panics
///
/// Outside a tokio runtime.
pub fn shutdown_signal() -> io::Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        Ok(async move {
            let name = tokio::select! {
                _ = terminate.recv() => "SIGTERM",
                _ = interrupt.recv() => "SIGINT",
            };
            tracing::info!(target: "postbox", signal = name, "postbox: termination signal received");
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            match tokio::signal::ctrl_c().await {
                Ok(()) => tracing::info!(target: "postbox", "postbox: Ctrl-C received"),
                // Without a handler there is no signal to wait for: never resolve rather than
                // shut down at once.
                Err(error) => {
                    tracing::warn!(target: "postbox", %error, "postbox: cannot listen for Ctrl-C");
                    std::future::pending::<()>().await;
                }
            }
        })
    }
}

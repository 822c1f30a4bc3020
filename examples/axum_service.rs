//! A small axum service on postbox: an HTTP handler that publishes in the request's
//! transaction, a worker that consumes, and one shutdown for both on SIGTERM.
//!
//! Run with: `cargo run --example axum_service` (places two orders over HTTP, waits for their
//! receipts, and stops), or `cargo run --example axum_service -- --serve` (serves on
//! 127.0.0.1:3000 until SIGTERM or Ctrl-C; try
//! `curl -i -H 'content-type: application/json' -d '{"id":1,"email":"ada@example.com","total_cents":990}' localhost:3000/orders`).
//! Tests: `cargo test --example axum_service`, written with `#[postbox::test]`; `cargo test
//! --workspace` runs them too. Needs no database set-up (the testkit's default server, like
//! `quickstart`).
//!
//! - `POST /orders` inserts the order and publishes its receipt message in **one**
//!   transaction: both commit, or neither (a duplicate order id answers 409 and publishes
//!   nothing).
//! - A [`Subscriber`] sends receipts through a mailer that deduplicates by message id, so a
//!   redelivery (at-least-once) never sends an e-mail twice.
//! - SIGTERM stops the HTTP server (in-flight requests finish) and the worker (running
//!   handlers finish, unstarted messages go back to the outbox).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Json, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use parking_lot::Mutex;
use postbox::sqlx::{self, PgPool};
use postbox::{
    Backend, Delivery, Handler, HandlerError, Message, MessageId, PgBackend, Subscriber,
    SubscriberOptions, Topics,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// The service's own schema.
const SCHEMA: &str = "CREATE TABLE orders (
    id bigint PRIMARY KEY,
    email text NOT NULL,
    total_cents bigint NOT NULL CHECK (total_cents >= 0)
)";

/// Creates the service's tables (the outbox table is `PgBackend::migrate`'s).
async fn schema(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(SCHEMA).execute(pool).await.map(drop)
}

/// The body of `POST /orders`.
#[derive(Debug, Clone, Deserialize, Serialize)]
struct NewOrder {
    id: i64,
    email: String,
    total_cents: i64,
}

/// The message a placed order publishes.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
struct Receipt {
    order: i64,
    to: String,
    total_cents: i64,
}

/// What the HTTP handlers share.
#[derive(Clone)]
struct App {
    pool: PgPool,
    outbox: PgBackend,
}

/// `POST /orders`: the order and its receipt commit together.
async fn place_order(
    State(app): State<App>,
    Json(order): Json<NewOrder>,
) -> Result<(StatusCode, Json<serde_json::Value>), AppError> {
    let mut tx = app.pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO orders (id, email, total_cents) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind(order.id)
    .bind(&order.email)
    .bind(order.total_cents)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Err(AppError::Duplicate(order.id)); // `tx` drops: rolled back
    }
    let receipt = Receipt {
        order: order.id,
        to: order.email,
        total_cents: order.total_cents,
    };
    let message = app
        .outbox
        .publish(&mut tx, Message::json("emails", &receipt)?)
        .await?;
    tx.commit().await?; // the order and its message become visible together
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "order": order.id, "message": message })),
    ))
}

/// Why a request failed, as an HTTP answer.
#[derive(Debug)]
enum AppError {
    Duplicate(i64),
    Internal(String),
}

impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> Self {
        AppError::Internal(e.to_string())
    }
}

impl From<postbox::Error> for AppError {
    fn from(e: postbox::Error) -> Self {
        AppError::Internal(e.to_string())
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        match self {
            AppError::Duplicate(id) => {
                (StatusCode::CONFLICT, format!("order {id} exists")).into_response()
            }
            AppError::Internal(why) => {
                tracing::error!(%why, "request failed");
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        }
    }
}

fn router(app: App) -> Router {
    Router::new()
        .route("/orders", post(place_order))
        .with_state(app)
}

/// Sends e-mails; remembers what it sent, keyed by message id, so a redelivered message is
/// not sent twice (in production: a unique key at the mail provider, or a sent table).
#[derive(Debug, Clone, Default)]
struct Mailer {
    sent: Arc<Mutex<HashMap<MessageId, Receipt>>>,
}

impl Mailer {
    fn send_once(&self, id: MessageId, receipt: Receipt) -> bool {
        let mut sent = self.sent.lock();
        if sent.contains_key(&id) {
            return false;
        }
        println!(
            "sending receipt for order {} to {} ({} cents)",
            receipt.order, receipt.to, receipt.total_cents
        );
        sent.insert(id, receipt);
        true
    }

    fn sent(&self) -> Vec<Receipt> {
        let mut sent: Vec<Receipt> = self.sent.lock().values().cloned().collect();
        sent.sort_by_key(|r| r.order);
        sent
    }
}

/// The worker's handler: a receipt that does not decode is rejected (dead-lettered), any
/// other is sent at most once.
fn send_receipts(mailer: Mailer) -> impl Handler {
    move |delivery: Delivery| {
        let mailer = mailer.clone();
        async move {
            let receipt: Receipt = delivery.json().map_err(HandlerError::reject)?;
            mailer.send_once(delivery.id, receipt);
            Ok(())
        }
    }
}

/// The worker: polls at least every 100 ms, so that it also runs on the fake.
fn worker<B: Backend + Topics + Clone>(
    outbox: B,
    mailer: Mailer,
) -> postbox::Result<Subscriber<B>> {
    let options = SubscriberOptions::new(["emails"])
        .max_workers(8)
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(100));
    Subscriber::new(outbox, options, send_receipts(mailer))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "postbox=info".into()),
        )
        .init();
    let serve = std::env::args().any(|a| a == "--serve");

    let db = postbox::testkit::postgres().await?;
    schema(db.pool()).await?;
    let outbox = db.backend();
    let mailer = Mailer::default();
    let worker = worker(outbox.clone(), mailer.clone())?.spawn();

    // One token stops both: SIGTERM / Ctrl-C with --serve, the end of the demo otherwise.
    let stop = CancellationToken::new();
    let addr: SocketAddr = if serve {
        "127.0.0.1:3000"
    } else {
        "127.0.0.1:0"
    }
    .parse()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let app = router(App {
        pool: db.pool().clone(),
        outbox,
    });
    let server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .into_future(),
    );
    println!("listening on http://{addr}");

    if serve {
        let signal = postbox::runtime::shutdown_signal()?;
        let stopper = stop.clone();
        tokio::spawn(async move {
            signal.await;
            stopper.cancel();
        });
    } else {
        for (id, email) in [(1, "ada@example.com"), (2, "grace@example.com")] {
            let body = serde_json::json!({"id": id, "email": email, "total_cents": 990 * id});
            println!(
                "POST /orders {body} -> {}",
                post_json(addr, "/orders", &body).await?
            );
        }
        let again = serde_json::json!({"id": 1, "email": "ada@example.com", "total_cents": 1});
        println!(
            "POST /orders {again} -> {}",
            post_json(addr, "/orders", &again).await?
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while mailer.sent().len() < 2 {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "waited 30 s for two receipts; sent: {:?}",
                mailer.sent()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
    }

    let report = worker.shutdown_on(stop.cancelled_owned()).await?;
    server.await??;
    println!(
        "stopped: {} receipt(s) sent, {} handler(s) abandoned at shutdown",
        mailer.sent().len(),
        report.abandoned
    );
    db.close().await?;
    Ok(())
}

/// A minimal HTTP/1.1 client for the demo: posts `body`, returns the status line.
async fn post_json(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let body = body.to_string();
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response.lines().next().unwrap_or_default().to_owned())
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use postbox::Inspect;
    use postbox::testkit::adversary::{Adversary, World};
    use postbox::testkit::{
        Expect, TestBackend, TestContext, assert_not_published, assert_published_as, until_within,
    };
    use tower::ServiceExt;

    use super::*;

    async fn post(app: Router, order: &NewOrder) -> StatusCode {
        let request = Request::post("/orders")
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(order).expect("json")))
            .expect("request");
        app.oneshot(request).await.expect("infallible").status()
    }

    fn order(id: i64) -> NewOrder {
        NewOrder {
            id,
            email: format!("customer{id}@example.com"),
            total_cents: 100 * id,
        }
    }

    /// The HTTP side needs SQL: Postgres only, with the service's schema.
    #[postbox::test(postgres, setup = schema)]
    async fn an_order_and_its_receipt_commit_together(ctx: TestContext<PgBackend>) {
        let pool = ctx.pool().expect("postgres").clone();
        let app = router(App {
            pool: pool.clone(),
            outbox: ctx.backend().clone(),
        });
        assert_eq!(post(app.clone(), &order(7)).await, StatusCode::CREATED);
        let receipt: Receipt = assert_published_as(ctx.backend(), Expect::queue("emails")).await;
        assert_eq!(
            receipt,
            Receipt {
                order: 7,
                to: "customer7@example.com".into(),
                total_cents: 700
            }
        );

        // A duplicate order is refused and publishes nothing more.
        assert_eq!(post(app, &order(7)).await, StatusCode::CONFLICT);
        let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
            .fetch_one(&pool)
            .await
            .expect("count");
        assert_eq!(orders, 1);
        assert_eq!(
            ctx.backend()
                .messages(Some("emails"))
                .await
                .expect("messages")
                .len(),
            1
        );
    }

    /// The worker is generic over the backend: the same test on the fake and on Postgres.
    #[postbox::test]
    async fn the_worker_sends_each_receipt_once_and_acks(outbox: impl TestBackend) {
        let mailer = Mailer::default();
        let mut tx = outbox.begin().await.expect("begin");
        for id in [1, 2, 3] {
            let receipt = Receipt {
                order: id,
                to: format!("c{id}@example.com"),
                total_cents: id,
            };
            let message = Message::json("emails", &receipt).expect("json");
            outbox.publish(&mut tx, message).await.expect("publish");
        }
        outbox.commit(tx).await.expect("commit");

        let handle = worker(outbox.clone(), mailer.clone())
            .expect("options")
            .spawn();
        until_within("three receipts sent", Duration::from_secs(60), || {
            mailer.sent().len() == 3
        })
        .await;
        let report = handle.shutdown().await.expect("shutdown");
        assert_eq!(report.abandoned, 0);
        assert_eq!(
            mailer.sent().iter().map(|r| r.order).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_not_published(&outbox, Expect::queue("emails")).await;
    }

    /// The receipt handler survives what at-least-once delivery does to it.
    #[test]
    fn the_receipt_handler_is_idempotent() {
        let receipts = (1..=3)
            .map(|id| {
                let receipt = Receipt {
                    order: id,
                    to: format!("c{id}@example.com"),
                    total_cents: id,
                };
                Message::json("emails", &receipt).expect("json")
            })
            .collect();
        Adversary::new(receipts).cases(32).assert(|| async {
            let mailer = Mailer::default();
            let observed = mailer.clone();
            World::new(
                postbox::fake::FakeBroker::new(),
                send_receipts(mailer),
                move || {
                    let mailer = observed.clone();
                    async move { mailer.sent() }
                },
            )
        });
    }
}

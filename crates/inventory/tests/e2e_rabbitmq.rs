//! End to end on RabbitMQ as the seed (section 4) describes it: the `inventory` binary relays to a
//! topic exchange with the seed's routing keys, and consumers bind exactly the seed's keys and
//! patterns (`inventory.stock.*`, `inventory.reservation.*`, the six keys). One tenant's events
//! are taken through a headers exchange bound behind the topic exchange on `Outbox-Tenant-Id`.
//! Every queue and exchange is the test's own and is deleted at the end.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::http::StatusCode;
use common::*;
use lapin::options::{
    BasicGetOptions, ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{json, Value};
use testkit::eventually;
use testkit::relay::free_port;
use uuid::Uuid;

use testkit::rabbit::amqp_url;

/// The seed's six routing keys.
const SEED_KEYS: [&str; 6] = [
    "inventory.stock.changed",
    "inventory.stock.status.changed",
    "inventory.reservation.created",
    "inventory.reservation.failed",
    "inventory.reservation.released",
    "inventory.stock.low_threshold_reached",
];

/// What a consumer receives: routing key, tenant header, envelope.
#[derive(Debug, Clone)]
struct Got {
    routing_key: String,
    headers: HashMap<String, String>,
    message_id: String,
    envelope: Value,
}

/// The test's exchange, queues and extra exchanges; deleted on drop.
struct Topology {
    exchange: String,
    queues: Vec<String>,
    exchanges: Vec<String>,
    _conn: Connection,
    ch: Channel,
}

impl Topology {
    async fn new() -> Self {
        let exchange = testkit::unique("inventory.events");
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("RabbitMQ reachable on 127.0.0.1:5672");
        let ch = conn.create_channel().await.unwrap();
        Self {
            queues: vec![format!("{exchange}.unroutable")],
            exchanges: vec![format!("{exchange}.unroutable")],
            exchange,
            _conn: conn,
            ch,
        }
    }

    /// The adapter's view of the exchange, so the queue helper declares it exactly like the
    /// relay does (same alternate exchange: a mismatch would be refused by the broker).
    fn config(&self) -> outbox::amqp::AmqpConfig {
        outbox::amqp::AmqpConfig {
            url: amqp_url(),
            exchange: self.exchange.clone(),
            alternate_exchange: Some(format!("{}.unroutable", self.exchange)),
            ..Default::default()
        }
    }

    /// A durable queue bound to the topic exchange with `bindings`.
    async fn queue(&mut self, name: &str, bindings: &[&str]) -> String {
        let q = format!("{}.{name}", self.exchange);
        let b: Vec<String> = bindings.iter().map(|s| s.to_string()).collect();
        outbox::amqp::declare_consumer_queue(
            &self.config(),
            &q,
            &b,
            &format!("{q}.dlx"),
            &format!("{q}.dlq"),
        )
        .await
        .expect("declare a consumer queue");
        self.queues.extend([q.clone(), format!("{q}.dlq")]);
        self.exchanges.push(format!("{q}.dlx"));
        q
    }

    /// A queue that receives only `tenant`'s events matching `pattern`: a headers exchange bound
    /// behind the topic exchange by `pattern`, and the queue bound to it on `Outbox-Tenant-Id`.
    async fn tenant_queue(&mut self, tenant: &str, pattern: &str) -> String {
        let hx = format!("{}.tenant.{tenant}", self.exchange);
        let q = format!("{hx}.q");
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        self.ch
            .exchange_declare(
                hx.as_str().into(),
                ExchangeKind::Headers,
                durable,
                FieldTable::default(),
            )
            .await
            .unwrap();
        self.exchanges.push(hx.clone());
        self.ch
            .exchange_bind(
                hx.as_str().into(),
                self.exchange.as_str().into(),
                pattern.into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        self.ch
            .queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        self.queues.push(q.clone());
        let mut args = FieldTable::default();
        args.insert("x-match".into(), AMQPValue::LongString("all".into()));
        args.insert(
            "Outbox-Tenant-Id".into(),
            AMQPValue::LongString(tenant.into()),
        );
        self.ch
            .queue_bind(
                q.as_str().into(),
                hx.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                args,
            )
            .await
            .unwrap();
        q
    }

    async fn drain(&self, queue: &str) -> Vec<Got> {
        let mut out = Vec::new();
        while let Some(m) = self
            .ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            let p = &m.delivery.properties;
            let mut headers = HashMap::new();
            if let Some(h) = p.headers() {
                for (k, v) in h.inner() {
                    if let AMQPValue::LongString(s) = v {
                        headers.insert(
                            k.to_string(),
                            String::from_utf8_lossy(s.as_bytes()).into_owned(),
                        );
                    }
                }
            }
            out.push(Got {
                routing_key: m.delivery.routing_key.to_string(),
                headers,
                message_id: p
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                envelope: serde_json::from_slice(&m.delivery.data).expect("a JSON envelope"),
            });
        }
        out
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let exchanges = self.exchanges.iter().chain([&self.exchange]);
        testkit::rabbit::delete_names(
            &amqp_url(),
            self.queues.clone(),
            exchanges.cloned().collect(),
        );
    }
}

/// The `inventory` binary, killed on drop if the test fails before stopping it.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every kind of event for one tenant: purchase, a reservation that drops below the threshold,
/// a failed one, a cancellation, a reservation of everything and its shipment.
async fn business(app: &App, t: &str) {
    let v = app.variant(t, 5, 10).await;
    let order = Uuid::now_v7();
    let line =
        |q: i64| json!({"orderId": order, "lines": [{"productVariantId": v, "quantity": q}]});
    let (s, r) = app.post(t, "/reservations", line(6)).await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    let (s, f) = app.post(t, "/reservations", line(100)).await;
    assert_eq!(s, StatusCode::CONFLICT, "{f}");
    let (s, c) = app
        .post_empty(
            t,
            &format!("/reservations/{}/cancel", r["id"].as_str().unwrap()),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    let (s, r) = app.post(t, "/reservations", line(10)).await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    let (s, c) = app
        .post_empty(
            t,
            &format!("/reservations/{}/ship", r["id"].as_str().unwrap()),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{c}");
}

/// Whether the topic-exchange pattern `p` matches `key` (`*` one word, `#` zero or more).
fn topic_match(p: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match (p.first(), k.first()) {
            (None, None) => true,
            (Some(&"#"), _) => go(&p[1..], k) || (!k.is_empty() && go(p, &k[1..])),
            (Some(&"*"), Some(_)) => go(&p[1..], &k[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &k[1..]),
            _ => false,
        }
    }
    let (p, k): (Vec<&str>, Vec<&str>) = (p.split('.').collect(), key.split('.').collect());
    go(&p, &k)
}

/// (tenant, routing key, eventId) of each message, sorted: what a queue holds, order aside.
fn ids(got: &[Got]) -> Vec<(String, String, String)> {
    let mut v: Vec<_> = got
        .iter()
        .map(|g| {
            (
                g.envelope["tenantId"].as_str().unwrap().to_string(),
                g.routing_key.clone(),
                g.envelope["eventId"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_bindings_receive_every_tenants_events_and_a_header_binding_one_tenants() {
    let app = App::new().await;
    let mut topo = Topology::new().await;
    // The consumers exist before anything is published, as the seed's services would.
    let stock = topo.queue("stock", &["inventory.stock.*"]).await;
    let reservation = topo
        .queue("reservation", &["inventory.reservation.*"])
        .await;
    let exact = topo.queue("exact", &SEED_KEYS).await;
    let acme_only = topo.tenant_queue("acme", "#").await;

    // Only the exchange is the test's own: routing keys and header mode are the service's
    // defaults for RabbitMQ.
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_inventory"))
        .args([
            "serve",
            "--broker",
            "rabbitmq",
            "--amqp-exchange",
            &topo.exchange,
            "--metrics-addr",
            "",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--poll-interval-ms",
            "100",
        ])
        .env("DATABASE_URL", &app.db.url)
        .env("INVENTORY_JWT_SECRET", std::str::from_utf8(SECRET).unwrap())
        .env("AMQP_URL", amqp_url())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start inventory");
    let mut service = Service(child);

    for tenant in ["acme", "globex"] {
        business(&app, &app.token(tenant)).await;
    }
    // Published rows leave `outbox_event` (pending and dead ones stay): empty means delivered.
    assert!(
        eventually(Duration::from_secs(60), || async {
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_event")
                .fetch_one(&app.db.pool)
                .await
                .unwrap();
            left == 0
        })
        .await,
        "the in-process relay publishes every event to RabbitMQ"
    );
    let outbox = app.all_events().await;

    let all: Vec<(String, String, String)> = {
        let mut v: Vec<_> = outbox
            .iter()
            .map(|e| {
                (
                    e.tenant.clone(),
                    e.topic.clone(),
                    e.envelope["eventId"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let want = |f: &dyn Fn(&(String, String, String)) -> bool| -> Vec<(String, String, String)> {
        all.iter().filter(|x| f(x)).cloned().collect()
    };
    // Thirteen per tenant: the shipment is a release (ORDER_COMPLETED_ADJUSTMENT) and a sale.
    assert_eq!(all.len(), 26, "thirteen events per tenant");
    let kinds: std::collections::BTreeSet<&str> =
        outbox.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        kinds.len(),
        6,
        "the scenario yields all six events: {kinds:?}"
    );

    // The six exact keys: everything, of both tenants, each message once.
    let got_exact = topo.drain(&exact).await;
    assert_eq!(ids(&got_exact), all);
    // `inventory.stock.*` is one word after `stock`: stock changes and low-stock alerts, but not
    // `inventory.stock.status.changed` (four words), exactly as topic exchanges match.
    let got_stock = topo.drain(&stock).await;
    assert_eq!(
        ids(&got_stock),
        want(&|x| topic_match("inventory.stock.*", &x.1))
    );
    assert!(got_stock
        .iter()
        .all(|g| g.routing_key != "inventory.stock.status.changed"));
    assert!(got_stock
        .iter()
        .any(|g| g.routing_key == "inventory.stock.low_threshold_reached"));
    let got_res = topo.drain(&reservation).await;
    assert_eq!(
        ids(&got_res),
        want(&|x| topic_match("inventory.reservation.*", &x.1))
    );
    assert_eq!(
        got_res
            .iter()
            .map(|g| g.routing_key.as_str())
            .collect::<std::collections::BTreeSet<_>>(),
        [
            "inventory.reservation.created",
            "inventory.reservation.failed",
            "inventory.reservation.released"
        ]
        .into_iter()
        .collect()
    );
    // One tenant through the header binding: all of acme's events, none of globex's.
    let got_acme = topo.drain(&acme_only).await;
    assert_eq!(ids(&got_acme), want(&|x| x.0 == "acme"));

    // Every message: the seed's routing key for its type, the tenant in header and envelope,
    // message_id = eventId, and the envelope and payload of seed sections 2 and 3.
    let mut per_tenant: BTreeMap<String, usize> = BTreeMap::new();
    for g in &got_exact {
        let env = &g.envelope;
        let event_type = env["eventType"].as_str().unwrap();
        assert_eq!(g.routing_key, seed_topic(event_type));
        assert_eq!(
            g.headers.get("Outbox-Tenant-Id").map(String::as_str),
            env["tenantId"].as_str()
        );
        assert_eq!(g.message_id, env["eventId"].as_str().unwrap());
        assert_eq!(
            g.headers.get("Outbox-Event-Type").map(String::as_str),
            Some(event_type)
        );
        assert_seed_event(env);
        *per_tenant
            .entry(env["tenantId"].as_str().unwrap().into())
            .or_default() += 1;
    }
    assert_eq!(per_tenant.len(), 2, "both tenants' events: {per_tenant:?}");

    // The service stops cleanly.
    let _ = Command::new("kill")
        .args(["-TERM", &service.0.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = service.0.try_wait().unwrap() {
            assert!(s.success(), "clean exit on SIGTERM: {s}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the service did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn serve_defaults_to_the_seeds_exchange_and_routing_keys() {
    let out = Command::new(env!("CARGO_BIN_EXE_inventory"))
        .args(["serve", "--help"])
        .env_remove("OUTBOX_AMQP_EXCHANGE")
        .env_remove("OUTBOX_AMQP_ROUTING_KEY")
        .output()
        .expect("run inventory serve --help");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("[default: inventory.events]"),
        "the seed's exchange is the default: {help}"
    );
    assert!(help.contains("[default: {topic}]"), "{help}");
}

#[tokio::test]
async fn a_routing_key_without_the_tenant_needs_the_explicit_setting() {
    let cfg = |header_only: bool| outbox::amqp::AmqpConfig {
        // Nobody listens there: connect() still checks the configuration first.
        url: format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port()),
        exchange: testkit::unique("never-declared"),
        routing_key_template: "{topic}".into(),
        tenant_in_header_only: header_only,
        connect_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let refused = outbox::amqp::AmqpPublisher::connect(cfg(false)).await;
    let Err(e) = refused else {
        panic!("a template without {{tenant}} must be refused by default")
    };
    assert!(e.to_string().contains("{tenant}"), "{e}");
    assert!(outbox::amqp::AmqpPublisher::connect(cfg(true))
        .await
        .is_ok());
}

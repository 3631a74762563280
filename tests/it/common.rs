//! Test support: a fresh database and topic prefix per test, the service
//! started on a random port, fakes of the channel providers, Kafka reads.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use casebook::app::{self, Role, Running};
use casebook::config::{Config, Source};
use casebook::db;
use casebook_commands::kafka::{delete_topics, KafkaSettings};
use casebook_domain::EventEnvelope;
use hmac::{Hmac, Mac};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sha1::Sha1;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

pub const BACKBONE: &[Role] = &[Role::Api, Role::Relay, Role::Projector];
pub const JWT_SECRET: &str = "test-secret-test-secret-test-secret-0123";
pub const TWILIO_TOKEN: &str = "twilio-test-auth-token";
pub const GMAIL_PUSH_TOKEN: &str = "gmail-push-test-token";
pub const PUBLIC_URL: &str = "https://casebook.test";

pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| casebook::config::DEFAULT_DATABASE_URL.to_string())
}

pub fn kafka_brokers() -> String {
    std::env::var("KAFKA_BROKERS")
        .unwrap_or_else(|_| casebook::config::DEFAULT_KAFKA_BROKERS.to_string())
}

fn with_database(url: &str, name: &str) -> String {
    let mut u = url::Url::parse(url).expect("DATABASE_URL is a URL");
    u.set_path(&format!("/{name}"));
    u.to_string()
}

/// A database of its own, migrated; dropped when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn create() -> Self {
        let name = format!("casebook_test_{}", Uuid::new_v4().simple());
        let admin_url = with_database(&database_url(), "postgres");
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("the local stack's Postgres is up (make stack-up)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create test database");
        admin.close().await.ok();
        let url = with_database(&database_url(), &name);
        let pool = db::connect(&url, 5, db::Purpose::Maintenance)
            .await
            .expect("connect test database");
        db::migrate(&pool).await.expect("migrate test database");
        Self { name, url, pool }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let pool = self.pool.clone();
        let admin_url = with_database(&database_url(), "postgres");
        // Drop runs outside any runtime guarantee: use a thread of our own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                // Bounded: on a test's current-thread runtime, a connection
                // released just before the end is given back by a task of
                // that runtime, which is blocked here until this thread
                // ends; the DROP below ends any connection still open.
                let _ = tokio::time::timeout(Duration::from_secs(5), pool.close()).await;
                if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await;
                }
            });
        })
        .join();
    }
}

/// The service under test, on a random port, with its own database and
/// topic prefix.
pub struct TestApp {
    pub addr: SocketAddr,
    /// The operations listener.
    pub ops_addr: SocketAddr,
    pub base: String,
    pub http: reqwest::Client,
    pub config: Config,
    pub db: TestDb,
    running: Option<Running>,
}

pub fn test_config(db_url: &str, prefix: &str, overrides: &[(&str, String)]) -> Config {
    let mut vars: HashMap<String, String> = HashMap::from([
        ("DATABASE_URL".to_string(), db_url.to_string()),
        ("KAFKA_BROKERS".to_string(), kafka_brokers()),
        ("KAFKA_TOPIC_PREFIX".to_string(), prefix.to_string()),
        ("CASEBOOK_JWT_SECRET".to_string(), JWT_SECRET.to_string()),
        ("CASEBOOK_PUBLIC_URL".to_string(), PUBLIC_URL.to_string()),
        ("CASEBOOK_HTTP_ADDR".to_string(), "127.0.0.1:0".to_string()),
        ("CASEBOOK_OPS_ADDR".to_string(), "127.0.0.1:0".to_string()),
        ("CASEBOOK_DB_MAX_CONNECTIONS".to_string(), "10".to_string()),
        // Every test client is 127.0.0.1: the per-client limit is off unless
        // a test sets it (tests/it/ratelimit.rs).
        (
            "CASEBOOK_RATE_LIMIT_PER_CLIENT".to_string(),
            "0".to_string(),
        ),
        ("TWILIO_AUTH_TOKEN".to_string(), TWILIO_TOKEN.to_string()),
        ("GMAIL_PUSH_TOKEN".to_string(), GMAIL_PUSH_TOKEN.to_string()),
        (
            "GMAIL_SUPPORT_ADDRESS".to_string(),
            "support@acme.test".to_string(),
        ),
        (
            "CASEBOOK_EMBEDDINGS".to_string(),
            format!(
                "local:{}/.casebook/models/all-MiniLM-L6-v2",
                env!("CARGO_MANIFEST_DIR")
            ),
        ),
    ]);
    for (k, v) in overrides {
        vars.insert(k.to_string(), v.clone());
    }
    Config::load(&Source::from_fn(
        move |k| vars.get(k).cloned(),
        std::path::Path::new("/nonexistent"),
    ))
    .expect("test configuration is valid")
}

/// Logs of the service under test, shown for failing tests (RUST_LOG,
/// default warn). With `CASEBOOK_TEST_LOG_DIR` set, every test's logs at
/// info level also go, as the service writes them (JSON lines), to a file
/// there, which `tests/pii_scan.rs` searches for unmasked personal data.
pub fn init_logs() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let shown = tracing_subscriber::fmt::layer()
        .with_test_writer()
        .with_filter(filter);
    let captured = std::env::var("CASEBOOK_TEST_LOG_DIR").ok().map(|dir| {
        std::fs::create_dir_all(&dir).expect("CASEBOOK_TEST_LOG_DIR can be created");
        let path = std::path::Path::new(&dir).join(format!("it-{}.jsonl", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("the test log file opens");
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(std::sync::Mutex::new(file))
            .with_filter(tracing_subscriber::EnvFilter::new("info"))
    });
    let _ = tracing_subscriber::registry()
        .with(shown)
        .with(captured)
        .try_init();
}

pub fn unique_prefix() -> String {
    format!("t{}", &Uuid::new_v4().simple().to_string()[..12])
}

impl TestApp {
    /// The event backbone (API, relay, projectors) against the shared local
    /// broker: no agent answers and no delivery, so the read models hold
    /// exactly what intake stored.
    pub async fn spawn() -> Self {
        Self::spawn_with(BACKBONE, &[]).await
    }

    pub async fn spawn_with(roles: &[Role], overrides: &[(&str, String)]) -> Self {
        let db = TestDb::create().await;
        let config = test_config(&db.url, &unique_prefix(), overrides);
        Self::start(db, config, roles).await
    }

    pub async fn start(db: TestDb, config: Config, roles: &[Role]) -> Self {
        init_logs();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let running = app::start(&config, roles, Some(listener))
            .await
            .expect("service starts");
        let addr = running.addr.expect("api role listens");
        Self {
            addr,
            ops_addr: running.ops_addr,
            base: format!("http://{addr}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            config,
            db,
            running: Some(running),
        }
    }

    /// Stops every role, keeping the database and topics (a restart).
    pub async fn halt(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop(Duration::from_secs(20)).await;
        }
    }

    /// Starts `roles` again on the same database and topics.
    pub async fn resume(&mut self, roles: &[Role]) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let running = app::start(&self.config, roles, Some(listener))
            .await
            .expect("service restarts");
        self.addr = running.addr.expect("api role listens");
        self.ops_addr = running.ops_addr;
        self.base = format!("http://{}", self.addr);
        self.running = Some(running);
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// `GET path` on the public listener, as JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        response.json().await.unwrap()
    }

    pub fn ops_url(&self, path: &str) -> String {
        format!("http://{}{}", self.ops_addr, path)
    }

    pub fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    pub fn kafka(&self) -> KafkaSettings {
        app::kafka_settings(&self.config)
    }

    /// Stops the service (gracefully) and cleans up its topics; the
    /// database goes when the value is dropped.
    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop(Duration::from_secs(20)).await;
        }
        let kafka = self.kafka();
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            delete_topics(&kafka, &kafka.topics.all()),
        )
        .await;
    }

    pub async fn submit_form(&self, form: serde_json::Value) -> reqwest::Response {
        self.http
            .post(self.url("/support/tickets"))
            .json(&form)
            .send()
            .await
            .expect("request sent")
    }

    /// Posts a form to a Twilio webhook path, signed as Twilio signs it.
    pub async fn post_twilio(
        &self,
        path: &str,
        params: &[(&str, &str)],
        signature: Option<String>,
    ) -> reqwest::Response {
        let owned: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let signature = signature.unwrap_or_else(|| {
            twilio_signature(TWILIO_TOKEN, &format!("{PUBLIC_URL}{path}"), &owned)
        });
        self.http
            .post(self.url(path))
            .header("x-twilio-signature", signature)
            .form(&owned)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(self.pool())
            .await
            .expect("count query")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            // A test that panicked: stop the roles before the database goes.
            running.shutdown_token().cancel();
        }
    }
}

/// Twilio's signature, computed independently of the service's own code:
/// base64(HMAC-SHA1(token, url + sorted name/value pairs)).
pub fn twilio_signature(token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted = params.to_vec();
    sorted.sort();
    let mut data = url.to_string();
    for (k, v) in sorted {
        data.push_str(&k);
        data.push_str(&v);
    }
    let mut mac = Hmac::<Sha1>::new_from_slice(token.as_bytes()).unwrap();
    mac.update(data.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

pub fn form(email: &str, message: &str) -> serde_json::Value {
    serde_json::json!({
        "name": "Ada Lovelace",
        "email": email,
        "subject": "Export fails",
        "message": message,
        "category": "technical",
    })
}

/// Polls `check` until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One message read from a topic.
#[derive(Debug, Clone)]
pub struct Received {
    pub partition: i32,
    pub key: String,
    pub headers: HashMap<String, String>,
    pub envelope: EventEnvelope,
}

/// A consumer of every partition of `topic` from the beginning, with no
/// consumer group of its own to commit to. Waits until `deadline` for the
/// topic to exist (a broker that just restarted has none). Blocking.
pub fn consumer_from_beginning(brokers: &str, topic: &str, deadline: Instant) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("test-reader-{}", Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("log_level", "3")
        .create()
        .expect("consumer");
    let partitions = loop {
        let n = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .ok()
            .and_then(|m| m.topics().first().map(|t| t.partitions().len() as i32))
            .unwrap_or(0);
        if n > 0 {
            break n;
        }
        assert!(Instant::now() < deadline, "topic {topic} never appeared");
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).expect("assign");
    consumer
}

/// Reads `topic` from the beginning of every partition (no consumer group)
/// until `expected` distinct events arrived or `timeout` passed; returns
/// every message in arrival order per partition, copies included.
pub async fn read_topic(
    brokers: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<Received> {
    let brokers = brokers.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + timeout;
        let consumer = consumer_from_beginning(&brokers, &topic, deadline);
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        while seen.len() < expected && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                let envelope: EventEnvelope = serde_json::from_slice(m.payload().expect("payload"))
                    .expect("an event envelope");
                seen.insert(envelope.event_id);
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_string(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Received {
                    partition: m.partition(),
                    key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                    headers,
                    envelope,
                });
            }
        }
        out
    })
    .await
    .expect("reader thread")
}

/// A tansu broker of the test's own (in-memory storage), to stop and start.
pub struct Broker {
    pub port: u16,
    child: Option<std::process::Child>,
}

fn tansu_binary() -> std::path::PathBuf {
    let candidates = [
        std::env::var("CASEBOOK_TANSU_BIN")
            .ok()
            .map(std::path::PathBuf::from),
        Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".casebook/bin/tansu")),
        std::env::var("HOME")
            .ok()
            .map(|h| std::path::Path::new(&h).join(".cargo/bin/tansu")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .expect("the tansu broker is installed (deploy/local/install.sh)")
}

impl Broker {
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut broker = Self { port, child: None };
        broker.restart().await;
        broker
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the broker (again) on the same port.
    pub async fn restart(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = std::process::Command::new(tansu_binary())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/", "--silent"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tansu starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Freezes the broker (SIGSTOP): connections stay open and every request
    /// hangs, as with a broker that stopped answering.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .expect("broker running")
            .id()
            .to_string();
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Kills the broker outright, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal("-CONT");
        }
        self.kill();
    }
}

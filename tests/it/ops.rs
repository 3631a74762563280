//! Every role serves `/health`, `/ready` and `/metrics` on its operations
//! listener; the public `/ready` tells only whether the service is ready.

use std::time::Duration;

use casebook::app::{self, Role};
use serde_json::Value;

use crate::common::{init_logs, test_config, unique_prefix, TestApp, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_can_be_probed_and_scraped_on_its_ops_listener() {
    init_logs();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for role in [Role::Relay, Role::Projector, Role::Agent, Role::Delivery] {
        let db = TestDb::create().await;
        let config = test_config(&db.url, &unique_prefix(), &[]);
        // `casebook migrate` creates the topics before any role starts.
        app::kafka_settings(&config).ensure_topics().await.unwrap();
        let running = app::start(&config, &[role], None)
            .await
            .expect("role starts");
        assert!(running.addr.is_none(), "{role:?} has no public listener");
        let ops = format!("http://{}", running.ops_addr);
        let health = http.get(format!("{ops}/health")).send().await.unwrap();
        assert_eq!(health.status(), 200, "{role:?} /health");
        let ready: Value =
            crate::common::eventually("the role is ready", Duration::from_secs(60), || async {
                let r = http.get(format!("{ops}/ready")).send().await.ok()?;
                (r.status() == 200).then_some(())?;
                r.json().await.ok()
            })
            .await;
        assert_eq!(ready["checks"]["postgres"], "ok");
        assert_eq!(ready["checks"]["kafka"], "ok");
        let roles: Vec<String> = serde_json::from_value(ready["roles"].clone()).unwrap();
        assert_eq!(roles, vec![format!("{role:?}").to_lowercase()]);
        let metrics = http
            .get(format!("{ops}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(metrics.contains("# TYPE"), "{role:?} exposes metrics");
        running.stop(Duration::from_secs(20)).await;
        let kafka = app::kafka_settings(&config);
        let _ = casebook_commands::kafka::delete_topics(&kafka, &kafka.topics.all()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_ready_says_only_ready_or_not() {
    // A broker nobody listens on: not ready.
    let app = TestApp::spawn_with(
        &[Role::Api],
        &[("KAFKA_BROKERS", "127.0.0.1:9".to_string())],
    )
    .await;
    let public = app.http.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(public.status(), 503);
    let body: Value = public.json().await.unwrap();
    assert_eq!(body["error"], "not_ready");
    assert_eq!(body["message"], "not ready");
    assert!(body.get("fields").is_none(), "no details in public: {body}");
    let text = body.to_string();
    assert!(
        !text.contains("kafka") && !text.contains("127.0.0.1"),
        "{text}"
    );

    let ops = app.http.get(app.ops_url("/ready")).send().await.unwrap();
    assert_eq!(ops.status(), 503);
    let body: Value = ops.json().await.unwrap();
    assert!(
        body["fields"]["kafka"]
            .as_str()
            .unwrap()
            .starts_with("down"),
        "{body}"
    );
    app.stop().await;
}

//! Local actions any rule or window may trigger: publish to an MQTT topic (templated payload),
//! POST to a webhook with bounded retries, write a log line. Owns the compiled actions of each
//! rule ([`RuleActions`], with the rule's rate limit), the hand-over type [`Fired`], and the
//! runner task that performs them with its MQTT clients (one per broker and credentials,
//! created on first use) and webhook clients.
//!
//! Never on a source's path: [`Actions::dispatch`] only takes a rate-limit token and queues
//! (bounded; when full the firing is dropped and counted). Templates are rendered, and
//! connections made, on the runner task, which is spawned on the first dispatch so that
//! building a pipeline (`runnel-agent check`) spawns and connects nothing. Actions are best
//! effort: at shutdown, or when a new pipeline replaces this one, queued firings are abandoned.
//!
//! Counted in `runnel_agent_actions_total{rule,kind,outcome}`; outcome is `ok`, `error`,
//! `rate_limited` (kind `any`), `queue_full` (kind `any`), `busy` (too many webhooks in flight)
//! or `no_runtime`.
//!
//! How a rule or window uses it: build an `Arc<RuleActions>` once with [`RuleActions::build`]
//! (`None` when it has no actions), and for each firing push
//! `Fired { actions: Arc::clone(&actions), event }` to the `fired` vector the pipeline passes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use runnel_common::Event;
use runnel_config::{
    ActionConfig, LocalActions, LogLevel, MqttActionConfig, RateLimit, RulesConfig,
    WebhookActionConfig, WindowConfig,
};
use tokio::sync::{Semaphore, mpsc};

use super::BuildContext;
use super::expr::{Template, Vars, event_to_json};

/// Firings waiting for the runner. Actions are rare next to events (rate-limited per rule); a
/// queue this deep means the runner is stuck, and new firings are dropped and counted.
const QUEUE_CAPACITY: usize = 1024;
/// Webhook requests in flight at once (each with its retries); more are dropped and counted.
const MAX_WEBHOOKS_IN_FLIGHT: usize = 32;
/// Requests an MQTT client holds while (re)connecting; more are dropped and counted.
const MQTT_CLIENT_CAPACITY: usize = 256;
/// The longest wait between reconnects of an action's MQTT client.
const MQTT_RECONNECT_MAX: Duration = Duration::from_secs(30);

/// One firing: a rule (or window) matched this event (or emitted this alert), and its actions
/// are to run with the event's fields as template variables.
#[derive(Debug, Clone)]
pub struct Fired {
    pub actions: Arc<RuleActions>,
    pub event: Event,
}

/// The compiled actions of one rule and its rate limit, shared by all its firings.
#[derive(Debug)]
pub struct RuleActions {
    rule: Arc<str>,
    actions: Vec<Compiled>,
    rate_limit: RateLimit,
    bucket: Mutex<Bucket>,
    rate_limited: ::metrics::Counter,
    queue_full: ::metrics::Counter,
}

#[derive(Debug)]
enum Compiled {
    Mqtt {
        config: MqttActionConfig,
        topic: Template,
        payload: Option<Template>,
    },
    Webhook {
        config: WebhookActionConfig,
        payload: Option<Template>,
        /// Made on first use (it reads the system's roots and the CA file).
        client: OnceLock<Result<reqwest::Client, String>>,
    },
    Log {
        level: LogLevel,
        message: Template,
    },
}

impl Compiled {
    fn kind(&self) -> &'static str {
        match self {
            Compiled::Mqtt { .. } => "mqtt",
            Compiled::Webhook { .. } => "webhook",
            Compiled::Log { .. } => "log",
        }
    }
}

/// A token bucket.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Option<Instant>,
}

impl RuleActions {
    /// Compiles the templates of `config`; `None` when there are no actions.
    pub fn build(rule: &str, config: &LocalActions) -> anyhow::Result<Option<Arc<RuleActions>>> {
        if config.actions.is_empty() {
            return Ok(None);
        }
        let template = |text: &str, what: &str| {
            Template::compile(text, rule).with_context(|| format!("rule {rule}: {what} {text:?}"))
        };
        let mut actions = Vec::with_capacity(config.actions.len());
        for action in &config.actions {
            actions.push(match action {
                ActionConfig::Mqtt(mqtt) => Compiled::Mqtt {
                    topic: template(&mqtt.topic, "topic")?,
                    payload: mqtt
                        .payload
                        .as_deref()
                        .map(|p| template(p, "payload"))
                        .transpose()?,
                    config: mqtt.clone(),
                },
                ActionConfig::Webhook(webhook) => Compiled::Webhook {
                    payload: webhook
                        .payload
                        .as_deref()
                        .map(|p| template(p, "payload"))
                        .transpose()?,
                    config: webhook.clone(),
                    client: OnceLock::new(),
                },
                ActionConfig::Log(log) => Compiled::Log {
                    level: log.level,
                    message: template(&log.message, "message")?,
                },
            });
        }
        let counter = |outcome: &'static str| {
            ::metrics::counter!(
                "runnel_agent_actions_total",
                "rule" => rule.to_owned(),
                "kind" => "any",
                "outcome" => outcome
            )
        };
        Ok(Some(Arc::new(RuleActions {
            rule: Arc::from(rule),
            actions,
            rate_limit: config.rate_limit,
            bucket: Mutex::new(Bucket {
                tokens: config.rate_limit.burst as f64,
                last: None,
            }),
            rate_limited: counter("rate_limited"),
            queue_full: counter("queue_full"),
        })))
    }

    pub fn rule(&self) -> &str {
        &self.rule
    }

    /// Takes a token if the rate limit allows a firing at `now`.
    fn try_take(&self, now: Instant) -> bool {
        let mut bucket = self
            .bucket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let burst = self.rate_limit.burst as f64;
        if let Some(last) = bucket.last {
            let per_s = self.rate_limit.per_minute as f64 / 60.0;
            let refill = now.saturating_duration_since(last).as_secs_f64() * per_s;
            bucket.tokens = (bucket.tokens + refill).min(burst);
        }
        bucket.last = Some(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The action runner of one pipeline.
#[derive(Default)]
pub struct Actions {
    agent_id: String,
    /// The runner's queue; set on the first dispatch (`None` outside a tokio runtime).
    sender: OnceLock<Option<mpsc::Sender<Fired>>>,
}

impl Actions {
    /// Spawns and connects nothing: the runner starts on the first dispatch. Rules and windows
    /// compile their own actions ([`RuleActions::build`]) and hand them over in [`Fired`].
    pub fn build(
        _rules: &RulesConfig,
        _windows: &[WindowConfig],
        context: &BuildContext,
    ) -> anyhow::Result<Actions> {
        Ok(Actions {
            agent_id: context.agent_id.clone(),
            sender: OnceLock::new(),
        })
    }

    /// Queues the fired actions for the runner; drops (and counts) what is over a rule's rate
    /// limit or does not fit the queue. Never blocks.
    pub fn dispatch(&self, fired: Vec<Fired>) {
        if fired.is_empty() {
            return;
        }
        let now = Instant::now();
        for firing in fired {
            if !firing.actions.try_take(now) {
                firing.actions.rate_limited.increment(1);
                continue;
            }
            let Some(sender) = self.sender() else {
                count(&firing.actions.rule, "any", "no_runtime");
                continue;
            };
            if let Err(error) = sender.try_send(firing) {
                let firing = match error {
                    mpsc::error::TrySendError::Full(firing)
                    | mpsc::error::TrySendError::Closed(firing) => firing,
                };
                firing.actions.queue_full.increment(1);
            }
        }
    }

    fn sender(&self) -> Option<&mpsc::Sender<Fired>> {
        self.sender
            .get_or_init(|| {
                let runtime = tokio::runtime::Handle::try_current().ok()?;
                let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
                runtime.spawn(run(receiver, self.agent_id.clone()));
                Some(sender)
            })
            .as_ref()
    }
}

fn count(rule: &str, kind: &'static str, outcome: &'static str) {
    ::metrics::counter!(
        "runnel_agent_actions_total",
        "rule" => rule.to_owned(),
        "kind" => kind,
        "outcome" => outcome
    )
    .increment(1);
}

/// The runner: performs firings in order until every sender is gone (the pipeline was
/// replaced or the agent stops).
async fn run(mut receiver: mpsc::Receiver<Fired>, agent_id: String) {
    // A runner of a replaced pipeline may still be connected: the new one's MQTT client ids
    // must differ, or the broker would keep disconnecting one for the other.
    static GENERATION: AtomicU64 = AtomicU64::new(0);
    let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
    let mut runner = Runner {
        client_id_prefix: format!("runnel-{agent_id}-actions-{generation}"),
        mqtt: HashMap::new(),
        webhooks: Arc::new(Semaphore::new(MAX_WEBHOOKS_IN_FLIGHT)),
    };
    while let Some(firing) = receiver.recv().await {
        runner.run(firing);
    }
}

struct Runner {
    /// `runnel-<agent id>-actions-<runner>`; each MQTT client appends its number.
    client_id_prefix: String,
    /// One client per broker URL and credentials.
    mqtt: HashMap<String, rumqttc::AsyncClient>,
    webhooks: Arc<Semaphore>,
}

impl Runner {
    fn run(&mut self, firing: Fired) {
        let vars = Vars::event(&firing.event);
        let rule = firing.actions.rule();
        for (idx, action) in firing.actions.actions.iter().enumerate() {
            let kind = action.kind();
            let outcome = match action {
                Compiled::Log { level, message } => match message.render(&vars) {
                    Ok(text) => {
                        match level {
                            LogLevel::Error => tracing::error!(rule, "{text}"),
                            LogLevel::Warn => tracing::warn!(rule, "{text}"),
                            LogLevel::Info => tracing::info!(rule, "{text}"),
                            LogLevel::Debug => tracing::debug!(rule, "{text}"),
                        }
                        "ok"
                    }
                    Err(_) => "error",
                },
                Compiled::Mqtt {
                    config,
                    topic,
                    payload,
                } => self.publish(rule, config, topic, payload.as_ref(), &firing.event),
                Compiled::Webhook {
                    config,
                    payload,
                    client,
                } => {
                    let body = match payload {
                        Some(template) => template.render(&vars),
                        None => Ok(event_to_json(&firing.event).to_string()),
                    };
                    let client = client.get_or_init(|| webhook_client(config));
                    match (body, client) {
                        (Ok(body), Ok(client)) => {
                            match Arc::clone(&self.webhooks).try_acquire_owned() {
                                Ok(permit) => {
                                    let firing_actions = Arc::clone(&firing.actions);
                                    let client = client.clone();
                                    tokio::spawn(async move {
                                        let Compiled::Webhook { config, .. } =
                                            &firing_actions.actions[idx]
                                        else {
                                            return;
                                        };
                                        let outcome = match post(&client, config, body).await {
                                            Ok(()) => "ok",
                                            Err(error) => {
                                                tracing::warn!(
                                                    rule = %firing_actions.rule,
                                                    url = %config.url,
                                                    %error,
                                                    "webhook action failed"
                                                );
                                                "error"
                                            }
                                        };
                                        count(&firing_actions.rule, "webhook", outcome);
                                        drop(permit);
                                    });
                                    continue;
                                }
                                Err(_) => "busy",
                            }
                        }
                        (_, Err(error)) => {
                            tracing::warn!(rule, %error, "webhook client");
                            "error"
                        }
                        (Err(_), _) => "error",
                    }
                }
            };
            count(rule, kind, outcome);
        }
    }

    fn publish(
        &mut self,
        rule: &str,
        config: &MqttActionConfig,
        topic: &Template,
        payload: Option<&Template>,
        event: &Event,
    ) -> &'static str {
        let vars = Vars::event(event);
        let (topic, payload) = match (
            topic.render(&vars),
            payload.map_or_else(|| Ok(event_to_json(event).to_string()), |p| p.render(&vars)),
        ) {
            (Ok(topic), Ok(payload)) => (topic, payload),
            _ => return "error",
        };
        if topic.is_empty() || topic.contains(['+', '#']) {
            tracing::warn!(rule, %topic, "MQTT action: the rendered topic is not publishable");
            return "error";
        }
        let key = format!(
            "{}\0{:?}\0{:?}\0{:?}",
            config.url, config.username, config.password, config.ca_cert
        );
        if !self.mqtt.contains_key(&key) {
            let client_id = format!("{}-{}", self.client_id_prefix, self.mqtt.len());
            match mqtt_client(config, &client_id) {
                Ok(client) => {
                    self.mqtt.insert(key.clone(), client);
                }
                Err(error) => {
                    tracing::warn!(rule, url = %config.url, error = format!("{error:#}"), "MQTT action client");
                    return "error";
                }
            }
        }
        let Some(client) = self.mqtt.get(&key) else {
            return "error";
        };
        let qos = if config.qos == 0 {
            rumqttc::QoS::AtMostOnce
        } else {
            rumqttc::QoS::AtLeastOnce
        };
        match client.try_publish(topic, qos, config.retain, payload.into_bytes()) {
            Ok(()) => "ok",
            Err(error) => {
                tracing::debug!(rule, %error, "MQTT action not queued");
                "queue_full"
            }
        }
    }
}

/// A client and the task that drives its connection (reconnecting with backoff until the
/// client is dropped).
fn mqtt_client(config: &MqttActionConfig, client_id: &str) -> anyhow::Result<rumqttc::AsyncClient> {
    let mut options = rumqttc::MqttOptions::new(client_id, config.host.clone(), config.port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true);
    if let Some(username) = &config.username {
        options.set_credentials(
            username.clone(),
            config.password.clone().unwrap_or_default(),
        );
    }
    if config.tls {
        let ca = config.ca_cert.as_ref().context("mqtts:// needs ca_cert")?;
        options.set_transport(crate::tls::mqtt_tls_transport(ca)?);
    }
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, MQTT_CLIENT_CAPACITY);
    let url = config.url.clone();
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(100);
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    delay = Duration::from_millis(100);
                }
                Ok(_) => {}
                Err(rumqttc::ConnectionError::RequestsDone) => return,
                Err(error) => {
                    tracing::warn!(%url, %error, "MQTT action broker connection");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MQTT_RECONNECT_MAX);
                }
            }
        }
    });
    Ok(client)
}

/// An HTTP client with rustls on ring, trusting the system's roots and `ca_cert`.
fn webhook_client(config: &WebhookActionConfig) -> Result<reqwest::Client, String> {
    let build = || -> anyhow::Result<reqwest::Client> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let extra = match &config.ca_cert {
            Some(path) => crate::tls::load_certs(path)?,
            None => Vec::new(),
        };
        let verifier =
            rustls_platform_verifier::Verifier::new_with_extra_roots(extra, Arc::clone(&provider))
                .context("load the system's root certificates")?;
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS with the ring provider")?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("build the HTTP client")
    };
    build().map_err(|error| format!("{error:#}"))
}

/// POSTs `body`, retrying connection errors, timeouts, 5xx and 429 with doubling backoff.
async fn post(
    client: &reqwest::Client,
    config: &WebhookActionConfig,
    body: String,
) -> Result<(), String> {
    let content_type = if serde_json::from_str::<serde::de::IgnoredAny>(&body).is_ok() {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    let mut backoff = Duration::from_millis(config.retry_backoff_ms);
    let mut last_error = String::new();
    for attempt in 0..=config.max_retries {
        if attempt > 0 {
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2);
        }
        let mut request = client
            .post(&config.url)
            .timeout(Duration::from_millis(config.timeout_ms))
            .header(reqwest::header::CONTENT_TYPE, content_type);
        for (name, value) in &config.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        match request.body(body.clone()).send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => {
                let status = response.status();
                last_error = format!("HTTP {status}");
                let retryable = status.is_server_error() || status.as_u16() == 429;
                if !retryable {
                    return Err(last_error);
                }
            }
            Err(error) => last_error = error.to_string(),
        }
    }
    Err(format!(
        "{last_error} (after {} attempts)",
        config.max_retries + 1
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use runnel_common::SourceKind;
    use runnel_config::LogActionConfig;

    fn log_actions(per_minute: u64, burst: u64) -> Arc<RuleActions> {
        RuleActions::build(
            "r",
            &LocalActions {
                actions: vec![ActionConfig::Log(LogActionConfig {
                    level: LogLevel::Info,
                    message: "{{ name }}".into(),
                })],
                rate_limit: RateLimit { per_minute, burst },
            },
        )
        .expect("builds")
        .expect("has actions")
    }

    #[test]
    fn no_actions_no_rule_actions() {
        assert!(
            RuleActions::build("r", &LocalActions::default())
                .expect("ok")
                .is_none()
        );
    }

    #[test]
    fn the_rate_limit_is_a_token_bucket() {
        let actions = log_actions(60, 3);
        let start = Instant::now();
        let taken = (0..10).filter(|_| actions.try_take(start)).count();
        assert_eq!(taken, 3, "the burst");
        assert!(!actions.try_take(start + Duration::from_millis(500)));
        assert!(
            actions.try_take(start + Duration::from_millis(1000)),
            "one a second"
        );
        assert!(!actions.try_take(start + Duration::from_millis(1100)));
        let later = start + Duration::from_secs(3600);
        let taken = (0..10).filter(|_| actions.try_take(later)).count();
        assert_eq!(taken, 3, "never more than the burst");
    }

    #[test]
    fn dispatch_outside_a_runtime_drops_and_counts() {
        let actions = Actions::default();
        let event = Event::new(SourceKind::Http, "s", "n", 0);
        actions.dispatch(vec![Fired {
            actions: log_actions(60, 1),
            event,
        }]);
        assert!(actions.sender.get().is_some_and(Option::is_none));
    }

    /// A webhook that answers 503 first and 200 next: the action retries and the body is the
    /// rendered template.
    #[tokio::test]
    async fn webhooks_retry_and_send_the_rendered_payload() {
        use axum::http::StatusCode;
        use std::sync::atomic::{AtomicUsize, Ordering};

        let hits = Arc::new(AtomicUsize::new(0));
        let bodies = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post({
                let (hits, bodies) = (Arc::clone(&hits), Arc::clone(&bodies));
                move |headers: axum::http::HeaderMap, body: String| async move {
                    let n = hits.fetch_add(1, Ordering::SeqCst);
                    let key = headers
                        .get("x-key")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    bodies.lock().expect("lock").push((key, body));
                    if n == 0 {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::OK
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });

        let actions = RuleActions::build(
            "hook",
            &LocalActions {
                actions: vec![ActionConfig::Webhook(WebhookActionConfig {
                    url: format!("http://{addr}/hook"),
                    ca_cert: None,
                    payload: Some(r#"{"device": "{{ attrs.device }}"}"#.into()),
                    headers: [("X-Key".to_owned(), "k1".to_owned())].into(),
                    timeout_ms: 5_000,
                    max_retries: 2,
                    retry_backoff_ms: 1,
                })],
                rate_limit: RateLimit::default(),
            },
        )
        .expect("builds")
        .expect("has actions");
        let mut event = Event::new(SourceKind::Http, "s", "n", 0);
        event.attrs.insert(
            "device".into(),
            runnel_common::Value::String("press-4".into()),
        );
        let runner = Actions::default();
        runner.dispatch(vec![Fired { actions, event }]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while bodies.lock().expect("lock").len() < 2 {
            assert!(Instant::now() < deadline, "the webhook was not retried");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let bodies = bodies.lock().expect("lock").clone();
        assert_eq!(bodies.len(), 2, "503, then 200 and no more");
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        for (key, body) in bodies {
            assert_eq!(key, "k1");
            assert_eq!(body, r#"{"device": "press-4"}"#);
        }
    }
}

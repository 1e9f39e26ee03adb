//! `magnetar admin`: the broker's admin HTTP API (`/admin/v1`, see docs/admin.md) from the command
//! line. Owns argument parsing, the cheap client-side checks (name formats, durations, sizes,
//! message ids) and rendering: aligned tables and one-line confirmations, or with `--json` the
//! API's own JSON. It never decides anything the broker decides (policy rules, ownership): those
//! errors come back from the API and are printed as they are.

mod api;
mod table;

use std::io::Write;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use bytesize::ByteSize;
use clap::{Args, Subcommand, ValueEnum};
use magnetar_common::ids::MessageId;
use magnetar_common::topic::{TopicName, validate_name_part, validate_subscription_name};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Map, Value};

use self::api::{Answer, Api};
use self::table::{Table, record};

/// Where `--url` points by default: a broker's `http_addr` on this machine.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Admin API of any broker (its http_addr); every broker answers for the whole cluster.
    #[arg(long, global = true, default_value = DEFAULT_URL, env = "MAGNETAR_ADMIN_URL")]
    url: String,
    /// Print the API's JSON answer (indented) instead of tables; nothing for answers without a body.
    #[arg(long, global = true)]
    json: bool,
    /// Give up on a request after this long (e.g. "10s").
    #[arg(long, global = true, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[command(subcommand)]
    group: Group,
}

#[derive(Debug, Subcommand)]
enum Group {
    /// Live brokers and how many bundles each owns.
    Brokers {
        #[command(subcommand)]
        command: ListOnly,
    },
    /// Live bookies and whether they accept writes.
    Bookies {
        #[command(subcommand)]
        command: ListOnly,
    },
    /// Tenants: the top level of topic names.
    Tenants {
        #[command(subcommand)]
        command: TenantsCmd,
    },
    /// Namespaces (TENANT/NAMESPACE) and their policies: bundles, retention, quorums.
    Namespaces {
        #[command(subcommand)]
        command: NamespacesCmd,
    },
    /// Topics: list, create, delete, stats, owner, unload, apply retention, offload.
    Topics {
        #[command(subcommand)]
        command: TopicsCmd,
    },
    /// Durable subscriptions: list, create, delete, reset, skip the backlog.
    Subscriptions {
        #[command(subcommand)]
        command: SubscriptionsCmd,
    },
}

#[derive(Debug, Subcommand)]
enum ListOnly {
    /// List them.
    List,
}

#[derive(Debug, Subcommand)]
enum TenantsCmd {
    /// List tenants.
    List,
    /// Create a tenant.
    Create {
        /// Tenant name.
        #[arg(value_parser = parse_tenant)]
        tenant: String,
    },
    /// Delete a tenant without namespaces.
    Delete {
        /// Tenant name.
        #[arg(value_parser = parse_tenant)]
        tenant: String,
    },
}

#[derive(Debug, Subcommand)]
enum NamespacesCmd {
    /// List the namespaces of a tenant.
    List {
        /// Tenant name.
        #[arg(value_parser = parse_tenant)]
        tenant: String,
    },
    /// Create a namespace; unset policies take the brokers' defaults.
    Create {
        /// Namespace, as TENANT/NAMESPACE.
        #[arg(value_name = "TENANT/NAMESPACE", value_parser = parse_namespace)]
        namespace: Namespace,
        #[command(flatten)]
        policies: PolicyFlags,
    },
    /// Show a namespace's policies and the values in effect.
    Get {
        /// Namespace, as TENANT/NAMESPACE.
        #[arg(value_name = "TENANT/NAMESPACE", value_parser = parse_namespace)]
        namespace: Namespace,
    },
    /// Change some policies, keeping the others as they are.
    SetPolicies {
        /// Namespace, as TENANT/NAMESPACE.
        #[arg(value_name = "TENANT/NAMESPACE", value_parser = parse_namespace)]
        namespace: Namespace,
        #[command(flatten)]
        policies: PolicyFlags,
        /// Unset retention (keep everything acknowledged).
        #[arg(long, conflicts_with_all = ["retention_time", "retention_size"])]
        clear_retention: bool,
        /// Unset the namespace's offload policy (the broker's [offload_policy] applies).
        #[arg(long, conflicts_with_all = ["offload_threshold", "offload_age", "offload_deletion_lag"])]
        clear_offload: bool,
    },
    /// Delete a namespace without topics.
    Delete {
        /// Namespace, as TENANT/NAMESPACE.
        #[arg(value_name = "TENANT/NAMESPACE", value_parser = parse_namespace)]
        namespace: Namespace,
    },
    /// The namespace's bundles (hash ranges) and the broker owning each.
    Bundles {
        /// Namespace, as TENANT/NAMESPACE.
        #[arg(value_name = "TENANT/NAMESPACE", value_parser = parse_namespace)]
        namespace: Namespace,
    },
}

#[derive(Debug, Subcommand)]
enum TopicsCmd {
    /// List the topics of a namespace.
    List {
        /// Namespace, as TENANT/NAMESPACE.
        #[arg(value_name = "TENANT/NAMESPACE", value_parser = parse_namespace)]
        namespace: Namespace,
    },
    /// Create a topic.
    Create {
        /// NAME (in public/default), TENANT/NAMESPACE/NAME or persistent://TENANT/NAMESPACE/NAME.
        #[arg(value_parser = TopicName::parse)]
        topic: TopicName,
    },
    /// Delete a topic, its messages and its subscriptions.
    Delete {
        /// NAME (in public/default), TENANT/NAMESPACE/NAME or persistent://TENANT/NAMESPACE/NAME.
        #[arg(value_parser = TopicName::parse)]
        topic: TopicName,
        /// Delete even while producers or consumers are attached (they are disconnected).
        #[arg(long)]
        force: bool,
    },
    /// Rates, storage, producers and subscriptions with their backlog.
    Stats {
        /// NAME (in public/default), TENANT/NAMESPACE/NAME or persistent://TENANT/NAMESPACE/NAME.
        #[arg(value_parser = TopicName::parse)]
        topic: TopicName,
    },
    /// The broker owning a topic.
    Lookup {
        /// NAME (in public/default), TENANT/NAMESPACE/NAME or persistent://TENANT/NAMESPACE/NAME.
        #[arg(value_parser = TopicName::parse)]
        topic: TopicName,
    },
    /// Close a topic on its owner (clients reconnect; it loads again on the next use).
    Unload {
        /// NAME (in public/default), TENANT/NAMESPACE/NAME or persistent://TENANT/NAMESPACE/NAME.
        #[arg(value_parser = TopicName::parse)]
        topic: TopicName,
    },
    /// Apply the namespace's retention policy to a topic now (it also runs periodically).
    ApplyRetention {
        /// NAME (in public/default), TENANT/NAMESPACE/NAME or persistent://TENANT/NAMESPACE/NAME.
        #[arg(value_parser = TopicName::parse)]
        topic: TopicName,
    },
    /// Offload every closed ledger of a topic to object storage now. The owner uploads in the
    /// background; --wait follows it to the end.
    Offload {
        /// NAME (in public/default), TENANT/NAMESPACE/NAME or persistent://TENANT/NAMESPACE/NAME.
        #[arg(value_parser = TopicName::parse)]
        topic: TopicName,
        /// Wait until every closed ledger is in object storage.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (e.g. 30s, 10min).
        #[arg(long, default_value = "30min", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Where a topic's entries are (bookies, object storage) and how offloading goes.
    OffloadStatus {
        /// NAME (in public/default), TENANT/NAMESPACE/NAME or persistent://TENANT/NAMESPACE/NAME.
        #[arg(value_parser = TopicName::parse)]
        topic: TopicName,
    },
}

#[derive(Debug, Subcommand)]
enum SubscriptionsCmd {
    /// List a topic's subscriptions with their backlog.
    List {
        /// NAME (in public/default), TENANT/NAMESPACE/NAME or persistent://TENANT/NAMESPACE/NAME.
        #[arg(value_parser = TopicName::parse)]
        topic: TopicName,
    },
    /// Create a durable subscription (no consumer attached).
    Create {
        /// NAME (in public/default), TENANT/NAMESPACE/NAME or persistent://TENANT/NAMESPACE/NAME.
        #[arg(value_parser = TopicName::parse)]
        topic: TopicName,
        /// Subscription name.
        #[arg(value_parser = parse_subscription)]
        subscription: String,
        /// Where it starts: the earliest stored message or after the latest.
        #[arg(long, value_enum, default_value_t = Position::Latest)]
        position: Position,
    },
    /// Delete a subscription and its position.
    Delete {
        /// NAME (in public/default), TENANT/NAMESPACE/NAME or persistent://TENANT/NAMESPACE/NAME.
        #[arg(value_parser = TopicName::parse)]
        topic: TopicName,
        /// Subscription name.
        #[arg(value_parser = parse_subscription)]
        subscription: String,
        /// Delete even while consumers are attached (they are disconnected).
        #[arg(long)]
        force: bool,
    },
    /// Move a subscription: to the earliest message, after the latest, or to a message id
    /// (that message and everything after it are delivered again). Consumers reattach from there.
    Reset {
        /// NAME (in public/default), TENANT/NAMESPACE/NAME or persistent://TENANT/NAMESPACE/NAME.
        #[arg(value_parser = TopicName::parse)]
        topic: TopicName,
        /// Subscription name.
        #[arg(value_parser = parse_subscription)]
        subscription: String,
        /// earliest, latest or LEDGER:ENTRY (a message id as `magnetar produce` prints it).
        #[arg(long, value_name = "earliest|latest|LEDGER:ENTRY", value_parser = parse_reset_target)]
        to: String,
    },
    /// Acknowledge everything stored: the backlog becomes zero.
    SkipAll {
        /// NAME (in public/default), TENANT/NAMESPACE/NAME or persistent://TENANT/NAMESPACE/NAME.
        #[arg(value_parser = TopicName::parse)]
        topic: TopicName,
        /// Subscription name.
        #[arg(value_parser = parse_subscription)]
        subscription: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Position {
    Earliest,
    Latest,
}

impl Position {
    fn as_str(self) -> &'static str {
        match self {
            Position::Earliest => "earliest",
            Position::Latest => "latest",
        }
    }
}

/// Namespace policies given on the command line; what is not given stays unset (create) or
/// unchanged (set-policies).
#[derive(Debug, Args)]
struct PolicyFlags {
    /// Hash ranges the namespace's topics are grouped into, each owned by one broker. Fixed once
    /// the namespace has topics.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    bundles: Option<u32>,
    /// Delete acknowledged ledgers older than this (e.g. "2h", "7days").
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_text)]
    retention_time: Option<String>,
    /// Delete the oldest acknowledged ledgers beyond this much (e.g. "1GiB", "500MB").
    #[arg(long, value_name = "SIZE", value_parser = parse_size_text)]
    retention_size: Option<String>,
    /// Bookies each new ledger is spread over.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    ensemble_size: Option<u64>,
    /// Copies of each entry.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    write_quorum: Option<u64>,
    /// Copies that must be durable before a message is acknowledged.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    ack_quorum: Option<u64>,
    /// Offload the oldest closed ledgers to object storage while a topic's data on bookies
    /// exceeds this (e.g. "10GiB"). Setting any --offload-* flag gives the namespace its own
    /// offload policy instead of the broker's [offload_policy].
    #[arg(long, value_name = "SIZE", value_parser = parse_size_text)]
    offload_threshold: Option<String>,
    /// Offload closed ledgers whose newest entry is older than this (e.g. "4h").
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_text)]
    offload_age: Option<String>,
    /// Keep the bookies' copies this long after a ledger is offloaded (e.g. "1h", "0s").
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_text)]
    offload_deletion_lag: Option<String>,
}

impl PolicyFlags {
    fn is_empty(&self) -> bool {
        self.bundles.is_none()
            && self.retention_time.is_none()
            && self.retention_size.is_none()
            && self.ensemble_size.is_none()
            && self.write_quorum.is_none()
            && self.ack_quorum.is_none()
            && self.offload_threshold.is_none()
            && self.offload_age.is_none()
            && self.offload_deletion_lag.is_none()
    }

    /// Writes the given flags into a policies object (the API's JSON), leaving the rest alone.
    fn apply(&self, p: &mut Map<String, Value>) {
        let mut set = |key: &str, v: Option<Value>| {
            if let Some(v) = v {
                p.insert(key.to_string(), v);
            }
        };
        set("bundles", self.bundles.map(Value::from));
        set("ensemble_size", self.ensemble_size.map(Value::from));
        set("write_quorum", self.write_quorum.map(Value::from));
        set("ack_quorum", self.ack_quorum.map(Value::from));
        set_nested(p, "retention", &[("time", &self.retention_time), ("size", &self.retention_size)]);
        set_nested(
            p,
            "offload",
            &[
                ("threshold", &self.offload_threshold),
                ("age", &self.offload_age),
                ("deletion_lag", &self.offload_deletion_lag),
            ],
        );
    }
}

/// Sets the given fields of the object `p[key]` (created if missing), leaving its other fields;
/// does nothing when no field is given.
fn set_nested(p: &mut Map<String, Value>, key: &str, fields: &[(&str, &Option<String>)]) {
    if fields.iter().all(|(_, v)| v.is_none()) {
        return;
    }
    let object = p.entry(key).or_insert_with(|| Value::Object(Map::new()));
    if !object.is_object() {
        *object = Value::Object(Map::new());
    }
    if let Value::Object(o) = object {
        for (name, value) in fields {
            if let Some(v) = value {
                o.insert((*name).into(), Value::from(v.as_str()));
            }
        }
    }
}

/// `TENANT/NAMESPACE`, checked.
#[derive(Debug, Clone)]
struct Namespace {
    tenant: String,
    namespace: String,
}

impl std::fmt::Display for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.tenant, self.namespace)
    }
}

fn parse_tenant(s: &str) -> Result<String, String> {
    validate_name_part("tenant", s)?;
    Ok(s.to_string())
}

fn parse_namespace(s: &str) -> Result<Namespace, String> {
    let Some((tenant, namespace)) = s.split_once('/') else {
        return Err(format!("namespace {s:?} must look like TENANT/NAMESPACE"));
    };
    if namespace.contains('/') {
        return Err(format!("namespace {s:?} must look like TENANT/NAMESPACE (one slash)"));
    }
    validate_name_part("tenant", tenant)?;
    validate_name_part("namespace", namespace)?;
    Ok(Namespace { tenant: tenant.to_string(), namespace: namespace.to_string() })
}

fn parse_subscription(s: &str) -> Result<String, String> {
    validate_subscription_name(s)?;
    Ok(s.to_string())
}

/// `earliest`, `latest` or a message id, as the API's `?to=` takes it.
fn parse_reset_target(s: &str) -> Result<String, String> {
    let lower = s.to_ascii_lowercase();
    if lower == "earliest" || lower == "latest" {
        return Ok(lower);
    }
    s.parse::<MessageId>().map_err(|e| format!("{e}; or earliest, or latest"))?;
    Ok(s.to_string())
}

/// A duration as the broker reads it ("2h", "7days"), checked here and sent as written.
fn parse_duration_text(s: &str) -> Result<String, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 30min, 2h, 7days)"))?;
    Ok(s.trim().to_string())
}

/// A size as the broker reads it ("1GiB", "500MB"), checked here and sent as written.
fn parse_size_text(s: &str) -> Result<String, String> {
    s.parse::<ByteSize>().map_err(|e| format!("{e} (examples: 500MB, 1GiB)"))?;
    Ok(s.trim().to_string())
}

/// `/admin/v1/topics/TENANT/NAMESPACE/TOPIC`: name parts are checked, so they need no escaping.
fn topic_path(t: &TopicName) -> String {
    format!("/admin/v1/topics/{}/{}/{}", t.tenant(), t.namespace(), t.local_name())
}

fn namespace_path(ns: &Namespace) -> String {
    format!("/admin/v1/namespaces/{}/{}", ns.tenant, ns.namespace)
}

/// Writes to standard output; a closed pipe (`| head`) ends the output quietly.
fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("write to standard output"),
    }
}

struct Ctx {
    api: Api,
    json: bool,
}

impl Ctx {
    /// Prints an answer: its JSON with `--json`, else what `render` makes of it.
    fn show(&self, answer: &Answer, render: impl FnOnce(&Answer) -> anyhow::Result<String>) -> anyhow::Result<()> {
        if self.json {
            return match answer.pretty()? {
                Some(text) => emit(&(text + "\n")),
                None => Ok(()),
            };
        }
        emit(&render(answer)?)
    }

    /// Prints a confirmation line (or with `--json`, the answer's body if it has one).
    fn done(&self, answer: &Answer, line: String) -> anyhow::Result<()> {
        self.show(answer, |_| Ok(line + "\n"))
    }
}

pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    let ctx = Ctx { api: Api::new(&args.url, args.timeout)?, json: args.json };
    match args.group {
        Group::Brokers { command: ListOnly::List } => brokers(&ctx).await,
        Group::Bookies { command: ListOnly::List } => bookies(&ctx).await,
        Group::Tenants { command } => tenants(&ctx, command).await,
        Group::Namespaces { command } => namespaces(&ctx, command).await,
        Group::Topics { command } => topics(&ctx, command).await,
        Group::Subscriptions { command } => subscriptions(&ctx, command).await,
    }
}

// ---- cluster ----

#[derive(Debug, Deserialize)]
struct BrokerView {
    broker_id: String,
    broker_url: String,
    http_url: String,
    #[serde(default)]
    bundles: u64,
    #[serde(default)]
    started_at_ms: u64,
}

#[derive(Debug, Deserialize)]
struct BookieView {
    bookie_id: String,
    address: String,
    #[serde(default)]
    read_only: bool,
}

fn time_of_ms(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

async fn brokers(ctx: &Ctx) -> anyhow::Result<()> {
    let answer = ctx.api.get("/admin/v1/brokers").await?;
    ctx.show(&answer, |a| {
        let mut t = Table::new(&["BROKER", "URL", "HTTP", "BUNDLES", "STARTED"]).right(&[3]);
        for b in a.json::<Vec<BrokerView>>()? {
            t.row(vec![b.broker_id, b.broker_url, b.http_url, b.bundles.to_string(), time_of_ms(b.started_at_ms)]);
        }
        Ok(t.render())
    })
}

async fn bookies(ctx: &Ctx) -> anyhow::Result<()> {
    let answer = ctx.api.get("/admin/v1/bookies").await?;
    ctx.show(&answer, |a| {
        let mut t = Table::new(&["BOOKIE", "ADDRESS", "MODE"]);
        for b in a.json::<Vec<BookieView>>()? {
            t.row(vec![b.bookie_id, b.address, if b.read_only { "read-only" } else { "read-write" }.into()]);
        }
        Ok(t.render())
    })
}

/// One column of names (tenants, namespaces, topics).
fn name_list(header: &str, a: &Answer) -> anyhow::Result<String> {
    let mut t = Table::new(&[header]);
    for name in a.json::<Vec<String>>()? {
        t.row(vec![name]);
    }
    Ok(t.render())
}

async fn tenants(ctx: &Ctx, command: TenantsCmd) -> anyhow::Result<()> {
    let api = &ctx.api;
    match command {
        TenantsCmd::List => ctx.show(&api.get("/admin/v1/tenants").await?, |a| name_list("TENANT", a)),
        TenantsCmd::Create { tenant } => {
            let a = api.call(Method::PUT, &format!("/admin/v1/tenants/{tenant}"), &[], None).await?;
            ctx.done(&a, format!("created tenant {tenant}"))
        }
        TenantsCmd::Delete { tenant } => {
            let a = api.call(Method::DELETE, &format!("/admin/v1/tenants/{tenant}"), &[], None).await?;
            ctx.done(&a, format!("deleted tenant {tenant}"))
        }
    }
}

// ---- namespaces ----

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct NamespaceView {
    namespace: String,
    policies: Map<String, Value>,
    effective: Effective,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Effective {
    bundles: u64,
    quorums: Quorums,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Quorums {
    ensemble_size: u64,
    write_quorum: u64,
    ack_quorum: u64,
}

#[derive(Debug, Deserialize)]
struct BundleView {
    bundle: String,
    owner: Option<String>,
}

/// A JSON scalar as a table cell: strings without quotes, absent as "-".
fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

fn render_namespace(v: &NamespaceView) -> String {
    let p = &v.policies;
    let retention = p.get("retention").and_then(Value::as_object);
    let retention_of = |key: &str| retention.and_then(|r| r.get(key));
    let effective_retention = |key: &str| match retention_of(key) {
        None | Some(Value::Null) => "unlimited".to_string(),
        v => cell(v),
    };
    let q = &v.effective.quorums;
    let mut t = Table::new(&["POLICY", "SET", "EFFECTIVE"]);
    t.row(vec!["bundles".into(), cell(p.get("bundles")), v.effective.bundles.to_string()]);
    t.row(vec!["retention.time".into(), cell(retention_of("time")), effective_retention("time")]);
    t.row(vec!["retention.size".into(), cell(retention_of("size")), effective_retention("size")]);
    t.row(vec!["ensemble_size".into(), cell(p.get("ensemble_size")), q.ensemble_size.to_string()]);
    t.row(vec!["write_quorum".into(), cell(p.get("write_quorum")), q.write_quorum.to_string()]);
    t.row(vec!["ack_quorum".into(), cell(p.get("ack_quorum")), q.ack_quorum.to_string()]);
    let offload = p.get("offload").and_then(Value::as_object);
    for key in ["threshold", "age", "deletion_lag"] {
        let set = offload.map_or_else(|| "(broker default)".to_string(), |o| cell(o.get(key)));
        t.row(vec![format!("offload.{key}"), set, String::new()]);
    }
    format!("namespace {}\n{}", v.namespace, t.render())
}

async fn namespaces(ctx: &Ctx, command: NamespacesCmd) -> anyhow::Result<()> {
    let api = &ctx.api;
    match command {
        NamespacesCmd::List { tenant } => {
            ctx.show(&api.get(&format!("/admin/v1/namespaces/{tenant}")).await?, |a| name_list("NAMESPACE", a))
        }
        NamespacesCmd::Create { namespace, policies } => {
            let mut body = Map::new();
            policies.apply(&mut body);
            let a = api.call(Method::PUT, &namespace_path(&namespace), &[], Some(&Value::Object(body))).await?;
            ctx.done(&a, format!("created namespace {namespace}"))
        }
        NamespacesCmd::Get { namespace } => {
            ctx.show(&api.get(&namespace_path(&namespace)).await?, |a| Ok(render_namespace(&a.json()?)))
        }
        NamespacesCmd::SetPolicies { namespace, policies, clear_retention, clear_offload } => {
            if policies.is_empty() && !clear_retention && !clear_offload {
                anyhow::bail!(
                    "nothing to change: give at least one of --bundles, --retention-time, --retention-size, \
                     --clear-retention, --ensemble-size, --write-quorum, --ack-quorum, --offload-threshold, \
                     --offload-age, --offload-deletion-lag, --clear-offload"
                );
            }
            // Read, change what was given, write the whole object back.
            let current: NamespaceView = api.get(&namespace_path(&namespace)).await?.json()?;
            let mut body = current.policies;
            if clear_retention {
                body.insert("retention".into(), Value::Object(Map::new()));
            }
            if clear_offload {
                body.remove("offload");
            }
            policies.apply(&mut body);
            let body = Value::Object(body);
            let path = format!("{}/policies", namespace_path(&namespace));
            let a = api.call(Method::PUT, &path, &[], Some(&body)).await?;
            ctx.done(&a, format!("set policies of namespace {namespace}: {body}"))
        }
        NamespacesCmd::Delete { namespace } => {
            let a = api.call(Method::DELETE, &namespace_path(&namespace), &[], None).await?;
            ctx.done(&a, format!("deleted namespace {namespace}"))
        }
        NamespacesCmd::Bundles { namespace } => {
            let a = api.get(&format!("{}/bundles", namespace_path(&namespace))).await?;
            ctx.show(&a, |a| {
                let mut t = Table::new(&["BUNDLE", "OWNER"]);
                for b in a.json::<Vec<BundleView>>()? {
                    t.row(vec![b.bundle, b.owner.unwrap_or_else(|| "(unassigned)".into())]);
                }
                Ok(t.render())
            })
        }
    }
}

// ---- topics ----

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TopicStatsView {
    topic: String,
    owner: String,
    msg_rate_in: f64,
    msg_rate_out: f64,
    bytes_rate_in: f64,
    bytes_rate_out: f64,
    msg_in: u64,
    msg_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    storage_bytes: u64,
    ledgers: u64,
    deleting_ledgers: Vec<u64>,
    entries: u64,
    producers: Vec<String>,
    subscriptions: Vec<SubscriptionView>,
    offload: OffloadView,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct OffloadView {
    store: Option<String>,
    state: String,
    bookie_bytes: u64,
    offloaded_bytes: u64,
    offloaded_ledgers: u64,
    pending_ledgers: u64,
    pending_bytes: u64,
    requested_through: Option<u64>,
    last_error: Option<String>,
    retry_in_ms: Option<u64>,
    read_error: Option<String>,
}

impl OffloadView {
    /// Nothing asked for is left to upload.
    fn settled(&self) -> bool {
        self.state != "running" && self.pending_ledgers == 0 && self.requested_through.is_none()
    }

    fn fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            ("on bookies", bytes(self.bookie_bytes)),
            ("in object storage", format!("{} in {} ledgers", bytes(self.offloaded_bytes), self.offloaded_ledgers)),
            (
                "offload",
                match &self.store {
                    Some(store) => format!("{} ({store})", self.state),
                    None => "disabled (no [offload] store configured)".into(),
                },
            ),
            ("offload lag", format!("{} in {} ledgers", bytes(self.pending_bytes), self.pending_ledgers)),
        ];
        if let Some(e) = &self.last_error {
            let retry =
                self.retry_in_ms.map(|ms| format!(" (retrying in {:.1}s)", ms as f64 / 1000.0)).unwrap_or_default();
            f.push(("offload error", format!("{e}{retry}")));
        }
        if let Some(e) = &self.read_error {
            f.push(("read error", e.clone()));
        }
        f
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SubscriptionView {
    name: String,
    durable: bool,
    backlog: u64,
    consumers: u64,
    acked_before: String,
    individually_acked: u64,
}

fn subscriptions_table(subs: &[SubscriptionView]) -> String {
    let mut t = Table::new(&["SUBSCRIPTION", "BACKLOG", "CONSUMERS", "ACKED_BEFORE", "INDIVIDUALLY_ACKED", "DURABLE"])
        .right(&[1, 2, 4]);
    for s in subs {
        t.row(vec![
            s.name.clone(),
            s.backlog.to_string(),
            s.consumers.to_string(),
            s.acked_before.clone(),
            s.individually_acked.to_string(),
            if s.durable { "yes" } else { "no" }.into(),
        ]);
    }
    t.render()
}

fn bytes(n: u64) -> String {
    ByteSize(n).to_string()
}

fn render_stats(s: &TopicStatsView) -> String {
    let rate = |msgs: f64, b: f64| format!("{msgs:.1} msg/s, {}/s", bytes(b.round() as u64));
    let producers = if s.producers.is_empty() { "0".to_string() } else { s.producers.join(", ") };
    let mut storage = format!("{} in {} ledgers, {} entries", bytes(s.storage_bytes), s.ledgers, s.entries);
    if !s.deleting_ledgers.is_empty() {
        let ids: Vec<String> = s.deleting_ledgers.iter().map(u64::to_string).collect();
        storage.push_str(&format!(
            "; {} ledgers off the list still to delete (retried at each retention check): {}",
            ids.len(),
            ids.join(", ")
        ));
    }
    let mut out = record(
        &[
            ("topic", s.topic.clone()),
            ("owner", s.owner.clone()),
            ("rate in", rate(s.msg_rate_in, s.bytes_rate_in)),
            ("rate out", rate(s.msg_rate_out, s.bytes_rate_out)),
            ("messages in", format!("{} ({}) since loaded", s.msg_in, bytes(s.bytes_in))),
            ("messages out", format!("{} ({}) since loaded", s.msg_out, bytes(s.bytes_out))),
            ("storage", storage),
        ]
        .into_iter()
        .chain(s.offload.fields())
        .chain([("producers", producers)])
        .collect::<Vec<_>>(),
    );
    out.push('\n');
    if s.subscriptions.is_empty() {
        out.push_str("no subscriptions\n");
    } else {
        out.push_str(&subscriptions_table(&s.subscriptions));
    }
    out
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TrimmedView {
    deleted_ledgers: Vec<u64>,
    deleted_bytes: u64,
    deleting_ledgers: Vec<u64>,
}

fn render_trimmed(topic: &TopicName, t: &TrimmedView) -> String {
    let ids = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
    let mut line = if t.deleted_ledgers.is_empty() {
        format!("retention of {topic}: nothing to delete")
    } else {
        format!(
            "retention of {topic}: deleted {} ledgers ({}): {}",
            t.deleted_ledgers.len(),
            bytes(t.deleted_bytes),
            ids(&t.deleted_ledgers)
        )
    };
    if !t.deleting_ledgers.is_empty() {
        line.push_str(&format!(
            "; the deletion of {} ledgers did not finish (retried at each retention check): {}",
            t.deleting_ledgers.len(),
            ids(&t.deleting_ledgers)
        ));
    }
    line + "\n"
}

async fn topics(ctx: &Ctx, command: TopicsCmd) -> anyhow::Result<()> {
    let api = &ctx.api;
    match command {
        TopicsCmd::List { namespace } => {
            let path = format!("/admin/v1/topics/{}/{}", namespace.tenant, namespace.namespace);
            ctx.show(&api.get(&path).await?, |a| name_list("TOPIC", a))
        }
        TopicsCmd::Create { topic } => {
            let a = api.call(Method::PUT, &topic_path(&topic), &[], None).await?;
            ctx.done(&a, format!("created topic {topic}"))
        }
        TopicsCmd::Delete { topic, force } => {
            let query: &[(&str, &str)] = if force { &[("force", "true")] } else { &[] };
            let a = api.call(Method::DELETE, &topic_path(&topic), query, None).await?;
            ctx.done(&a, format!("deleted topic {topic}"))
        }
        TopicsCmd::Stats { topic } => {
            let a = api.get(&format!("{}/stats", topic_path(&topic))).await?;
            ctx.show(&a, |a| Ok(render_stats(&a.json()?)))
        }
        TopicsCmd::Lookup { topic } => {
            #[derive(Deserialize)]
            struct Owner {
                topic: String,
                broker_url: String,
                http_url: String,
            }
            let a = api.get(&format!("{}/lookup", topic_path(&topic))).await?;
            ctx.show(&a, |a| {
                let o: Owner = a.json()?;
                Ok(record(&[("topic", o.topic), ("broker", o.broker_url), ("http", o.http_url)]))
            })
        }
        TopicsCmd::Unload { topic } => {
            #[derive(Deserialize)]
            struct Unloaded {
                unloaded: bool,
            }
            let a = api.call(Method::POST, &format!("{}/unload", topic_path(&topic)), &[], None).await?;
            ctx.show(&a, |a| {
                Ok(if a.json::<Unloaded>()?.unloaded {
                    format!("unloaded topic {topic}\n")
                } else {
                    format!("topic {topic} was not loaded\n")
                })
            })
        }
        TopicsCmd::ApplyRetention { topic } => {
            let a = api.call(Method::POST, &format!("{}/retention", topic_path(&topic)), &[], None).await?;
            ctx.show(&a, |a| Ok(render_trimmed(&topic, &a.json()?)))
        }
        TopicsCmd::Offload { topic, wait, timeout } => {
            let path = format!("{}/offload", topic_path(&topic));
            let a = api.call(Method::POST, &path, &[], None).await?;
            if !wait {
                return ctx.show(&a, |a| {
                    let v: OffloadView = a.json()?;
                    Ok(format!(
                        "offload of {topic} requested: {} in {} ledgers to upload\n",
                        bytes(v.pending_bytes),
                        v.pending_ledgers
                    ))
                });
            }
            let deadline = tokio::time::Instant::now() + timeout;
            let mut last_error = None;
            loop {
                let a = api.get(&path).await?;
                let v: OffloadView = a.json()?;
                if v.settled() && v.last_error.is_none() {
                    return ctx.show(&a, |_| {
                        Ok(format!(
                            "offloaded {topic}: {} in {} ledgers in object storage, {} on bookies\n",
                            bytes(v.offloaded_bytes),
                            v.offloaded_ledgers,
                            bytes(v.bookie_bytes)
                        ))
                    });
                }
                if v.last_error.is_some() && v.last_error != last_error {
                    eprintln!("offload of {topic} failed (retrying): {}", v.last_error.as_deref().unwrap_or_default());
                    last_error = v.last_error.clone();
                }
                if tokio::time::Instant::now() >= deadline {
                    anyhow::bail!(
                        "offload of {topic} not finished after {}: {} in {} ledgers left{}",
                        humantime::format_duration(timeout),
                        bytes(v.pending_bytes),
                        v.pending_ledgers,
                        v.last_error.map(|e| format!("; last error: {e}")).unwrap_or_default()
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        TopicsCmd::OffloadStatus { topic } => {
            let a = api.get(&format!("{}/offload", topic_path(&topic))).await?;
            ctx.show(&a, |a| {
                let v: OffloadView = a.json()?;
                let mut f = vec![("topic", topic.to_string())];
                f.extend(v.fields());
                Ok(record(&f))
            })
        }
    }
}

// ---- subscriptions ----

fn subscription_path(topic: &TopicName, subscription: &str) -> String {
    format!("{}/subscriptions/{subscription}", topic_path(topic))
}

async fn subscriptions(ctx: &Ctx, command: SubscriptionsCmd) -> anyhow::Result<()> {
    let api = &ctx.api;
    match command {
        SubscriptionsCmd::List { topic } => {
            let a = api.get(&format!("{}/subscriptions", topic_path(&topic))).await?;
            ctx.show(&a, |a| Ok(subscriptions_table(&a.json::<Vec<SubscriptionView>>()?)))
        }
        SubscriptionsCmd::Create { topic, subscription, position } => {
            let path = subscription_path(&topic, &subscription);
            let a = api.call(Method::PUT, &path, &[("position", position.as_str())], None).await?;
            ctx.done(&a, format!("created subscription {subscription} on {topic} at the {} message", position.as_str()))
        }
        SubscriptionsCmd::Delete { topic, subscription, force } => {
            let query: &[(&str, &str)] = if force { &[("force", "true")] } else { &[] };
            let a = api.call(Method::DELETE, &subscription_path(&topic, &subscription), query, None).await?;
            ctx.done(&a, format!("deleted subscription {subscription} of {topic}"))
        }
        SubscriptionsCmd::Reset { topic, subscription, to } => {
            let path = format!("{}/reset", subscription_path(&topic, &subscription));
            let a = api.call(Method::POST, &path, &[("to", to.as_str())], None).await?;
            ctx.done(&a, format!("reset subscription {subscription} of {topic} to {to}"))
        }
        SubscriptionsCmd::SkipAll { topic, subscription } => {
            let path = format!("{}/skip_all", subscription_path(&topic, &subscription));
            let a = api.call(Method::POST, &path, &[], None).await?;
            ctx.done(&a, format!("skipped the backlog of subscription {subscription} of {topic}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_request() {
        let ns = parse_namespace("acme/orders").expect("valid");
        assert_eq!((ns.tenant.as_str(), ns.namespace.as_str()), ("acme", "orders"));
        assert!(parse_namespace("acme").expect_err("no slash").contains("TENANT/NAMESPACE"));
        assert!(parse_namespace("a/b/c").expect_err("two slashes").contains("TENANT/NAMESPACE"));
        assert!(parse_namespace("acme/or ders").expect_err("space").contains("namespace contains ' '"));
        assert!(parse_tenant("").is_err());
        let t = TopicName::parse("orders").expect("short");
        assert_eq!(topic_path(&t), "/admin/v1/topics/public/default/orders");
    }

    #[test]
    fn reset_targets_durations_and_sizes_are_checked() {
        assert_eq!(parse_reset_target("Earliest").expect("earliest"), "earliest");
        assert_eq!(parse_reset_target("3:7").expect("id"), "3:7");
        assert!(parse_reset_target("sideways").expect_err("bad").contains("LEDGER:ENTRY"));
        assert_eq!(parse_duration_text("2h").expect("2h"), "2h");
        assert!(parse_duration_text("soon").is_err());
        assert_eq!(parse_size_text("1GiB").expect("1GiB"), "1GiB");
        assert!(parse_size_text("lots").is_err());
    }

    #[test]
    fn retention_results_name_deleted_and_unfinished_ledgers() {
        let t = TopicName::parse("orders").expect("topic");
        let none = TrimmedView::default();
        assert_eq!(render_trimmed(&t, &none), "retention of persistent://public/default/orders: nothing to delete\n");
        let some = TrimmedView { deleted_ledgers: vec![3, 4], deleted_bytes: 2048, deleting_ledgers: vec![2, 4] };
        let line = render_trimmed(&t, &some);
        assert!(line.contains("deleted 2 ledgers (2.0 KiB): 3, 4;"), "{line}");
        assert!(
            line.contains("deletion of 2 ledgers did not finish (retried at each retention check): 2, 4"),
            "{line}"
        );
        let left = TrimmedView { deleting_ledgers: vec![2], ..TrimmedView::default() };
        let line = render_trimmed(&t, &left);
        assert!(
            line.starts_with(
                "retention of persistent://public/default/orders: nothing to delete; the deletion of 1 ledgers"
            ),
            "{line}"
        );
    }

    #[test]
    fn policy_flags_change_only_what_is_given() {
        let mut p: Map<String, Value> =
            serde_json::from_str(r#"{"bundles":4,"retention":{"time":"2h","size":"1GiB"}}"#).expect("json");
        let flags = PolicyFlags {
            bundles: None,
            retention_time: Some("30min".into()),
            retention_size: None,
            ensemble_size: Some(3),
            write_quorum: None,
            ack_quorum: None,
            offload_threshold: None,
            offload_age: None,
            offload_deletion_lag: Some("10min".into()),
        };
        flags.apply(&mut p);
        assert_eq!(
            Value::Object(p.clone()),
            serde_json::json!({"bundles":4,"retention":{"time":"30min","size":"1GiB"},"ensemble_size":3,
                "offload":{"deletion_lag":"10min"}})
        );
        let only_offload = PolicyFlags {
            bundles: None,
            retention_time: None,
            retention_size: None,
            ensemble_size: None,
            write_quorum: None,
            ack_quorum: None,
            offload_threshold: Some("1GiB".into()),
            offload_age: None,
            offload_deletion_lag: None,
        };
        assert!(!only_offload.is_empty());
        only_offload.apply(&mut p);
        assert_eq!(p["offload"], serde_json::json!({"threshold":"1GiB","deletion_lag":"10min"}));
        assert_eq!(p["retention"], serde_json::json!({"time":"30min","size":"1GiB"}), "untouched");
    }
}

//! Finding a topic's broker and attaching to it. A lookup asks the bootstrap brokers in turn
//! which broker owns the topic; the producer or consumer stream is then opened on that owner.
//! An attempt that fails for a reason that can pass (no answer, connection lost, the broker is
//! not or no longer the owner, unavailable, shutting down) is retried with capped exponential
//! backoff and jitter until the operation's deadline; then the last cause is reported.
//!
//! Must never: retry what cannot succeed unchanged (a bad topic, an untrusted certificate, a
//! busy exclusive subscription on first attach), or retry past the deadline.

use std::time::Duration;

use magnetar_common::wire::{ErrorCode, Frame};
use tokio::time::Instant;
use tracing::{debug, info};

use crate::client::Channel;
use crate::pool::Pool;
use crate::transport::{self, Connection};
use crate::url::BrokerUrl;
use crate::{Client, Error};

/// How long a broker may take to answer a lookup once connected, before the next is asked.
pub(crate) const LOOKUP_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// First delay between attempts; it doubles per attempt up to [`BACKOFF_MAX`].
pub(crate) const BACKOFF_START: Duration = Duration::from_millis(50);
/// Longest delay between attempts.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Delays between attempts: doubling from [`BACKOFF_START`] to [`BACKOFF_MAX`], each one drawn
/// at random from its upper half, so that clients cut off together do not come back together.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: BACKOFF_START }
    }
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(BACKOFF_MAX);
        let half = d / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// What to attach: a `Producer` or `Subscribe` request for a topic.
#[derive(Debug, Clone)]
pub(crate) struct AttachSpec {
    pub topic: String,
    pub request: Frame,
    /// Names the operation in logs and errors ("create producer", "reconnect consumer"...).
    pub what: &'static str,
    /// Attaching again after losing the stream: the broker may not have noticed yet that the
    /// old stream is gone, so "producer busy" and "consumer busy" are retried too.
    pub reconnect: bool,
}

/// A stream on the topic's owner, and the owner's first answer on it.
#[derive(Debug)]
pub(crate) struct Attached {
    pub channel: Channel,
    pub answer: Frame,
    pub broker: BrokerUrl,
    pub attempts: u32,
}

/// Looks the topic up and opens the stream on its owner, retrying until `deadline`.
pub(crate) async fn attach(client: &Client, spec: &AttachSpec, deadline: Instant) -> Result<Attached, Error> {
    let started = Instant::now();
    let mut backoff = Backoff::default();
    let mut last: Option<Error> = None;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (e, broker) = match tokio::time::timeout_at(deadline, attach_once(client, spec)).await {
            Ok(Ok((channel, answer, broker))) => {
                if attempts > 1 {
                    info!(topic = %spec.topic, what = spec.what, %broker, attempts, "attached");
                }
                return Ok(Attached { channel, answer, broker, attempts });
            }
            Ok(Err(failed)) => failed,
            Err(_) => return Err(give_up(spec, attempts, started, last)),
        };
        if !should_retry(&e, spec.reconnect) || client.pool().is_closed() {
            return Err(e);
        }
        let delay = backoff.next_delay();
        if Instant::now() + delay >= deadline {
            return Err(give_up(spec, attempts, started, Some(e)));
        }
        let broker = broker.map(|b| b.to_string()).unwrap_or_default();
        // The first failure is news; the retries after it (every backoff step while a broker
        // restarts) are not, until the outcome: "attached" or the error that gives up.
        if attempts == 1 {
            info!(topic = %spec.topic, what = spec.what, broker, cause = %e, retry_in = ?delay, "attach failed; retrying");
        } else {
            debug!(topic = %spec.topic, what = spec.what, broker, attempt = attempts, cause = %e, retry_in = ?delay, "attach failed; retrying");
        }
        last = Some(e);
        tokio::time::sleep(delay).await;
    }
}

/// Whether attaching again may succeed after `e`.
pub(crate) fn should_retry(e: &Error, reconnect: bool) -> bool {
    match e {
        Error::Broker { code: ErrorCode::ProducerBusy | ErrorCode::ConsumerBusy, .. } => reconnect,
        e => e.is_retryable(),
    }
}

fn give_up(spec: &AttachSpec, attempts: u32, started: Instant, last: Option<Error>) -> Error {
    match last {
        None => Error::Timeout(spec.what),
        Some(e) => e.context(format_args!(
            "{} {}: gave up after {attempts} attempts in {:.1?}",
            spec.what,
            spec.topic,
            started.elapsed()
        )),
    }
}

/// One attempt: look up, connect to the owner, send the request, read the first answer. On
/// error, the broker that failed, if known.
async fn attach_once(
    client: &Client,
    spec: &AttachSpec,
) -> Result<(Channel, Frame, BrokerUrl), (Error, Option<BrokerUrl>)> {
    let pool = client.pool();
    let owner = lookup(pool, &spec.topic).await.map_err(|e| (e, None))?;
    let fail = |e| (e, Some(owner.clone()));
    let conn = pool.get(&owner).await.map_err(fail)?;
    let (channel, answer) =
        open_channel(&conn, spec.request.clone(), client.operation_timeout()).await.map_err(fail)?;
    Ok((channel, answer, owner))
}

/// Asks the bootstrap brokers in turn which broker owns `topic`. Stops at the first answer, or
/// at a refusal about the topic itself; otherwise reports the last broker's failure.
pub(crate) async fn lookup(pool: &Pool, topic: &str) -> Result<BrokerUrl, Error> {
    let mut last = None;
    for broker in pool.bootstrap_order() {
        match lookup_at(pool, &broker, topic).await {
            Ok(owner) => {
                debug!(topic, %broker, %owner, "looked up");
                return Ok(owner);
            }
            Err(e @ (Error::Broker { .. } | Error::Closed(_))) if !e.is_retryable() => return Err(e),
            Err(e) => {
                debug!(topic, %broker, error = %e, "lookup failed; asking the next broker");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::InvalidArgument("no broker to ask: the service URL lists none".into())))
}

/// Asks one broker. A broker that does not know lookups (it answers `BadRequest`) serves the
/// topic itself, as a single broker did before lookups existed.
async fn lookup_at(pool: &Pool, broker: &BrokerUrl, topic: &str) -> Result<BrokerUrl, Error> {
    let conn = pool.get(broker).await?;
    let exchange = async {
        let (mut writer, mut reader) = conn.open_stream().await?;
        writer.write_frames(&[Frame::Lookup { topic: topic.to_string() }]).await?;
        reader.next().await
    };
    let answer = tokio::time::timeout(LOOKUP_ANSWER_TIMEOUT, exchange)
        .await
        .map_err(|_| Error::Timeout("lookup: wait for the broker's answer"))??;
    match answer {
        Some(Frame::LookupResult { broker_url, .. }) => BrokerUrl::parse(&broker_url).map_err(|e| {
            Error::Protocol(format!("{broker} answered the lookup of {topic} with an unusable broker URL: {e}"))
        }),
        Some(Frame::Error { code: ErrorCode::BadRequest, message }) => {
            debug!(topic, %broker, message, "the broker does not answer lookups; using it for the topic");
            Ok(broker.clone())
        }
        Some(Frame::Error { code, message }) => Err(Error::broker(code, message)),
        Some(other) => Err(Error::Protocol(format!("{broker} answered a lookup with {}", other.name()))),
        None => Err(Error::ConnectionLost(format!("{broker} ended the lookup stream without answering"))),
    }
}

/// Opens a stream on `conn`, sends `first` and returns the broker's first answer. A broker
/// `Error` frame becomes [`Error::Broker`].
async fn open_channel(conn: &Connection, first: Frame, finish_timeout: Duration) -> Result<(Channel, Frame), Error> {
    let (writer, mut reader) = conn.open_stream().await?;
    let (outbox, writer_task) = transport::spawn_writer(writer, finish_timeout);
    outbox.send_all([first]);
    let answer = match reader.next().await? {
        Some(Frame::Error { code, message }) => return Err(Error::broker(code, message)),
        Some(frame) => frame,
        None => return Err(Error::ConnectionLost("the broker ended the stream without answering".into())),
    };
    Ok((Channel { outbox, writer_task, reader }, answer))
}

#[cfg(test)]
mod tests;

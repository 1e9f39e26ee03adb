//! [`Client`]: connections to a Magnetar service, from which producers, consumers and readers
//! are made, each on its own stream to the broker that owns its topic.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use magnetar_common::topic::TopicName;
use tokio::task::JoinHandle;

use crate::pool::Pool;
use crate::transport::{Connector, FrameReader, Outbox};
use crate::url::parse_service_url;
use crate::{ConsumerBuilder, Error, ProducerBuilder, ReaderBuilder};

/// Default time to establish a connection to one broker.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time for one operation (create a producer, subscribe, flush, close, reconnect).
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time after which a connection that hears nothing from its broker is dead.
pub const DEFAULT_CONNECTION_IDLE_TIMEOUT: Duration = crate::transport::DEFAULT_IDLE_TIMEOUT;

/// A handle on a Magnetar service: its bootstrap brokers and a pool of connections, at most one
/// per broker. Cheap to clone; every clone shares the pool. Producers, consumers and readers
/// keep it open while they exist.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

#[derive(Debug)]
struct ClientInner {
    pool: Pool,
    operation_timeout: Duration,
}

/// Configures and connects a [`Client`]; see [`Client::builder`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    url: String,
    trust_cert: Option<PathBuf>,
    server_name: Option<String>,
    connect_timeout: Duration,
    operation_timeout: Duration,
    idle_timeout: Duration,
}

impl ClientBuilder {
    /// A PEM file with the certificate(s) to trust: the broker's self-signed certificate or the
    /// CA that issued it. Required for now (platform roots are not used).
    pub fn tls_trust_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.trust_cert = Some(path.into());
        self
    }

    /// The name every broker's certificate must carry. Default: the host of the broker's URL
    /// (as listed in the service URL or named by a lookup; an IP address must be listed in the
    /// certificate as an IP address), except that a broker a lookup named by IP address must
    /// carry the service URL's DNS name when it has one.
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// How long connecting to one broker may take (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long creating a producer, subscribing, flushing or closing may take, including the
    /// retries of lookups and attachments (default 30 s). It also bounds each reconnection: a
    /// producer or consumer that cannot attach again this long after losing its stream stops,
    /// and its pending operations fail with the last cause.
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// A connection that hears nothing from its broker this long is declared dead, and its
    /// producers and consumers reconnect (default 3 s). Keep-alives go out every third of it, so
    /// a quiet but live connection stays up. This is how quickly a broker that died without
    /// closing its connections (a crash, a network cut) is noticed.
    pub fn connection_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Checks the settings and connects to the first bootstrap broker that answers.
    pub async fn build(self) -> Result<Client, Error> {
        let bootstrap = parse_service_url(&self.url)?;
        let Some(trust_cert) = self.trust_cert else {
            return Err(Error::Tls(
                "no trusted certificate: pass --tls-trust-cert (ClientBuilder::tls_trust_cert) with the \
                 broker's certificate"
                    .into(),
            ));
        };
        for (what, t) in [
            ("connect_timeout", self.connect_timeout),
            ("operation_timeout", self.operation_timeout),
            ("connection_idle_timeout", self.idle_timeout),
        ] {
            if t.is_zero() {
                return Err(Error::InvalidArgument(format!("{what} must be above zero")));
            }
        }
        let connector = Connector::quic(&trust_cert, self.server_name, self.connect_timeout, self.idle_timeout)?;
        let client = Client::with_pool(Pool::new(connector, bootstrap), self.operation_timeout);
        // Connect now, so that a wrong address or certificate shows at once. The most telling
        // failure is reported: a TLS or address problem rather than a broker that is down.
        let mut failure: Option<Error> = None;
        for url in client.pool().bootstrap() {
            match client.pool().get(url).await {
                Ok(_) => return Ok(client),
                Err(e) => {
                    let telling = |e: &Error| !matches!(e, Error::Connect(_));
                    if failure.as_ref().is_none_or(|f| !telling(f)) {
                        failure = Some(e);
                    }
                }
            }
        }
        Err(failure.unwrap_or_else(|| Error::InvalidArgument("the service URL lists no broker".into())))
    }
}

impl Client {
    /// Starts configuring a client for the service URL `url`: `quic://HOST[:PORT]`, or several
    /// bootstrap brokers `quic://HOST1:PORT1,HOST2:PORT2` (port 6650 by default). Any of them
    /// can be asked where a topic is served; the client then connects to that broker.
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            url: url.into(),
            trust_cert: None,
            server_name: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
            idle_timeout: DEFAULT_CONNECTION_IDLE_TIMEOUT,
        }
    }

    fn with_pool(pool: Pool, operation_timeout: Duration) -> Client {
        Client { inner: Arc::new(ClientInner { pool, operation_timeout }) }
    }

    /// Starts configuring a producer for `topic`.
    pub fn producer(&self, topic: impl Into<String>) -> ProducerBuilder {
        ProducerBuilder::new(self.clone(), topic.into())
    }

    /// Starts configuring a consumer of `subscription` on `topic`.
    pub fn subscribe(&self, topic: impl Into<String>, subscription: impl Into<String>) -> ConsumerBuilder {
        ConsumerBuilder::new(self.clone(), topic.into(), subscription.into())
    }

    /// Starts configuring a reader of `topic`.
    pub fn reader(&self, topic: impl Into<String>) -> ReaderBuilder {
        ReaderBuilder::new(self.clone(), topic.into())
    }

    /// Closes every connection now; producers and consumers stop, without reconnecting. What
    /// they have not sent yet is lost: close them first (their `close` waits for receipts and
    /// sends pending acknowledgements).
    pub async fn close(&self) {
        self.inner.pool.close().await;
    }

    pub(crate) fn operation_timeout(&self) -> Duration {
        self.inner.operation_timeout
    }

    pub(crate) fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// A client of brokers played by the test: the service URL `url` lists some of the
    /// brokers of `net` (see [`crate::transport::MemoryNet::add`]).
    #[cfg(test)]
    pub(crate) fn in_memory_net(url: &str, net: &crate::transport::MemoryNet, operation_timeout: Duration) -> Client {
        let bootstrap = parse_service_url(url).expect("a test service URL");
        Client::with_pool(Pool::new(Connector::Memory(net.clone()), bootstrap), operation_timeout)
    }

    /// A client of one broker played by the test: lookups are answered for it (it owns every
    /// topic), every other stream goes to the returned receiver.
    #[cfg(test)]
    pub(crate) fn in_memory(operation_timeout: Duration) -> (Client, crate::transport::MemoryStreams) {
        use magnetar_common::wire::Frame;

        const URL: &str = "quic://memory:6650";
        let net = crate::transport::MemoryNet::default();
        let mut incoming = net.add(URL);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some((mut w, mut r)) = incoming.recv().await {
                match r.next().await {
                    Ok(Some(Frame::Lookup { topic })) => {
                        let answer = Frame::LookupResult { topic, broker_url: URL.into(), http_url: String::new() };
                        let _ = w.write_frames(&[answer]).await;
                    }
                    Ok(Some(first)) => {
                        r.unread(&first);
                        if tx.send((w, r)).is_err() {
                            return;
                        }
                    }
                    Ok(None) | Err(_) => {}
                }
            }
        });
        (Client::in_memory_net(URL, &net, operation_timeout), rx)
    }
}

/// An open producer or consumer stream: its writer task's queue and its reader.
#[derive(Debug)]
pub(crate) struct Channel {
    pub outbox: Outbox,
    pub writer_task: JoinHandle<Result<(), Error>>,
    pub reader: FrameReader,
}

/// Checks a topic name locally, so a typo fails before anything is sent.
pub(crate) fn check_topic(topic: &str) -> Result<(), Error> {
    TopicName::parse(topic).map(|_| ()).map_err(|e| Error::InvalidArgument(e.to_string()))
}

/// Checks a name that goes on the wire as a short string.
pub(crate) fn check_short_string(what: &str, value: &str) -> Result<(), Error> {
    if value.len() > u16::MAX as usize {
        return Err(Error::InvalidArgument(format!("{what} is {} bytes; the maximum is {}", value.len(), u16::MAX)));
    }
    Ok(())
}

/// The writer task's outcome, once it has stopped unexpectedly.
pub(crate) fn writer_stopped(joined: Result<Result<(), Error>, tokio::task::JoinError>) -> Error {
    match joined {
        Ok(Err(e)) => e,
        Ok(Ok(())) => Error::Closed("the stream was finished".into()),
        Err(e) => Error::Closed(format!("the stream's writer task failed: {e}")),
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A random lowercase hex string of 16 characters.
pub(crate) fn random_hex() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn build_needs_a_valid_url_and_a_trusted_certificate() {
        let err = Client::builder("http://localhost:6650").build().await.expect_err("scheme");
        assert!(matches!(&err, Error::InvalidArgument(m) if m.contains("quic://")), "{err:?}");
        let err = Client::builder("quic://127.0.0.1:6650").build().await.expect_err("no cert");
        assert!(
            matches!(&err, Error::Tls(m) if m.contains("no trusted certificate: pass --tls-trust-cert")),
            "{err:?}"
        );
        let err = Client::builder("quic://127.0.0.1:6650")
            .tls_trust_cert("/nonexistent/cert.pem")
            .build()
            .await
            .expect_err("missing cert");
        assert!(matches!(&err, Error::Tls(m) if m.contains("/nonexistent/cert.pem")), "{err:?}");
    }

    #[test]
    fn topics_are_checked_locally() {
        assert!(check_topic("my-topic").is_ok());
        assert!(check_topic("persistent://public/default/t").is_ok());
        let err = check_topic("a b").expect_err("space");
        assert!(matches!(&err, Error::InvalidArgument(m) if m.contains("contains ' '")), "{err:?}");
    }
}

//! [`Client`]: one connection to a broker, from which producers, consumers and readers are made,
//! each on its own stream.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use magnetar_common::topic::TopicName;
use magnetar_common::wire::Frame;
use tokio::task::JoinHandle;

use crate::transport::{self, Connection, FrameReader, Outbox};
use crate::url::BrokerUrl;
use crate::{ConsumerBuilder, Error, ProducerBuilder, ReaderBuilder};

/// Default time to establish the connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time for one operation (create a producer, subscribe, flush, close).
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to one broker. Cheap to clone; every clone shares the connection. Producers,
/// consumers and readers keep the connection open while they exist.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

#[derive(Debug)]
struct ClientInner {
    conn: Connection,
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
}

impl ClientBuilder {
    /// A PEM file with the certificate(s) to trust: the broker's self-signed certificate or the
    /// CA that issued it. Required for now (platform roots are not used).
    pub fn tls_trust_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.trust_cert = Some(path.into());
        self
    }

    /// The name the broker's certificate must carry. Default: the URL's host, or `localhost`
    /// when the host is an IP address.
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// How long connecting may take (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long creating a producer, subscribing, flushing or closing may take (default 30 s).
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Connects to the broker.
    pub async fn build(self) -> Result<Client, Error> {
        let url = BrokerUrl::parse(&self.url)?;
        let Some(trust_cert) = self.trust_cert else {
            return Err(Error::Tls(
                "no trusted certificate: pass --tls-trust-cert (ClientBuilder::tls_trust_cert) with the \
                 broker's certificate"
                    .into(),
            ));
        };
        for (what, t) in [("connect_timeout", self.connect_timeout), ("operation_timeout", self.operation_timeout)] {
            if t.is_zero() {
                return Err(Error::InvalidArgument(format!("{what} must be above zero")));
            }
        }
        let server_name = self.server_name.unwrap_or_else(|| url.default_server_name());
        let conn = transport::connect(&url, &server_name, &trust_cert, self.connect_timeout).await?;
        Ok(Client { inner: Arc::new(ClientInner { conn, operation_timeout: self.operation_timeout }) })
    }
}

impl Client {
    /// Starts configuring a client for `url` (`quic://HOST[:PORT]`, port 6650 by default).
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            url: url.into(),
            trust_cert: None,
            server_name: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
        }
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

    /// Closes the connection now. What producers and consumers have not sent yet is lost: close
    /// them first (their `close` waits for receipts and sends pending acknowledgements).
    pub async fn close(&self) {
        self.inner.conn.close().await;
    }

    pub(crate) fn operation_timeout(&self) -> Duration {
        self.inner.operation_timeout
    }

    /// Opens a stream, sends `first` and returns the broker's first answer. A broker `Error`
    /// frame becomes [`Error::Broker`]; `what` names the operation in timeouts.
    pub(crate) async fn open_channel(&self, first: Frame, what: &'static str) -> Result<(Channel, Frame), Error> {
        let timeout = self.inner.operation_timeout;
        let work = async {
            let (writer, mut reader) = self.inner.conn.open_stream().await?;
            let (outbox, writer_task) = transport::spawn_writer(writer, timeout);
            outbox.send_all([first]);
            let answer = match reader.next().await? {
                Some(Frame::Error { code, message }) => return Err(Error::broker(code, message)),
                Some(frame) => frame,
                None => return Err(Error::Closed("the broker ended the stream without answering".into())),
            };
            Ok((Channel { outbox, writer_task, reader }, answer))
        };
        tokio::time::timeout(timeout, work).await.map_err(|_| Error::Timeout(what))?
    }

    /// A client whose streams go to the returned receiver, where a test plays the broker.
    #[cfg(test)]
    pub(crate) fn in_memory(
        operation_timeout: Duration,
    ) -> (Client, tokio::sync::mpsc::UnboundedReceiver<(transport::FrameWriter, FrameReader)>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let inner = ClientInner { conn: Connection::Memory(tx), operation_timeout };
        (Client { inner: Arc::new(inner) }, rx)
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

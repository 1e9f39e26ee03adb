//! Broker URLs: `quic://HOST[:PORT]`, and service URLs listing several bootstrap brokers,
//! `quic://HOST[:PORT],HOST[:PORT]...`. Parsing only; resolving hosts is the transport's job.

use std::fmt;
use std::net::IpAddr;

use magnetar_common::addr::HostPort;

use crate::Error;

/// The port a broker listens on when the URL names none.
pub const DEFAULT_PORT: u16 = 6650;

/// A parsed broker URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct BrokerUrl {
    /// Host name or IP literal, without IPv6 brackets.
    pub host: String,
    pub port: u16,
}

/// Parses a service URL: `quic://` followed by one or more comma-separated `HOST[:PORT]`
/// (IPv6 literals bracketed). Duplicates are dropped, the order is kept.
pub(crate) fn parse_service_url(url: &str) -> Result<Vec<BrokerUrl>, Error> {
    let bad = |why: String| Error::InvalidArgument(format!("invalid broker URL {url:?}: {why}"));
    let Some(rest) = url.strip_prefix("quic://") else {
        return Err(bad(
            "expected quic://HOST[:PORT] or quic://HOST1:PORT1,HOST2:PORT2 (for example quic://127.0.0.1:6650)".into(),
        ));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@']) {
        return Err(bad("expected quic://HOST[:PORT] with no path, query or user".into()));
    }
    let parts: Vec<&str> = rest.split(',').collect();
    let mut brokers: Vec<BrokerUrl> = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let broker = parse_host_port(part.trim()).map_err(|why| {
            if parts.len() > 1 { bad(format!("broker {} of {}: {why}", i + 1, parts.len())) } else { bad(why.into()) }
        })?;
        if !brokers.contains(&broker) {
            brokers.push(broker);
        }
    }
    Ok(brokers)
}

/// Parses `HOST[:PORT]`; the error says what is wrong.
fn parse_host_port(s: &str) -> Result<BrokerUrl, &'static str> {
    let HostPort { host, port } = HostPort::parse(s, Some(DEFAULT_PORT))?;
    Ok(BrokerUrl { host, port })
}

impl BrokerUrl {
    /// Parses `quic://HOST[:PORT][/]`; IPv6 literals are bracketed (`quic://[::1]:6650`).
    pub fn parse(url: &str) -> Result<Self, Error> {
        let mut brokers = parse_service_url(url)?;
        if brokers.len() != 1 {
            return Err(Error::InvalidArgument(format!("invalid broker URL {url:?}: expected one broker")));
        }
        Ok(brokers.remove(0))
    }

    /// The name to check the broker's certificate against: the host as given, a DNS name or an
    /// IP address (which the certificate must list as an IP address, as browsers and curl
    /// require; a standalone broker's self-signed certificate lists 127.0.0.1 and ::1).
    /// `ClientBuilder::server_name` overrides it.
    pub fn default_server_name(&self) -> String {
        self.host.clone()
    }

    /// Whether the host is an IP address rather than a DNS name.
    pub fn is_ip(&self) -> bool {
        self.host.parse::<IpAddr>().is_ok()
    }
}

/// The canonical form, `quic://host:port` (IPv6 bracketed): two URLs name the same broker
/// exactly when their canonical forms are equal.
impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "quic://{}", HostPort { host: self.host.clone(), port: self.port })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> BrokerUrl {
        BrokerUrl::parse(s).expect(s)
    }

    #[test]
    fn accepts_hosts_ports_and_ipv6() {
        assert_eq!(parse("quic://127.0.0.1:6650"), BrokerUrl { host: "127.0.0.1".into(), port: 6650 });
        assert_eq!(parse("quic://broker.example:7000/"), BrokerUrl { host: "broker.example".into(), port: 7000 });
        assert_eq!(parse("quic://localhost"), BrokerUrl { host: "localhost".into(), port: DEFAULT_PORT });
        assert_eq!(parse("quic://[::1]:6651"), BrokerUrl { host: "::1".into(), port: 6651 });
        assert_eq!(parse("quic://[::1]"), BrokerUrl { host: "::1".into(), port: DEFAULT_PORT });
    }

    #[test]
    fn refuses_other_forms_with_the_reason() {
        for (url, needle) in [
            ("pulsar://localhost:6650", "expected quic://"),
            ("localhost:6650", "expected quic://"),
            ("quic://", "host is empty"),
            ("quic://:6650", "host is empty"),
            ("quic://host:0", "port must be"),
            ("quic://host:70000", "port must be"),
            ("quic://host:abc", "port must be"),
            ("quic://host/path", "no path"),
            ("quic://::1", "brackets"),
            ("quic://[::1", "closing"),
            ("quic://[nope]:1", "not an IPv6"),
            ("quic://[::1]x", "':PORT'"),
        ] {
            let err = BrokerUrl::parse(url).expect_err(url);
            assert!(matches!(err, Error::InvalidArgument(_)), "{url}: {err:?}");
            assert!(err.to_string().contains(needle), "{url}: {err}");
        }
    }

    #[test]
    fn service_urls_list_several_brokers() {
        let list = parse_service_url("quic://b1:6651, b2 ,[::1]:7000,B1:6651/").expect("list");
        assert_eq!(
            list,
            vec![
                BrokerUrl { host: "b1".into(), port: 6651 },
                BrokerUrl { host: "b2".into(), port: DEFAULT_PORT },
                BrokerUrl { host: "::1".into(), port: 7000 },
            ],
            "duplicates dropped, order kept, hosts lowercased"
        );
        let err = parse_service_url("quic://b1:1,,b3").expect_err("empty");
        assert!(err.to_string().contains("broker 2 of 3: host is empty"), "{err}");
        let err = parse_service_url("quic://b1:1,b2:x").expect_err("port");
        assert!(err.to_string().contains("broker 2 of 2: port must be"), "{err}");
        let err = BrokerUrl::parse("quic://b1,b2").expect_err("one");
        assert!(err.to_string().contains("expected one broker"), "{err}");
    }

    #[test]
    fn display_is_the_canonical_url() {
        assert_eq!(parse("quic://Broker-0:7000/").to_string(), "quic://broker-0:7000");
        assert_eq!(parse("quic://[::1]").to_string(), "quic://[::1]:6650");
        assert_eq!(parse(&parse("quic://[::1]").to_string()), parse("quic://[::1]"));
    }

    #[test]
    fn the_certificate_is_checked_against_the_host_as_given() {
        assert_eq!(parse("quic://127.0.0.1").default_server_name(), "127.0.0.1");
        assert_eq!(parse("quic://[::1]").default_server_name(), "::1");
        assert_eq!(parse("quic://broker-0.magnetar").default_server_name(), "broker-0.magnetar");
    }
}

//! Broker URLs: `quic://HOST[:PORT]`. Parsing only; resolving the host is the transport's job.

use std::net::IpAddr;

use crate::Error;

/// The port a broker listens on when the URL names none.
pub const DEFAULT_PORT: u16 = 6650;

/// A parsed broker URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BrokerUrl {
    /// Host name or IP literal, without IPv6 brackets.
    pub host: String,
    pub port: u16,
}

impl BrokerUrl {
    /// Parses `quic://HOST[:PORT][/]`; IPv6 literals are bracketed (`quic://[::1]:6650`).
    pub fn parse(url: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::InvalidArgument(format!("invalid broker URL {url:?}: {why}"));
        let Some(rest) = url.strip_prefix("quic://") else {
            return Err(bad("expected quic://HOST[:PORT] (for example quic://127.0.0.1:6650)"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) {
            return Err(bad("expected quic://HOST[:PORT] with no path, query or user"));
        }
        let (host, port) = if let Some(after) = rest.strip_prefix('[') {
            let Some((host, tail)) = after.split_once(']') else {
                return Err(bad("IPv6 address has no closing ']'"));
            };
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad("the part in [] is not an IPv6 address"));
            }
            let port = match tail {
                "" => None,
                t => Some(t.strip_prefix(':').ok_or_else(|| bad("expected ':PORT' after ']'"))?),
            };
            (host, port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, _)) if h.contains(':') => {
                    return Err(bad("IPv6 addresses must be in brackets: quic://[::1]:6650"));
                }
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(bad("host is empty"));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(bad("port must be a number from 1 to 65535")),
                Ok(p) => p,
            },
        };
        Ok(BrokerUrl { host: host.to_string(), port })
    }

    /// The name to check the broker's certificate against: the host, except `localhost` for an
    /// IP literal, so that connecting by address works with a certificate that names only host
    /// names (a standalone broker's self-signed certificate names localhost, 127.0.0.1 and ::1).
    /// `ClientBuilder::server_name` overrides it.
    pub fn default_server_name(&self) -> String {
        if self.host.parse::<IpAddr>().is_ok() { "localhost".to_string() } else { self.host.clone() }
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
    fn ip_literals_check_the_certificate_as_localhost() {
        assert_eq!(parse("quic://127.0.0.1").default_server_name(), "localhost");
        assert_eq!(parse("quic://[::1]").default_server_name(), "localhost");
        assert_eq!(parse("quic://broker-0.magnetar").default_server_name(), "broker-0.magnetar");
    }
}

//! `HOST[:PORT]` as every address in Magnetar is written: broker URLs, advertised addresses,
//! etcd endpoints. IPv6 literals go in brackets (`[::1]:6650`), as in URLs and as `tokio` and
//! `std` resolve them. Parsing only; resolving the host is the caller's job.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// A host (DNS name or IP literal, without brackets, lower case) and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl HostPort {
    /// Parses `HOST:PORT`, or `HOST` alone when a `default_port` is given (`None`: the port is
    /// required). The error says what is wrong, for the caller to put beside the value.
    pub fn parse(s: &str, default_port: Option<u16>) -> Result<HostPort, &'static str> {
        let (host, port) = if let Some(after) = s.strip_prefix('[') {
            let Some((host, tail)) = after.split_once(']') else {
                return Err("IPv6 address has no closing ']'");
            };
            if host.parse::<Ipv6Addr>().is_err() {
                return Err("the part in [] is not an IPv6 address");
            }
            let port = match tail {
                "" => None,
                t => Some(t.strip_prefix(':').ok_or("expected ':PORT' after ']'")?),
            };
            (host, port)
        } else {
            match s.rsplit_once(':') {
                Some((h, _)) if h.contains(':') => return Err("IPv6 addresses must be in brackets, as in [::1]:6650"),
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        if host.is_empty() {
            return Err("host is empty");
        }
        if host.contains(|c: char| c.is_whitespace() || c.is_control() || "/?#@[]".contains(c)) {
            return Err("host has a character no host name or address has");
        }
        let port = match (port, default_port) {
            (Some(p), _) => match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err("port must be a number from 1 to 65535"),
                Ok(p) => p,
            },
            (None, Some(p)) => p,
            (None, None) => return Err("expected HOST:PORT"),
        };
        Ok(HostPort { host: host.to_ascii_lowercase(), port })
    }

    /// Whether the host is an IP address rather than a DNS name.
    pub fn is_ip(&self) -> bool {
        self.host.parse::<IpAddr>().is_ok()
    }

    /// Whether the host is this machine: `localhost` or a loopback address.
    pub fn is_loopback(&self) -> bool {
        self.host == "localhost" || self.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

/// `host:port`, IPv6 literals bracketed: parses back to the same value.
impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(host: &str, port: u16) -> HostPort {
        HostPort { host: host.into(), port }
    }

    #[test]
    fn hosts_ports_and_bracketed_ipv6_parse_and_print_back() {
        for (text, want) in [
            ("127.0.0.1:6650", hp("127.0.0.1", 6650)),
            ("Broker-0.Magnetar.svc:7000", hp("broker-0.magnetar.svc", 7000)),
            ("[::1]:6651", hp("::1", 6651)),
            ("[fe80::1]:1", hp("fe80::1", 1)),
        ] {
            let got = HostPort::parse(text, None).expect(text);
            assert_eq!(got, want);
            assert_eq!(HostPort::parse(&got.to_string(), None).expect("round trip"), want);
        }
        assert_eq!(HostPort::parse("localhost", Some(6650)).expect("default"), hp("localhost", 6650));
        assert_eq!(HostPort::parse("[::1]", Some(6650)).expect("default"), hp("::1", 6650));
        assert_eq!(hp("::1", 6650).to_string(), "[::1]:6650");
    }

    #[test]
    fn each_malformed_address_says_what_is_wrong() {
        for (text, why) in [
            ("localhost", "expected HOST:PORT"),
            (":6650", "host is empty"),
            ("::1:6650", "must be in brackets"),
            ("[::1:6650", "no closing ']'"),
            ("[nope]:6650", "not an IPv6 address"),
            ("[::1]6650", "expected ':PORT'"),
            ("host:0", "from 1 to 65535"),
            ("host:65536", "from 1 to 65535"),
            ("host:http", "from 1 to 65535"),
            ("a host:6650", "character"),
            ("user@host:6650", "character"),
        ] {
            let err = HostPort::parse(text, None).expect_err(text);
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn loopback_and_ip_hosts_are_told_apart() {
        assert!(hp("localhost", 1).is_loopback() && hp("127.0.0.2", 1).is_loopback() && hp("::1", 1).is_loopback());
        assert!(!hp("10.0.0.1", 1).is_loopback() && !hp("broker", 1).is_loopback());
        assert!(hp("10.0.0.1", 1).is_ip() && hp("::1", 1).is_ip() && !hp("localhost", 1).is_ip());
    }
}

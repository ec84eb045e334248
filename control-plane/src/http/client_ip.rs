//! The client's address, for the failed-authentication budget and the audit log: the TCP
//! peer, or — only when the peer is a trusted proxy (`TRUSTED_PROXIES`) — the rightmost
//! address of `X-Forwarded-For` that is not itself a trusted proxy. Entries left of that
//! one were written by the client and prove nothing.

use std::net::IpAddr;

use axum::http::{Extensions, HeaderMap};
use ipnet::IpNet;

use super::context::RequestContext;

pub fn client_ip(
    extensions: &Extensions,
    headers: &HeaderMap,
    trusted: &[IpNet],
) -> Option<IpAddr> {
    let peer = RequestContext::peer(extensions)?.ip();
    Some(forwarded_client(peer, headers, trusted))
}

fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&ip))
}

/// Walks `X-Forwarded-For` (every such header, in order) from the right while the hop is
/// trusted; an unreadable entry ends the walk at the last readable hop.
fn forwarded_client(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.trim().parse::<IpAddr>() else {
            break;
        };
        client = ip.to_canonical();
        if !is_trusted(client, trusted) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn client(peer: &str, xff: &[&str], trusted: &[&str]) -> String {
        let trusted: Vec<IpNet> = trusted.iter().map(|t| t.parse().unwrap()).collect();
        forwarded_client(peer.parse().unwrap(), &headers(xff), &trusted).to_string()
    }

    #[test]
    fn forwarded_for_counts_only_from_trusted_proxies() {
        // Untrusted peer: its header is ignored.
        assert_eq!(client("198.51.100.9", &["1.2.3.4"], &[]), "198.51.100.9");
        assert_eq!(
            client("198.51.100.9", &["1.2.3.4"], &["10.0.0.0/8"]),
            "198.51.100.9"
        );
        // Trusted peer: the rightmost untrusted hop; what the client wrote left of it is not it.
        let trusted = ["10.0.0.0/8"];
        assert_eq!(
            client("10.0.0.2", &["1.2.3.4, 203.0.113.5"], &trusted),
            "203.0.113.5"
        );
        assert_eq!(
            client("10.0.0.2", &["1.2.3.4", "203.0.113.5, 10.0.0.7"], &trusted),
            "203.0.113.5"
        );
        assert_eq!(
            client("10.0.0.2", &["2001:db8::1"], &trusted),
            "2001:db8::1"
        );
        // No header, or all hops trusted: the innermost one seen.
        assert_eq!(client("10.0.0.2", &[], &trusted), "10.0.0.2");
        assert_eq!(client("10.0.0.2", &["10.0.0.3"], &trusted), "10.0.0.3");
        // Garbage stops the walk at the last readable hop.
        assert_eq!(
            client("10.0.0.2", &["1.2.3.4, nonsense"], &trusted),
            "10.0.0.2"
        );
        assert_eq!(
            client("::ffff:10.0.0.2", &["203.0.113.5"], &trusted),
            "203.0.113.5"
        );
    }
}

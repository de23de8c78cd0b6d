//! Which address a request came from: the connecting peer, unless that peer is a proxy the
//! operator trusts (Kong's `trusted_ips`, with `real_ip_header: X-Forwarded-For` and
//! `real_ip_recursive: on`). Then the client is the right-most `X-Forwarded-For` entry that is
//! not itself a trusted proxy. A client's own `X-Forwarded-For` therefore never picks its
//! rate-limit bucket: only addresses the trusted proxies appended count.

use std::net::IpAddr;

use http::HeaderMap;

/// The proxies whose `X-Forwarded-For` is believed: addresses or CIDR blocks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrustedProxies(Vec<(IpAddr, u8)>);

impl TrustedProxies {
    /// Nobody is trusted: the peer is the client.
    pub fn none() -> TrustedProxies {
        TrustedProxies::default()
    }

    /// Parses `10.0.0.0/8, 192.168.1.7, ::1` (empty: nobody); the error names the bad entry.
    pub fn parse(list: &str) -> Result<TrustedProxies, String> {
        let mut blocks = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (addr, bits) = match entry.split_once('/') {
                Some((addr, bits)) => (addr, Some(bits)),
                None => (entry, None),
            };
            let ip: IpAddr = addr
                .parse()
                .map_err(|_| format!("`{entry}` is not an IP address or CIDR block"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let bits = match bits {
                None => max,
                Some(bits) => bits
                    .parse::<u8>()
                    .ok()
                    .filter(|b| *b <= max)
                    .ok_or_else(|| format!("`{entry}`: the prefix length must be 0 to {max}"))?,
            };
            blocks.push((ip, bits));
        }
        Ok(TrustedProxies(blocks))
    }

    /// Whether `ip` is one of the trusted proxies.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|(block, bits)| within(ip, *block, *bits))
    }

    /// The client's address for a request from `peer` with `headers`.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let mut hops: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|hop| hop.trim().parse().ok())
            .collect();
        // Walk back from the hop nearest us; the first untrusted one is the client.
        let leftmost = hops.first().copied();
        while let Some(hop) = hops.pop() {
            if !self.trusts(hop) {
                return hop;
            }
        }
        leftmost.unwrap_or(peer)
    }
}

fn within(ip: IpAddr, block: IpAddr, bits: u8) -> bool {
    match (ip, block) {
        (IpAddr::V4(ip), IpAddr::V4(block)) => prefix(
            u128::from(u32::from(ip)) << 96,
            u128::from(u32::from(block)) << 96,
            bits,
        ),
        (IpAddr::V6(ip), IpAddr::V6(block)) => prefix(u128::from(ip), u128::from(block), bits),
        _ => false,
    }
}

fn prefix(a: u128, b: u128, bits: u8) -> bool {
    let mask = if bits == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(bits))
    };
    a & mask == b & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xff(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", value.parse().unwrap());
        headers
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let trusted = TrustedProxies::parse("10.0.0.0/8").unwrap();
        let peer: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(trusted.client(peer, &xff("1.2.3.4")), peer);
        assert_eq!(TrustedProxies::none().client(peer, &xff("1.2.3.4")), peer);
    }

    #[test]
    fn behind_trusted_proxies_the_client_is_the_last_untrusted_hop() {
        let trusted = TrustedProxies::parse("10.0.0.0/8, 192.168.1.7").unwrap();
        let peer: IpAddr = "10.1.2.3".parse().unwrap();
        // The client forged the first entry; the proxies appended the real one and themselves.
        let headers = xff("6.6.6.6, 198.51.100.4, 192.168.1.7");
        assert_eq!(
            trusted.client(peer, &headers),
            "198.51.100.4".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            trusted.client(peer, &HeaderMap::new()),
            peer,
            "no header: the proxy itself"
        );
    }

    #[test]
    fn bad_entries_are_named() {
        assert!(TrustedProxies::parse("10.0.0.0/33")
            .unwrap_err()
            .contains("10.0.0.0/33"));
        assert!(TrustedProxies::parse("proxy.local")
            .unwrap_err()
            .contains("proxy.local"));
        assert_eq!(TrustedProxies::parse(" ").unwrap(), TrustedProxies::none());
        assert!(TrustedProxies::parse("::1, 0.0.0.0/0")
            .unwrap()
            .trusts("8.8.8.8".parse().unwrap()));
    }
}

//! Per-client rate limit of the public routes.
//!
//! The client is the TCP peer, unless the peer is a trusted proxy
//! (`CASEBOOK_TRUSTED_PROXIES`): then it is the rightmost address of
//! `X-Forwarded-For` that is not itself a trusted proxy (the leftmost
//! entries are whatever the client chose to send). Each client gets
//! `CASEBOOK_RATE_LIMIT_PER_CLIENT` requests a minute (GCRA, `governor`);
//! over it, `429` with `Retry-After`, before the handler runs, so nothing is
//! stored. The limiter forgets idle clients as it goes, so its memory stays
//! bounded by the clients of the last minute.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;

use crate::error::ApiError;

/// How many checks between sweeps of idle clients.
const SWEEP_EVERY: u64 = 1024;
/// Past this many tracked clients, sweep on every check.
const MAX_TRACKED: usize = 100_000;

/// Which peers may tell us the client's address.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> Self {
        Self(nets)
    }

    /// Parses `CASEBOOK_TRUSTED_PROXIES`: comma-separated addresses or
    /// CIDRs.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut nets = Vec::new();
        for item in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let net = match item.parse::<IpNet>() {
                Ok(net) => net,
                Err(_) => match item.parse::<IpAddr>() {
                    Ok(ip) => IpNet::from(ip),
                    Err(_) => return Err(format!("{item:?} is not an address or a CIDR")),
                },
            };
            nets.push(net);
        }
        Ok(Self(nets))
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// The client a request comes from.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.trusts(peer) {
            return peer;
        }
        // Every X-Forwarded-For header, in order, as one list.
        let mut hops: Vec<IpAddr> = Vec::new();
        for value in headers.get_all("x-forwarded-for") {
            let Ok(value) = value.to_str() else {
                return peer;
            };
            for item in value.split(',') {
                match parse_hop(item.trim()) {
                    Some(ip) => hops.push(canonical(ip)),
                    // Garbage from a hop we cannot read past: the last
                    // trusted address is the client we know.
                    None => hops.clear(),
                }
            }
        }
        let mut client = peer;
        for hop in hops.into_iter().rev() {
            client = hop;
            if !self.trusts(hop) {
                break;
            }
        }
        client
    }
}

fn parse_hop(item: &str) -> Option<IpAddr> {
    if let Ok(ip) = item.parse::<IpAddr>() {
        return Some(ip);
    }
    // `1.2.3.4:5678` or `[::1]:5678`.
    item.parse::<SocketAddr>().ok().map(|s| s.ip())
}

/// IPv4-mapped IPv6 addresses count as the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The per-client limiter; `None` inside when the limit is off.
#[derive(Clone)]
pub struct ClientLimiter {
    limiter: Option<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
    proxies: TrustedProxies,
    checks: Arc<AtomicU64>,
}

impl std::fmt::Debug for ClientLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientLimiter")
            .field("enabled", &self.limiter.is_some())
            .finish_non_exhaustive()
    }
}

impl ClientLimiter {
    /// `per_minute` requests a minute per client (0: no limit).
    pub fn new(per_minute: u32, proxies: TrustedProxies) -> Self {
        let limiter =
            NonZeroU32::new(per_minute).map(|n| Arc::new(RateLimiter::keyed(Quota::per_minute(n))));
        Self {
            limiter,
            proxies,
            checks: Arc::new(AtomicU64::new(0)),
        }
    }

    /// `Err(wait)` when `client` is over its limit.
    pub fn check(&self, client: IpAddr) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let n = self.checks.fetch_add(1, Ordering::Relaxed);
        if n % SWEEP_EVERY == SWEEP_EVERY - 1 || limiter.len() > MAX_TRACKED {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        limiter
            .check_key(&client)
            .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))
    }

    pub fn tracked(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }
}

/// Middleware: refuses a client over its limit with `429` and `Retry-After`.
pub async fn limit(State(limiter): State<ClientLimiter>, req: Request, next: Next) -> Response {
    if limiter.limiter.is_none() {
        return next.run(req).await;
    }
    let Some(peer) = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
    else {
        // Served without connection info (not through `serve`): nothing to
        // key on, and no client to blame.
        return next.run(req).await;
    };
    let client = limiter.proxies.client(peer, req.headers());
    match limiter.check(client) {
        Ok(()) => next.run(req).await,
        Err(wait) => ApiError::RateLimited {
            retry_after: wait.as_secs().max(1) + u64::from(wait.subsec_nanos() > 0),
        }
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_for_is_believed_only_from_a_trusted_proxy() {
        let proxies = TrustedProxies::parse("10.0.0.0/8, 192.168.1.1").unwrap();
        let xff = headers(&["203.0.113.9"]);
        assert_eq!(proxies.client(ip("198.51.100.7"), &xff), ip("198.51.100.7"));
        assert_eq!(proxies.client(ip("10.1.2.3"), &xff), ip("203.0.113.9"));
        assert_eq!(proxies.client(ip("192.168.1.1"), &xff), ip("203.0.113.9"));
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let proxies = TrustedProxies::parse("10.0.0.0/8").unwrap();
        // The client forged the first entry; our proxies appended the rest.
        let xff = headers(&["1.1.1.1, 203.0.113.9", "10.0.0.5"]);
        assert_eq!(proxies.client(ip("10.0.0.1"), &xff), ip("203.0.113.9"));
        // Only trusted hops: the leftmost one is as far as we can see.
        let xff = headers(&["10.0.0.7, 10.0.0.5"]);
        assert_eq!(proxies.client(ip("10.0.0.1"), &xff), ip("10.0.0.7"));
        // Unreadable entries stop the walk at what was appended after them.
        let xff = headers(&["evil, 10.0.0.5"]);
        assert_eq!(proxies.client(ip("10.0.0.1"), &xff), ip("10.0.0.5"));
        assert_eq!(
            proxies.client(ip("::ffff:10.0.0.1"), &headers(&["[2001:db8::1]:443"])),
            ip("2001:db8::1")
        );
    }

    #[test]
    fn bad_proxy_lists_are_refused() {
        assert!(TrustedProxies::parse("10.0.0.0/33").is_err());
        assert!(TrustedProxies::parse("proxy.local").is_err());
        assert!(TrustedProxies::parse("").unwrap().0.is_empty());
    }

    #[test]
    fn a_client_over_its_limit_waits_and_others_do_not() {
        let limiter = ClientLimiter::new(2, TrustedProxies::default());
        let a = ip("203.0.113.1");
        assert!(limiter.check(a).is_ok());
        assert!(limiter.check(a).is_ok());
        let wait = limiter.check(a).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(30));
        assert!(limiter.check(ip("203.0.113.2")).is_ok());
        assert!(ClientLimiter::new(0, TrustedProxies::default())
            .check(a)
            .is_ok());
    }
}

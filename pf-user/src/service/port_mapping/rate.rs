//! Per-client request limits: a token bucket per tunnel address, so a client looping too fast
//! is answered "out of resources" and slows nobody else.

use std::{collections::HashMap, net::Ipv4Addr, time::Instant};

/// Clients remembered at most; past it, those whose bucket has refilled are forgotten (they
/// would start full anyway).
const MAX_CLIENTS: usize = 65_536;

pub struct Buckets {
    rate: f64,
    burst: f64,
    clients: HashMap<Ipv4Addr, (f64, Instant)>,
}

impl Buckets {
    /// `rate` requests a second, in bursts of up to twice that.
    pub fn new(rate: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: 2.0 * f64::from(rate),
            clients: HashMap::new(),
        }
    }

    /// Whether `client` may ask now (and takes a token if so).
    pub fn allow(&mut self, client: Ipv4Addr, now: Instant) -> bool {
        if self.clients.len() >= MAX_CLIENTS && !self.clients.contains_key(&client) {
            let (rate, burst) = (self.rate, self.burst);
            self.clients.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = self.clients.entry(client).or_insert((self.burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.rate)
            .min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_fast_client_is_held_to_its_rate_and_others_are_not() {
        let mut b = Buckets::new(10);
        let t0 = Instant::now();
        let fast = Ipv4Addr::new(10, 8, 0, 2);
        let calm = Ipv4Addr::new(10, 8, 0, 3);
        let allowed = (0..100).filter(|_| b.allow(fast, t0)).count();
        assert_eq!(allowed, 20, "the burst is twice the rate");
        assert!(b.allow(calm, t0), "another client is not slowed");
        assert!(!b.allow(fast, t0 + Duration::from_millis(50)));
        assert!(b.allow(fast, t0 + Duration::from_millis(150)));
    }
}

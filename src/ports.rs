//! Hands out UDP ports for ICE from the configured range, one per viewer session.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};

/// Shared pool over `[min, max]`; `min == 0` means "let the OS pick".
#[derive(Clone)]
pub struct PortPool {
    range: Option<(u16, u16)>,
    in_use: Arc<Mutex<BTreeSet<u16>>>,
}

/// A port held for one session; returned to the pool on drop.
pub struct PortLease {
    pub port: u16,
    pool: Option<PortPool>,
}

impl Drop for PortLease {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.lock().remove(&self.port);
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("no free UDP port in webrtc.udp_port_min..=udp_port_max ({0}..={1})")]
pub struct NoFreePort(pub u16, pub u16);

impl PortPool {
    pub fn new(min: u16, max: u16) -> Self {
        Self {
            range: (min != 0).then_some((min, max)),
            in_use: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<u16>> {
        // A poisoned set of integers is still a valid set of integers.
        self.in_use.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Picks a port free on every address in `addrs`.
    pub fn lease(&self, addrs: &[IpAddr]) -> Result<PortLease, NoFreePort> {
        let Some((min, max)) = self.range else {
            return Ok(PortLease {
                port: 0,
                pool: None,
            });
        };
        let mut in_use = self.lock();
        for port in min..=max {
            if in_use.contains(&port) {
                continue;
            }
            // Another program may hold it: probe before handing it out.
            let free = addrs
                .iter()
                .all(|ip| UdpSocket::bind(SocketAddr::new(*ip, port)).is_ok());
            if free {
                in_use.insert(port);
                return Ok(PortLease {
                    port,
                    pool: Some(self.clone()),
                });
            }
        }
        Err(NoFreePort(min, max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LO: [IpAddr; 1] = [IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)];

    #[test]
    fn any_port_when_unconfigured() {
        assert_eq!(PortPool::new(0, 0).lease(&LO).unwrap().port, 0);
    }

    #[test]
    fn leases_are_distinct_and_returned() {
        // Find a small free range first.
        let base = (40000..60000)
            .step_by(7)
            .find(|p| (0..3).all(|i| UdpSocket::bind(("127.0.0.1", p + i)).is_ok()))
            .unwrap();
        let pool = PortPool::new(base, base + 2);
        let a = pool.lease(&LO).unwrap();
        let b = pool.lease(&LO).unwrap();
        let c = pool.lease(&LO).unwrap();
        assert_eq!(
            BTreeSet::from([a.port, b.port, c.port]),
            BTreeSet::from([base, base + 1, base + 2])
        );
        assert!(pool.lease(&LO).is_err());
        drop(b);
        assert!(pool.lease(&LO).is_ok());
    }

    #[test]
    fn ports_held_by_others_are_skipped() {
        let held = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let pool = PortPool::new(port, port);
        assert!(pool.lease(&LO).is_err());
    }
}

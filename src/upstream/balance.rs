//! Server choice: `random` (uniform) and `p2c` (two uniform picks, fewer in flight wins).
//!
//! Pure functions over the eligible servers and an RNG: no cookie, no hash, no memory of
//! earlier picks, so nothing ties a client to a server. `exclude` holds servers already
//! tried by this request (a retry must go elsewhere).

use std::net::SocketAddr;
use std::sync::Arc;

use rand::Rng;

use super::server::Server;
use crate::config::Balance;

pub fn pick<'a, R: Rng + ?Sized>(
    balance: Balance,
    servers: &'a [Arc<Server>],
    exclude: &[SocketAddr],
    rng: &mut R,
) -> Option<&'a Arc<Server>> {
    match balance {
        Balance::Random => pick_random(servers, exclude, rng),
        Balance::P2c => pick_p2c(servers, exclude, rng),
    }
}

/// Uniform over `servers` minus `exclude`.
pub fn pick_random<'a, R: Rng + ?Sized>(
    servers: &'a [Arc<Server>],
    exclude: &[SocketAddr],
    rng: &mut R,
) -> Option<&'a Arc<Server>> {
    if servers.is_empty() {
        return None;
    }
    if exclude.is_empty() {
        return Some(&servers[rng.random_range(0..servers.len())]);
    }
    // A retry excludes one or two servers: drawing again is uniform over the rest and
    // almost always done in one or two draws; the scan is only for sets mostly excluded.
    for _ in 0..4 {
        let s = &servers[rng.random_range(0..servers.len())];
        if !exclude.contains(&s.addr) {
            return Some(s);
        }
    }
    let allowed = servers.iter().filter(|s| !exclude.contains(&s.addr)).count();
    if allowed == 0 {
        return None;
    }
    let nth = rng.random_range(0..allowed);
    servers.iter().filter(|s| !exclude.contains(&s.addr)).nth(nth)
}

/// Power of two choices: two distinct uniform picks, the one with fewer requests in
/// flight wins (ties go to the first). Keeps load even without any shared state.
pub fn pick_p2c<'a, R: Rng + ?Sized>(
    servers: &'a [Arc<Server>],
    exclude: &[SocketAddr],
    rng: &mut R,
) -> Option<&'a Arc<Server>> {
    if !exclude.is_empty() {
        let allowed: Vec<&Arc<Server>> = servers.iter().filter(|s| !exclude.contains(&s.addr)).collect();
        return two_choices(allowed.len(), rng).map(|(a, b)| better(allowed[a], allowed[b]));
    }
    two_choices(servers.len(), rng).map(|(a, b)| better(&servers[a], &servers[b]))
}

fn two_choices<R: Rng + ?Sized>(n: usize, rng: &mut R) -> Option<(usize, usize)> {
    match n {
        0 => None,
        1 => Some((0, 0)),
        _ => {
            let a = rng.random_range(0..n);
            // A second index uniform over the other n-1.
            let b = (a + 1 + rng.random_range(0..n - 1)) % n;
            Some((a, b))
        }
    }
}

fn better<'a>(a: &'a Arc<Server>, b: &'a Arc<Server>) -> &'a Arc<Server> {
    if b.in_flight() < a.in_flight() { b } else { a }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::server::ServerState;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn servers(n: u16) -> Vec<Arc<Server>> {
        (0..n).map(|i| Server::new(SocketAddr::from(([127, 0, 0, 1], 1000 + i)), ServerState::Healthy)).collect()
    }

    #[test]
    fn random_is_uniform_and_honours_exclude() {
        let s = servers(4);
        let mut rng = SmallRng::seed_from_u64(7);
        let mut counts = [0usize; 4];
        for _ in 0..40_000 {
            let p = pick_random(&s, &[s[3].addr], &mut rng).map(|p| p.addr.port() - 1000);
            counts[p.unwrap_or(3) as usize] += 1;
        }
        assert_eq!(counts[3], 0);
        for c in &counts[..3] {
            assert!((12_500..14_200).contains(c), "{counts:?}");
        }
        assert!(pick_random(&s[..1], &[s[0].addr], &mut rng).is_none());
        assert!(pick_random(&[], &[], &mut rng).is_none());
    }

    #[test]
    fn p2c_prefers_the_less_loaded() {
        let s = servers(2);
        let _busy: Vec<_> = (0..5).map(|_| s[0].begin()).collect();
        let mut rng = SmallRng::seed_from_u64(1);
        for _ in 0..100 {
            assert_eq!(pick_p2c(&s, &[], &mut rng).map(|p| p.addr), Some(s[1].addr));
        }
        assert_eq!(pick_p2c(&s, &[s[1].addr], &mut rng).map(|p| p.addr), Some(s[0].addr));
    }
}

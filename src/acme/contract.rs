//! The contract every [`Storage`] backend keeps, as a runnable check.
//!
//! `run(a, b)` takes two handles on the same, empty store (two processes, two replicas,
//! two Redis connections) and returns the first broken promise. The directory backend's
//! unit test runs it; a Redis backend's test runs it unchanged.

use std::time::Duration;

use super::storage::{Storage, StorageError};

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

fn e(what: &str) -> impl Fn(StorageError) -> String + '_ {
    move |err| format!("{what}: {err}")
}

/// Runs every check; `a` and `b` must view the same empty store.
pub async fn run(a: &dyn Storage, b: &dyn Storage) -> Result<(), String> {
    values(a, b).await?;
    renames(a, b).await?;
    listing(a, b).await?;
    invalid_keys(a).await?;
    locks(a, b).await?;
    expiry(a, b).await?;
    fencing(a, b).await?;
    contention(a, b).await?;
    Ok(())
}

async fn renames(a: &dyn Storage, b: &dyn Storage) -> Result<(), String> {
    a.put("c/r", b"kept as stored").await.map_err(e("put"))?;
    ensure!(a.rename("c/r", "c/r.aside").await.map_err(e("rename"))?, "rename must say it moved a value");
    ensure!(b.get("c/r").await.map_err(e("get renamed"))?.is_none(), "a renamed key must read as None");
    ensure!(b.list("c/").await.map_err(e("list"))?.contains(&"c/r.aside".to_string()), "the new key must be listed");
    match b.get("c/r.aside").await {
        Ok(v) => ensure!(v.as_deref() == Some(&b"kept as stored"[..]), "the value must be under its new key"),
        // A sealed value is bound to its key: moved as stored, it opens under no other.
        Err(StorageError::Sealed(_)) => {}
        Err(other) => return Err(format!("get moved: {other}")),
    }
    ensure!(!b.rename("c/r", "c/r.again").await.map_err(e("rename missing"))?, "renaming a missing key moves nothing");
    ensure!(a.get("c/r.again").await.map_err(e("get"))?.is_none(), "nothing may appear under the new key");
    a.delete("c/r.aside").await.map_err(e("delete"))?;
    Ok(())
}

async fn values(a: &dyn Storage, b: &dyn Storage) -> Result<(), String> {
    ensure!(a.get("c/missing").await.map_err(e("get missing"))?.is_none(), "a missing key must read as None");
    let bin: Vec<u8> = (0..=255u8).chain([0, 0, 255]).collect();
    a.put("c/v", &bin).await.map_err(e("put"))?;
    ensure!(
        b.get("c/v").await.map_err(e("get"))?.as_deref() == Some(&bin[..]),
        "a value written by one handle must read back byte for byte from the other"
    );
    b.put("c/v", b"second").await.map_err(e("overwrite"))?;
    ensure!(a.get("c/v").await.map_err(e("get"))?.as_deref() == Some(&b"second"[..]), "put must replace the value");
    a.put("c/empty", b"").await.map_err(e("put empty"))?;
    ensure!(
        b.get("c/empty").await.map_err(e("get empty"))?.as_deref() == Some(&b""[..]),
        "an empty value is a value, not a missing key"
    );
    a.delete("c/v").await.map_err(e("delete"))?;
    ensure!(b.get("c/v").await.map_err(e("get deleted"))?.is_none(), "a deleted key must read as None");
    b.delete("c/v").await.map_err(e("delete missing"))?;
    a.delete("c/empty").await.map_err(e("delete"))?;
    Ok(())
}

async fn listing(a: &dyn Storage, b: &dyn Storage) -> Result<(), String> {
    for k in ["l/certs/b.pem", "l/certs/a.pem", "l/accounts/x.json", "l/certsx"] {
        a.put(k, k.as_bytes()).await.map_err(e("put"))?;
    }
    let got = b.list("l/certs/").await.map_err(e("list"))?;
    ensure!(
        got == ["l/certs/a.pem", "l/certs/b.pem"],
        "list(\"l/certs/\") must give exactly the keys under it, sorted; got {got:?}"
    );
    let all = b.list("l/").await.map_err(e("list"))?;
    ensure!(
        all == ["l/accounts/x.json", "l/certs/a.pem", "l/certs/b.pem", "l/certsx"],
        "list must be a plain prefix match over every key, sorted; got {all:?}"
    );
    for k in all {
        a.delete(&k).await.map_err(e("delete"))?;
    }
    let left = a.list("l/").await.map_err(e("list"))?;
    ensure!(left.is_empty(), "deleted keys must not be listed: {left:?}");
    Ok(())
}

async fn invalid_keys(a: &dyn Storage) -> Result<(), String> {
    for bad in ["", "/abs", "a//b", "../escape", "a/../b", ".hidden", "sp ace"] {
        let r = a.put(bad, b"x").await;
        ensure!(
            matches!(r, Err(StorageError::InvalidKey(_))),
            "put({bad:?}) must be refused as an invalid key, got {r:?}"
        );
    }
    let r = a.lock("a/b", Duration::from_secs(1)).await;
    ensure!(matches!(r, Err(StorageError::InvalidKey(_))), "a lock name with '/' must be refused, got {r:?}");
    Ok(())
}

async fn locks(a: &dyn Storage, b: &dyn Storage) -> Result<(), String> {
    let ttl = Duration::from_secs(30);
    let la = a.lock("k1", ttl).await.map_err(e("lock"))?.ok_or("a free lock must be granted")?;
    ensure!(b.lock("k1", ttl).await.map_err(e("lock"))?.is_none(), "a held lock must not be granted to another handle");
    ensure!(
        a.lock("k1", ttl).await.map_err(e("lock"))?.is_none(),
        "a held lock must not be granted again (it is not re-entrant)"
    );
    let lb = b.lock("k2", ttl).await.map_err(e("lock"))?.ok_or("another name must be free")?;
    ensure!(lb.token > la.token, "fencing tokens must increase: {} then {}", la.token, lb.token);
    let renewed =
        a.renew(&la, Duration::from_secs(60)).await.map_err(e("renew"))?.ok_or("the holder must be able to renew")?;
    ensure!(
        renewed.token == la.token && renewed.expires > la.expires,
        "renewal keeps the token and extends the lease: {la:?} -> {renewed:?}"
    );
    // Releasing someone else's lease (same name, other grant) must do nothing.
    let forged = super::storage::Lease { holder: "someone-else".into(), ..la.clone() };
    b.unlock(&forged).await.map_err(e("unlock"))?;
    ensure!(b.renew(&forged, ttl).await.map_err(e("renew"))?.is_none(), "renewing with another holder's id must fail");
    ensure!(
        b.lock("k1", ttl).await.map_err(e("lock"))?.is_none(),
        "a lease must survive an unlock by a different grant"
    );
    a.unlock(&renewed).await.map_err(e("unlock"))?;
    let again = b.lock("k1", ttl).await.map_err(e("lock"))?.ok_or("a released lock must be free")?;
    ensure!(again.token > lb.token, "tokens keep increasing after release");
    ensure!(
        a.renew(&la, ttl).await.map_err(e("renew"))?.is_none(),
        "a released lease cannot be renewed once another holder has the lock"
    );
    b.unlock(&again).await.map_err(e("unlock"))?;
    b.unlock(&lb).await.map_err(e("unlock"))?;
    Ok(())
}

async fn expiry(a: &dyn Storage, b: &dyn Storage) -> Result<(), String> {
    let short =
        a.lock("k3", Duration::from_millis(200)).await.map_err(e("lock"))?.ok_or("a free lock must be granted")?;
    tokio::time::sleep(Duration::from_millis(350)).await;
    let next = b
        .lock("k3", Duration::from_secs(30))
        .await
        .map_err(e("lock"))?
        .ok_or("an expired lease must be granted to the next caller")?;
    ensure!(next.token > short.token, "a takeover gets a greater token");
    ensure!(
        a.renew(&short, Duration::from_secs(30)).await.map_err(e("renew"))?.is_none(),
        "an expired lease taken over by someone else cannot be renewed"
    );
    a.unlock(&short).await.map_err(e("unlock"))?;
    ensure!(
        a.lock("k3", Duration::from_secs(30)).await.map_err(e("lock"))?.is_none(),
        "the stale holder's unlock must not release the new holder's lease"
    );
    b.unlock(&next).await.map_err(e("unlock"))?;
    Ok(())
}

async fn fencing(a: &dyn Storage, b: &dyn Storage) -> Result<(), String> {
    let ttl = Duration::from_secs(30);
    let old = a.lock("f1", ttl).await.map_err(e("lock"))?.ok_or("lock")?;
    a.unlock(&old).await.map_err(e("unlock"))?;
    let new = b.lock("f1", ttl).await.map_err(e("lock"))?.ok_or("lock")?;
    b.put_fenced("f/cert", b"new", new.token).await.map_err(e("fenced put"))?;
    let stale = a.put_fenced("f/cert", b"old", old.token).await;
    ensure!(
        matches!(stale, Err(StorageError::Fenced { .. })),
        "a write with an older token must be refused as Fenced, got {stale:?}"
    );
    ensure!(
        a.get("f/cert").await.map_err(e("get"))?.as_deref() == Some(&b"new"[..]),
        "a refused fenced write must leave the newer value"
    );
    b.put_fenced("f/cert", b"new2", new.token).await.map_err(e("same token writes again"))?;
    // Fences are per key: the old token may still write a key nobody fenced higher.
    a.put_fenced("f/other", b"x", old.token).await.map_err(e("fenced put on another key"))?;
    b.unlock(&new).await.map_err(e("unlock"))?;
    let newer = a.lock("f1", ttl).await.map_err(e("lock"))?.ok_or("lock")?;
    a.put_fenced("f/cert", b"newer", newer.token).await.map_err(e("a greater token writes"))?;
    ensure!(
        b.get("f/cert").await.map_err(e("get"))?.as_deref() == Some(&b"newer"[..]),
        "the greatest token's value must be kept"
    );
    a.unlock(&newer).await.map_err(e("unlock"))?;
    for k in ["f/cert", "f/other"] {
        a.delete(k).await.map_err(e("delete"))?;
    }
    Ok(())
}

async fn contention(a: &dyn Storage, b: &dyn Storage) -> Result<(), String> {
    let ttl = Duration::from_secs(30);
    let attempts = (0..8).map(|i| {
        let s = if i % 2 == 0 { a } else { b };
        async move { s.lock("race", ttl).await }
    });
    let results = futures_join_all(attempts).await;
    let mut granted = Vec::new();
    for r in results {
        if let Some(l) = r.map_err(e("lock"))? {
            granted.push(l);
        }
    }
    ensure!(granted.len() == 1, "exactly one of 8 concurrent lock calls must win, {} did", granted.len());
    for l in granted {
        a.unlock(&l).await.map_err(e("unlock"))?;
    }
    Ok(())
}

/// Polls every future concurrently (no `futures` dependency needed).
async fn futures_join_all<F: Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set: Vec<std::pin::Pin<Box<F>>> = futs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    out.into_iter().flatten().collect()
}

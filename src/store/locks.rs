//! Single-flight sweeps across replicas. A full sweep by one replica covers every row, so a
//! second replica sweeping at the same time would only repeat its reads (its writes are
//! guarded anyway). Each worker's sweep therefore takes a session-level advisory lock, held
//! on a pooled connection for the length of the sweep; if its holder dies, the connection dies
//! and the lock with it.

use deadpool_postgres::{Object, Pool};
use tracing::warn;

use super::StoreError;

/// `pg_try_advisory_lock` keys, one per worker's sweep: "milosw" and the worker's number.
/// Operators can see a sweep in progress in `pg_locks` (`locktype = 'advisory'`, `objid` the
/// low 32 bits of the key).
pub const SLOT_RECOVERY_SWEEP: i64 = 0x6d69_6c6f_7377_0001;
pub const BOT_HEALTH_SWEEP: i64 = 0x6d69_6c6f_7377_0002;

/// A held sweep lock. Release it with [`SweepLock::release`]; dropped without that, its
/// connection is closed rather than returned to the pool, which frees the lock.
pub struct SweepLock {
    client: Option<Object>,
    key: i64,
}

/// Takes the lock if nobody holds it; `None` if another sweep (in any replica) is running.
pub async fn try_sweep(pool: &Pool, key: i64) -> Result<Option<SweepLock>, StoreError> {
    let client = pool.get().await?;
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
        .await?
        .get(0);
    Ok(locked.then_some(SweepLock {
        client: Some(client),
        key,
    }))
}

impl SweepLock {
    pub async fn release(mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        match client
            .execute("SELECT pg_advisory_unlock($1)", &[&self.key])
            .await
        {
            Ok(_) => drop(client),
            Err(error) => {
                let key = self.key;
                warn!(%error, key, "could not release a sweep lock; closing its session");
                drop(Object::take(client));
            }
        }
    }
}

impl Drop for SweepLock {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            // Cancelled or failed midway: the session may still hold the lock, so it must not
            // go back to the pool.
            drop(Object::take(client));
        }
    }
}

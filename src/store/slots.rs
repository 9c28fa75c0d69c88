//! Statements on `bot_pool_slots`.
//!
//! Claims are row locks: a batch locks its slots with `FOR UPDATE SKIP LOCKED`, makes its
//! platform calls, writes the outcome and commits. Another worker or replica skips a locked
//! slot instead of waiting for it, so no slot ever has two platform calls in flight, and a
//! claim dies with its transaction (see `db::pool` for the lease that bounds it).

use std::time::{Duration, SystemTime};

use deadpool_postgres::Transaction;

use super::{secs, Rows, StoreError};
use crate::status::SlotStatus;

/// A slot as it stood when it was claimed.
#[derive(Debug, Clone)]
pub struct SlotRow {
    pub id: i32,
    pub status: SlotStatus,
    pub coolify_service_uuid: String,
    pub assigned_bot_id: Option<i32>,
    pub recovery_attempts: i32,
    pub error_message: Option<String>,
    /// When the slot entered its status: `last_used_at` for a deploying slot, else the
    /// trigger's record.
    pub status_since: Option<SystemTime>,
}

/// Slots in `error`, and slots `deploying` for longer than the deploy timeout.
const CANDIDATE: &str = "(s.status = 'error'
      OR (s.status = 'deploying'
          AND coalesce(s.last_used_at, ss.since, timezone('UTC', now()))
              < timezone('UTC', now()) - make_interval(secs => $1)))";

const COLUMNS: &str = "s.id, s.status, s.coolify_service_uuid, s.assigned_bot_id,
    s.recovery_attempts, s.error_message,
    CASE WHEN s.status = 'deploying' THEN coalesce(s.last_used_at, ss.since) ELSE ss.since END";

fn slot_row(row: &tokio_postgres::Row) -> SlotRow {
    SlotRow {
        id: row.get(0),
        status: SlotStatus::parse(row.get(1)),
        coolify_service_uuid: row.get(2),
        assigned_bot_id: row.get(3),
        recovery_attempts: row.get(4),
        error_message: row.get(5),
        status_since: row.get(6),
    }
}

/// Locks the recovery candidates among `rows`, skipping slots another transaction holds.
pub async fn claim_candidates(
    tx: &Transaction<'_>,
    rows: Rows<'_>,
    deploy_timeout: Duration,
) -> Result<Vec<SlotRow>, StoreError> {
    let from = "FROM bot_pool_slots s
        LEFT JOIN milo_workers.slot_status_since ss ON ss.slot_id = s.id";
    let found = match rows {
        Rows::After { id, limit } => {
            let sql = format!(
                "SELECT {COLUMNS} {from} WHERE s.id > $2 AND {CANDIDATE}
                 ORDER BY s.id LIMIT $3 FOR UPDATE OF s SKIP LOCKED"
            );
            let statement = tx.prepare_cached(&sql).await?;
            tx.query(&statement, &[&secs(deploy_timeout), &id, &limit])
                .await?
        }
        Rows::Ids(ids) => {
            let sql = format!(
                "SELECT {COLUMNS} {from} WHERE s.id = ANY($2) AND {CANDIDATE}
                 ORDER BY s.id FOR UPDATE OF s SKIP LOCKED"
            );
            let statement = tx.prepare_cached(&sql).await?;
            tx.query(&statement, &[&secs(deploy_timeout), &ids]).await?
        }
    };
    Ok(found.iter().map(slot_row).collect())
}

/// Locks the `busy` or `deploying` slots still held by these bots, skipping slots another
/// transaction holds (SlotRecovery owns slots in `error`).
pub async fn claim_held_by(
    tx: &Transaction<'_>,
    bot_ids: &[i32],
) -> Result<Vec<SlotRow>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM bot_pool_slots s
             LEFT JOIN milo_workers.slot_status_since ss ON ss.slot_id = s.id
         WHERE s.assigned_bot_id = ANY($1) AND s.status IN ('busy', 'deploying')
         ORDER BY s.id FOR UPDATE OF s SKIP LOCKED"
    );
    let statement = tx.prepare_cached(&sql).await?;
    let found = tx.query(&statement, &[&bot_ids]).await?;
    Ok(found.iter().map(slot_row).collect())
}

/// Returns claimed slots to the pool: idle, unassigned, attempts reset.
pub async fn reset_to_idle(tx: &Transaction<'_>, ids: &[i32]) -> Result<u64, StoreError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let statement = tx
        .prepare_cached(
            "UPDATE bot_pool_slots
             SET status = 'idle', assigned_bot_id = NULL, error_message = NULL,
                 recovery_attempts = 0, last_used_at = timezone('UTC', now())
             WHERE id = ANY($1)",
        )
        .await?;
    Ok(tx.execute(&statement, &[&ids]).await?)
}

/// Leaves claimed slots in `error` with the reason; `count_attempt` adds one failed recovery.
pub async fn mark_error(
    tx: &Transaction<'_>,
    failures: &[(i32, String)],
    count_attempt: bool,
) -> Result<u64, StoreError> {
    if failures.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i32> = failures.iter().map(|(id, _)| *id).collect();
    let reasons: Vec<&str> = failures.iter().map(|(_, reason)| reason.as_str()).collect();
    let statement = tx
        .prepare_cached(
            "UPDATE bot_pool_slots s
             SET status = 'error', error_message = f.reason,
                 recovery_attempts = s.recovery_attempts + CASE WHEN $3 THEN 1 ELSE 0 END
             FROM unnest($1::int4[], $2::text[]) AS f(id, reason)
             WHERE s.id = f.id",
        )
        .await?;
    Ok(tx
        .execute(&statement, &[&ids, &reasons, &count_attempt])
        .await?)
}

/// A deploying slot whose bot is already running is really busy.
pub async fn mark_busy(tx: &Transaction<'_>, ids: &[i32]) -> Result<u64, StoreError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let statement = tx
        .prepare_cached(
            "UPDATE bot_pool_slots SET status = 'busy'
             WHERE id = ANY($1) AND status = 'deploying'",
        )
        .await?;
    Ok(tx.execute(&statement, &[&ids]).await?)
}

/// Deletes claimed slots whose application is gone from the platform.
pub async fn delete(tx: &Transaction<'_>, ids: &[i32]) -> Result<u64, StoreError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let statement = tx
        .prepare_cached(
            "WITH gone AS (DELETE FROM bot_pool_slots WHERE id = ANY($1) RETURNING id),
                  forgotten AS (DELETE FROM milo_workers.slot_status_since
                                WHERE slot_id IN (SELECT id FROM gone))
             SELECT count(*) FROM gone",
        )
        .await?;
    let deleted: i64 = tx.query_one(&statement, &[&ids]).await?.get(0);
    Ok(deleted as u64)
}

//! Statements on `bot_pool_slots`.
//!
//! Claims are row locks: a batch locks its slots with `FOR UPDATE SKIP LOCKED`, makes its
//! platform calls, writes the outcome and commits. Another worker or replica skips a locked
//! slot instead of waiting for it, so no slot ever has two platform calls in flight, and a
//! claim dies with its transaction (see `db::pool` for the lease that bounds it).

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use deadpool_postgres::{GenericClient, Transaction};

use super::{secs, StoreError};
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

/// Slots in `error` (unless a failed recovery's retry is not yet due); slots `deploying` for
/// longer than the deploy timeout (`$1`); and orphans: slots `busy` or `deploying` for longer
/// than the grace (`$grace`) held by no bot, or by a bot DONE or FATAL for longer than the
/// grace. milo frees a finished bot's slot itself within moments; the grace leaves it that.
/// The first line is a filter on the slot row alone, so that the lookups in [`FROM`] run only
/// for the few slots that can qualify.
const CANDIDATE: &str = "s.status IN ('error', 'deploying', 'busy')
  AND ((s.status = 'error'
       AND NOT EXISTS (SELECT 1 FROM milo_workers.slot_retry r
                       WHERE r.slot_id = s.id AND r.not_before > timezone('UTC', now())))
      OR (s.status = 'deploying'
          AND coalesce(s.last_used_at, ss.since, timezone('UTC', now()))
              < timezone('UTC', now()) - make_interval(secs => $1))
      OR (s.status IN ('busy', 'deploying')
          AND coalesce(ss.since, s.last_used_at, timezone('UTC', now()))
              < timezone('UTC', now()) - make_interval(secs => $grace)
          AND (s.assigned_bot_id IS NULL
               OR (bot.status IN ('DONE', 'FATAL')
                   AND coalesce(bot.since, timezone('UTC', now()))
                       < timezone('UTC', now()) - make_interval(secs => $grace)))))";

/// A slot with its entry time and its bot's status, each looked up by primary key.
/// `OFFSET 0` keeps the planner from turning a lookup into a hash over a whole table, which
/// it otherwise picks once most bots are DONE (seen: 2 s per page of 500 on 100,000 rows).
const FROM: &str = "FROM bot_pool_slots s
    LEFT JOIN LATERAL (SELECT since FROM milo_workers.slot_status_since
                       WHERE slot_id = s.id OFFSET 0) ss ON true
    LEFT JOIN LATERAL (SELECT b.status, bs.since FROM bots b
                       LEFT JOIN milo_workers.bot_status_since bs ON bs.bot_id = b.id
                       WHERE b.id = s.assigned_bot_id OFFSET 0) bot ON true";

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

/// Every recovery candidate's id, in one pass over `bot_pool_slots`: what a full sweep then
/// claims and handles batch by batch. Memory grows with the candidates, not with the table.
pub async fn sweep_candidates(
    client: &impl GenericClient,
    deploy_timeout: Duration,
    orphan_grace: Duration,
) -> Result<Vec<i32>, StoreError> {
    let candidate = CANDIDATE.replace("$grace", "$2");
    let sql = format!("SELECT s.id {FROM} WHERE {candidate} ORDER BY s.id");
    let statement = client.prepare_cached(&sql).await?;
    let found = client
        .query(&statement, &[&secs(deploy_timeout), &secs(orphan_grace)])
        .await?;
    Ok(found.iter().map(|row| row.get(0)).collect())
}

/// Locks the recovery candidates among `ids`, skipping slots another transaction holds.
/// `orphan_grace` is how long a slot may stay held by no bot or a finished one.
pub async fn claim_candidates(
    tx: &Transaction<'_>,
    ids: &[i32],
    deploy_timeout: Duration,
    orphan_grace: Duration,
) -> Result<Vec<SlotRow>, StoreError> {
    let candidate = CANDIDATE.replace("$grace", "$3");
    let sql = format!(
        "SELECT {COLUMNS} {FROM} WHERE s.id = ANY($2) AND {candidate}
         ORDER BY s.id FOR UPDATE OF s SKIP LOCKED"
    );
    let statement = tx.prepare_cached(&sql).await?;
    let (deploy, grace) = (secs(deploy_timeout), secs(orphan_grace));
    let found = tx.query(&statement, &[&deploy, &ids, &grace]).await?;
    Ok(found.iter().map(slot_row).collect())
}

/// Which busy or deploying slots each bot holds, found through the worker's own index (sql/V3)
/// and read by primary key, never by scanning milo's table (which may have no index on
/// `assigned_bot_id`). Read once per run, not per batch: its cost grows with the slots in use.
pub async fn held(tx: &Transaction<'_>) -> Result<HashMap<i32, Vec<i32>>, StoreError> {
    let statement = tx
        .prepare_cached(
            "SELECT s.id, s.assigned_bot_id FROM bot_pool_slots s
             WHERE s.id = ANY(ARRAY(SELECT slot_id FROM milo_workers.slot_status_since
                                    WHERE status IN ('busy', 'deploying')))
               AND s.status IN ('busy', 'deploying') AND s.assigned_bot_id IS NOT NULL",
        )
        .await?;
    let mut held: HashMap<i32, Vec<i32>> = HashMap::new();
    for row in tx.query(&statement, &[]).await? {
        held.entry(row.get(1)).or_default().push(row.get(0));
    }
    Ok(held)
}

/// Locks those of `slot_ids` that are still `busy` or `deploying` and held by one of
/// `bot_ids`, skipping slots another transaction holds (SlotRecovery owns slots in `error`).
pub async fn claim_held(
    tx: &Transaction<'_>,
    slot_ids: &[i32],
    bot_ids: &[i32],
) -> Result<Vec<SlotRow>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} {FROM}
         WHERE s.id = ANY($1) AND s.assigned_bot_id = ANY($2)
           AND s.status IN ('busy', 'deploying')
         ORDER BY s.id FOR UPDATE OF s SKIP LOCKED"
    );
    let statement = tx.prepare_cached(&sql).await?;
    let found = tx.query(&statement, &[&slot_ids, &bot_ids]).await?;
    Ok(found.iter().map(slot_row).collect())
}

/// Returns claimed slots to the pool: idle, unassigned, attempts reset, no retry pending.
pub async fn reset_to_idle(tx: &Transaction<'_>, ids: &[i32]) -> Result<u64, StoreError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let statement = tx
        .prepare_cached(
            "WITH reset AS (
                 UPDATE bot_pool_slots
                 SET status = 'idle', assigned_bot_id = NULL, error_message = NULL,
                     recovery_attempts = 0, last_used_at = timezone('UTC', now())
                 WHERE id = ANY($1) RETURNING id
             ), forgotten AS (
                 DELETE FROM milo_workers.slot_retry WHERE slot_id IN (SELECT id FROM reset)
             )
             SELECT count(*) FROM reset",
        )
        .await?;
    let reset: i64 = tx.query_one(&statement, &[&ids]).await?.get(0);
    Ok(reset as u64)
}

/// A slot left in `error`: why, and when it may be tried again.
#[derive(Debug, Clone)]
pub struct Failure {
    pub slot_id: i32,
    pub reason: String,
    pub retry_in: Duration,
}

/// Leaves claimed slots in `error` with the reason and the time of their next attempt;
/// `count_attempt` adds one failed recovery.
pub async fn mark_error(
    tx: &Transaction<'_>,
    failures: &[Failure],
    count_attempt: bool,
) -> Result<u64, StoreError> {
    if failures.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i32> = failures.iter().map(|f| f.slot_id).collect();
    let reasons: Vec<&str> = failures.iter().map(|f| f.reason.as_str()).collect();
    let delays: Vec<f64> = failures.iter().map(|f| secs(f.retry_in)).collect();
    let statement = tx
        .prepare_cached(
            "WITH failed AS (
                 UPDATE bot_pool_slots s
                 SET status = 'error', error_message = f.reason,
                     recovery_attempts = s.recovery_attempts + CASE WHEN $4 THEN 1 ELSE 0 END
                 FROM unnest($1::int4[], $2::text[], $3::float8[]) AS f(id, reason, delay)
                 WHERE s.id = f.id
                 RETURNING s.id, f.delay
             ), scheduled AS (
                 INSERT INTO milo_workers.slot_retry (slot_id, not_before)
                 SELECT id, timezone('UTC', now()) + make_interval(secs => delay) FROM failed
                 ON CONFLICT (slot_id) DO UPDATE SET not_before = EXCLUDED.not_before
             )
             SELECT count(*) FROM failed",
        )
        .await?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
        [&ids, &reasons, &delays, &count_attempt];
    let failed: i64 = tx.query_one(&statement, &params).await?.get(0);
    Ok(failed as u64)
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
                                WHERE slot_id IN (SELECT id FROM gone)),
                  unscheduled AS (DELETE FROM milo_workers.slot_retry
                                  WHERE slot_id IN (SELECT id FROM gone))
             SELECT count(*) FROM gone",
        )
        .await?;
    let deleted: i64 = tx.query_one(&statement, &[&ids]).await?.get(0);
    Ok(deleted as u64)
}

/// When each watched slot can next need SlotRecovery (UTC wall clock): a deploying slot at its
/// deploy timeout, or when its heartbeating bot stops counting as fresh, whichever is later; an
/// error slot when its retry is due, or now. Each watched slot is reached from the partial
/// index by primary key; `OFFSET 0` stops the planner from turning that into a full scan of
/// `bot_pool_slots` (see `store::bots` for the measurement).
const SLOT_DEADLINES: &str = "
    SELECT s.id,
           greatest(coalesce(s.last_used_at, ss.since) + make_interval(secs => $1),
                    b.last_heartbeat + make_interval(secs => $2)) AS due_at
    FROM milo_workers.slot_status_since ss
    CROSS JOIN LATERAL (SELECT id, status, last_used_at, assigned_bot_id FROM bot_pool_slots
                        WHERE id = ss.slot_id OFFSET 0) s
    LEFT JOIN bots b ON b.id = s.assigned_bot_id
    WHERE ss.status IN ('deploying', 'error') AND s.status = 'deploying'
    UNION ALL
    SELECT s.id, coalesce(r.not_before, timezone('UTC', now())) AS due_at
    FROM milo_workers.slot_status_since ss
    CROSS JOIN LATERAL (SELECT id, status FROM bot_pool_slots
                        WHERE id = ss.slot_id OFFSET 0) s
    LEFT JOIN milo_workers.slot_retry r ON r.slot_id = s.id
    WHERE ss.status IN ('deploying', 'error') AND s.status = 'error'";

/// Seconds from now until the first watched slot needs SlotRecovery; negative if one does
/// already, `None` if no slot is watched.
pub async fn next_deadline(
    client: &impl GenericClient,
    deploy_timeout: Duration,
    freshness: Duration,
) -> Result<Option<f64>, StoreError> {
    let sql = format!(
        "SELECT extract(epoch FROM min(due_at) - timezone('UTC', now()))::float8
         FROM ({SLOT_DEADLINES}) d"
    );
    let statement = client.prepare_cached(&sql).await?;
    let row = client
        .query_one(&statement, &[&secs(deploy_timeout), &secs(freshness)])
        .await?;
    Ok(row.get(0))
}

/// Watched slots whose deadline has passed.
pub async fn due(
    client: &impl GenericClient,
    deploy_timeout: Duration,
    freshness: Duration,
    limit: i64,
) -> Result<Vec<i32>, StoreError> {
    let sql = format!(
        "SELECT id FROM ({SLOT_DEADLINES}) d WHERE due_at <= timezone('UTC', now())
         ORDER BY id LIMIT $3"
    );
    let statement = client.prepare_cached(&sql).await?;
    let rows = client
        .query(
            &statement,
            &[&secs(deploy_timeout), &secs(freshness), &limit],
        )
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

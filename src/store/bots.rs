//! Statements on `bots`.

use std::time::{Duration, SystemTime};

use deadpool_postgres::{GenericClient, Transaction};

use super::{fit, secs, StoreError};
use crate::status::{BotStatus, HEARTBEAT_STATUSES};

/// `deployment_error` is `varchar(1024)`.
const DEPLOYMENT_ERROR_CHARS: usize = 1024;

/// A bot as it stood when it was locked.
#[derive(Debug, Clone)]
pub struct BotRow {
    pub id: i32,
    pub status: BotStatus,
    /// Heartbeated within the freshness window.
    pub fresh: bool,
}

/// A bot BotHealth just marked FATAL.
#[derive(Debug, Clone)]
pub struct MarkedBot {
    pub id: i32,
    pub reason: String,
    /// The evidence it was judged on: its last heartbeat, or when it entered its status.
    pub silent_since: Option<SystemTime>,
}

/// Locks the bots assigned to slots being recovered. Waits for the lock rather than skipping:
/// the holder is a heartbeat or status write that finishes in milliseconds, and the session's
/// `lock_timeout` bounds the wait.
pub async fn lock(
    tx: &Transaction<'_>,
    ids: &[i32],
    freshness: Duration,
) -> Result<Vec<BotRow>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let statement = tx
        .prepare_cached(
            "SELECT id, status,
                    coalesce(last_heartbeat > timezone('UTC', now()) - make_interval(secs => $2),
                             false)
             FROM bots WHERE id = ANY($1)
             ORDER BY id FOR UPDATE",
        )
        .await?;
    let rows = tx.query(&statement, &[&ids, &secs(freshness)]).await?;
    Ok(rows
        .iter()
        .map(|row| BotRow {
            id: row.get(0),
            status: BotStatus::parse(row.get(1)),
            fresh: row.get(2),
        })
        .collect())
}

/// Marks bots FATAL with a reason each, unless they are already DONE or FATAL (or in a status
/// this build does not know). Returns the ids actually changed.
pub async fn mark_fatal(
    tx: &Transaction<'_>,
    bots: &[(i32, String)],
) -> Result<Vec<i32>, StoreError> {
    if bots.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i32> = bots.iter().map(|(id, _)| *id).collect();
    let reasons: Vec<String> = bots
        .iter()
        .map(|(_, reason)| fit(reason, DEPLOYMENT_ERROR_CHARS))
        .collect();
    let statement = tx
        .prepare_cached(
            "UPDATE bots b SET status = 'FATAL', deployment_error = f.reason
             FROM unnest($1::int4[], $2::text[]) AS f(id, reason)
             WHERE b.id = f.id AND b.status = ANY($3)
             RETURNING b.id",
        )
        .await?;
    let rows = tx
        .query(
            &statement,
            &[&ids, &reasons, &BotStatus::fatal_allowed_from()],
        )
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Every bot in a heartbeat-watched status, in one pass over `bots`: what a full sweep checks,
/// batch by batch.
pub async fn all_watched(client: &impl GenericClient) -> Result<Vec<i32>, StoreError> {
    let statuses: Vec<&str> = HEARTBEAT_STATUSES.to_vec();
    let statement = client
        .prepare_cached("SELECT id FROM bots WHERE status = ANY($1) ORDER BY id")
        .await?;
    let found = client.query(&statement, &[&statuses]).await?;
    Ok(found.iter().map(|row| row.get(0)).collect())
}

/// The bots among `ids` that are in a heartbeat-watched status: what BotHealth checks.
pub async fn heartbeat_watched(tx: &Transaction<'_>, ids: &[i32]) -> Result<Vec<i32>, StoreError> {
    let statuses: Vec<&str> = HEARTBEAT_STATUSES.to_vec();
    let statement = tx
        .prepare_cached("SELECT id FROM bots WHERE status = ANY($1) AND id = ANY($2)")
        .await?;
    let found = tx.query(&statement, &[&statuses, &ids]).await?;
    Ok(found.iter().map(|row| row.get(0)).collect())
}

/// How BotHealth judges silence.
#[derive(Debug, Clone, Copy)]
pub struct Silence {
    /// Silent for longer than this is dead.
    pub timeout: Duration,
    /// No evidence older than this counts (UTC wall clock): silence is measured from the later
    /// of the last heartbeat and this moment. See `BotHealth` on outages.
    pub floor: Option<SystemTime>,
}

/// The moment silence is measured from, in SQL: the last heartbeat, or with none the moment
/// the bot entered its status, but never before the floor (`$floor`).
const SILENT_SINCE: &str =
    "greatest(coalesce(b.last_heartbeat, ss.since, timezone('UTC', now())), $floor::timestamp)";

/// Marks FATAL at most `limit` of `ids` that are still in a watched status and silent for
/// longer than the timeout: no heartbeat since then, or, with no heartbeat ever, no status
/// change since then. Bots locked by anyone else are skipped; whoever holds them is changing
/// them.
pub async fn mark_silent_fatal(
    tx: &Transaction<'_>,
    ids: &[i32],
    silence: Silence,
    limit: i64,
) -> Result<Vec<MarkedBot>, StoreError> {
    if ids.is_empty() || limit <= 0 {
        return Ok(Vec::new());
    }
    let statuses: Vec<&str> = HEARTBEAT_STATUSES.to_vec();
    let timeout_text = humantime::format_duration(silence.timeout).to_string();
    let sql = "WITH silent AS (
                 SELECT b.id, b.status, b.last_heartbeat, ss.since
                 FROM bots b
                 LEFT JOIN milo_workers.bot_status_since ss ON ss.bot_id = b.id
                 WHERE b.id = ANY($1) AND b.status = ANY($2)
                   AND SILENT_SINCE < timezone('UTC', now()) - make_interval(secs => $3)
                 ORDER BY b.id LIMIT $6
                 FOR UPDATE OF b SKIP LOCKED
             ), reasoned AS (
                 SELECT id, coalesce(last_heartbeat, since) AS silent_since,
                        CASE WHEN last_heartbeat IS NULL
                             THEN 'no heartbeat within ' || $4 || ' of entering ' || status
                             ELSE 'no heartbeat for more than ' || $4 || ' while ' || status
                                  || ' (last at ' || to_char(last_heartbeat,
                                     'YYYY-MM-DD HH24:MI:SS') || ' UTC)'
                        END AS reason
                 FROM silent
             )
             UPDATE bots b SET status = 'FATAL', deployment_error = left(r.reason, 1024)
             FROM reasoned r WHERE b.id = r.id
             RETURNING b.id, r.reason, r.silent_since"
        .replace("SILENT_SINCE", &SILENT_SINCE.replace("$floor", "$5"));
    let statement = tx.prepare_cached(&sql).await?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
        &ids,
        &statuses,
        &secs(silence.timeout),
        &timeout_text,
        &silence.floor,
        &limit,
    ];
    let rows = tx.query(&statement, &params).await?;
    Ok(rows
        .iter()
        .map(|row| MarkedBot {
            id: row.get(0),
            reason: row.get(1),
            silent_since: row.get(2),
        })
        .collect())
}

/// The watched bots, reached from the worker's partial index one primary-key lookup each,
/// so the cost grows with the number of watched bots, not with the size of `bots`, and no
/// index has to be added to milo's table (one on `last_heartbeat` would also make every
/// heartbeat write a non-HOT update). `OFFSET 0` keeps the planner from flattening the
/// lateral subquery into a hash join over a full scan of `bots`, which it otherwise picks. The
/// statuses are [`HEARTBEAT_STATUSES`], written out literally so the planner can match them
/// against the partial index `bot_status_since_watched` (sql/V2); a bound array would not.
const WATCHED_BOTS: &str = "milo_workers.bot_status_since ss
    CROSS JOIN LATERAL (SELECT b.id, b.status, b.last_heartbeat FROM bots b
                        WHERE b.id = ss.bot_id OFFSET 0) b
    WHERE ss.status IN ('JOINING_CALL', 'IN_WAITING_ROOM', 'IN_CALL', 'LEAVING')
      AND b.status IN ('JOINING_CALL', 'IN_WAITING_ROOM', 'IN_CALL', 'LEAVING')";

/// Seconds from now (by the database clock) until the first watched bot can become silent
/// for longer than the timeout; negative if one already is, `None` if no bot is watched.
pub async fn next_deadline(
    client: &impl GenericClient,
    silence: Silence,
) -> Result<Option<f64>, StoreError> {
    let since = SILENT_SINCE.replace("$floor", "$2");
    let sql = format!(
        "SELECT extract(epoch FROM min({since}) + make_interval(secs => $1)
                                   - timezone('UTC', now()))::float8
         FROM {WATCHED_BOTS}"
    );
    let statement = client.prepare_cached(&sql).await?;
    let row = client
        .query_one(&statement, &[&secs(silence.timeout), &silence.floor])
        .await?;
    Ok(row.get(0))
}

/// Watched bots already silent for longer than the timeout, found through the same index.
pub async fn due(
    client: &impl GenericClient,
    silence: Silence,
    limit: i64,
) -> Result<Vec<i32>, StoreError> {
    let since = SILENT_SINCE.replace("$floor", "$2");
    let sql = format!(
        "SELECT b.id FROM {WATCHED_BOTS}
           AND {since} < timezone('UTC', now()) - make_interval(secs => $1)
         ORDER BY b.id LIMIT $3"
    );
    let statement = client.prepare_cached(&sql).await?;
    let rows = client
        .query(
            &statement,
            &[&secs(silence.timeout), &silence.floor, &limit],
        )
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// The database's current UTC wall-clock time.
pub async fn now(client: &impl GenericClient) -> Result<SystemTime, StoreError> {
    let statement = client
        .prepare_cached("SELECT timezone('UTC', now())")
        .await?;
    Ok(client.query_one(&statement, &[]).await?.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_literal_watched_list_matches_the_status_table() {
        const WATCHED_SQL: &str = "('JOINING_CALL', 'IN_WAITING_ROOM', 'IN_CALL', 'LEAVING')";
        let listed: Vec<String> = HEARTBEAT_STATUSES
            .iter()
            .map(|s| format!("'{s}'"))
            .collect();
        assert_eq!(WATCHED_SQL, format!("({})", listed.join(", ")));
    }
}

//! `milo-workers status`: the fleet at a glance. Slots and bots per status, the rows the
//! workers would act on right now and why (by the same thresholds as `run`), the last actions
//! from the audit log, and whether a daemon's listener is connected.
//!
//! Read-only: plain SELECTs without locks, so it is safe against a live database and says
//! what a worker *would* do; a worker re-checks every row when it acts.

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::{BotHealthSettings, SlotRecoverySettings};
use crate::db::LISTENER_APPLICATION_NAME;
use crate::status::{BotStatus, HEARTBEAT_STATUSES};

/// Rows listed per section at most; the counts above them cover everything.
pub const ROWS_SHOWN: i64 = 50;
/// Audit entries shown.
pub const RECENT_ACTIONS: i64 = 10;
/// Longest cell in the terminal table; longer text is cut.
const CELL_MAX: usize = 60;

#[derive(Debug, Clone, Serialize)]
pub struct FleetReport {
    pub slots_by_status: Vec<(String, i64)>,
    pub bots_by_status: Vec<(String, i64)>,
    /// What the workers would act on now, slots first.
    pub actionable: Vec<Actionable>,
    pub recent_actions: Vec<RecentAction>,
    /// Sessions of a daemon's listener on this database.
    pub listeners: Vec<ListenerSession>,
    /// The thresholds the report was made with, as text (`15m`).
    pub thresholds: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Actionable {
    /// `slot` or `bot`.
    pub kind: &'static str,
    pub id: i32,
    /// Slot name, or the bot's status.
    pub name: String,
    pub status: String,
    pub why: String,
    /// What the worker would do.
    pub action: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct RecentAction {
    pub at: String,
    pub worker: String,
    pub trigger: String,
    pub action: String,
    pub slot_id: Option<i32>,
    pub bot_id: Option<i32>,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ListenerSession {
    pub pid: i32,
    pub client: String,
    pub since: String,
}

/// Builds the report. `slots` and `bots` are the thresholds `run` would use.
pub async fn report(
    client: &Client,
    slots: &SlotRecoverySettings,
    bots: &BotHealthSettings,
) -> Result<FleetReport, tokio_postgres::Error> {
    let counts = |table: &'static str| {
        format!("SELECT status::text, count(*) FROM {table} GROUP BY status ORDER BY status")
    };
    let slots_by_status = pairs(client.query(&counts("bot_pool_slots"), &[]).await?);
    let bots_by_status = pairs(client.query(&counts("bots"), &[]).await?);

    let mut actionable = actionable_slots(client, slots).await?;
    actionable.extend(silent_bots(client, bots).await?);

    let recent_actions = client
        .query(
            "SELECT to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), worker, trigger,
                    action, slot_id, bot_id, reason
             FROM milo_workers.audit_log ORDER BY id DESC LIMIT $1",
            &[&RECENT_ACTIONS],
        )
        .await?
        .iter()
        .map(|row| RecentAction {
            at: row.get(0),
            worker: row.get(1),
            trigger: row.get(2),
            action: row.get(3),
            slot_id: row.get(4),
            bot_id: row.get(5),
            reason: row.get(6),
        })
        .collect();

    let listeners = client
        .query(
            "SELECT pid, coalesce(host(client_addr), 'local socket'),
                    coalesce(to_char(backend_start AT TIME ZONE 'UTC',
                                     'YYYY-MM-DD HH24:MI:SS'), '?')
             FROM pg_stat_activity
             WHERE application_name = $1 AND datname = current_database()
             ORDER BY backend_start",
            &[&LISTENER_APPLICATION_NAME],
        )
        .await?
        .iter()
        .map(|row| ListenerSession {
            pid: row.get(0),
            client: row.get(1),
            since: row.get(2),
        })
        .collect();

    let shown = |d: Duration| humantime::format_duration(d).to_string();
    let thresholds = vec![
        ("deploy timeout".into(), shown(slots.deploy_timeout)),
        (
            "heartbeat freshness".into(),
            shown(slots.heartbeat_freshness),
        ),
        (
            "max recovery attempts".into(),
            slots.max_recovery_attempts.to_string(),
        ),
        ("heartbeat timeout".into(), shown(bots.heartbeat_timeout)),
    ];

    Ok(FleetReport {
        slots_by_status,
        bots_by_status,
        actionable,
        recent_actions,
        listeners,
        thresholds,
    })
}

fn pairs(rows: Vec<tokio_postgres::Row>) -> Vec<(String, i64)> {
    rows.iter().map(|row| (row.get(0), row.get(1))).collect()
}

/// Slots in error, slots deploying past the deploy timeout whose bot is not heartbeating, and
/// orphans (busy or deploying, held by no bot or a finished one for longer than the heartbeat
/// freshness), with what SlotRecovery would do about each.
async fn actionable_slots(
    client: &Client,
    settings: &SlotRecoverySettings,
) -> Result<Vec<Actionable>, tokio_postgres::Error> {
    let rows = client
        .query(
            "WITH now_utc AS (SELECT timezone('UTC', now()) AS t)
             SELECT s.id, s.slot_name::text, s.status::text, s.recovery_attempts,
                    extract(epoch FROM n.t - coalesce(ss.since, n.t))::float8,
                    extract(epoch FROM n.t - coalesce(s.last_used_at, ss.since, n.t))::float8,
                    b.status::text,
                    extract(epoch FROM n.t - b.last_heartbeat)::float8,
                    extract(epoch FROM r.not_before - n.t)::float8,
                    s.assigned_bot_id
             FROM bot_pool_slots s
             CROSS JOIN now_utc n
             LEFT JOIN milo_workers.slot_status_since ss ON ss.slot_id = s.id
             LEFT JOIN milo_workers.slot_retry r ON r.slot_id = s.id
             LEFT JOIN bots b ON b.id = s.assigned_bot_id
             LEFT JOIN milo_workers.bot_status_since bs ON bs.bot_id = b.id
             WHERE s.status = 'error'
                OR (s.status = 'deploying'
                    AND coalesce(s.last_used_at, ss.since, n.t)
                        < n.t - make_interval(secs => $1))
                OR (s.status IN ('busy', 'deploying')
                    AND coalesce(ss.since, s.last_used_at, n.t)
                        < n.t - make_interval(secs => $3)
                    AND (s.assigned_bot_id IS NULL
                         OR (b.status IN ('DONE', 'FATAL')
                             AND coalesce(bs.since, n.t) < n.t - make_interval(secs => $3))))
             ORDER BY s.id LIMIT $2",
            &[
                &settings.deploy_timeout.as_secs_f64(),
                &ROWS_SHOWN,
                &settings.heartbeat_freshness.as_secs_f64(),
            ],
        )
        .await?;
    let freshness = settings.heartbeat_freshness.as_secs_f64();
    let mut found = Vec::new();
    for row in rows {
        let status: String = row.get(2);
        let attempts: i32 = row.get(3);
        let in_status = secs(row.get(4));
        let deploying_for = secs(row.get(5));
        let bot_status: Option<String> = row.get(6);
        let heartbeat_age: Option<f64> = row.get(7);
        let retry_in: Option<f64> = row.get(8);
        let bot_id: Option<i32> = row.get(9);
        let bot = bot_status.as_deref().map(BotStatus::parse);
        // Held by no bot, or by one that finished: milo should have freed it.
        let orphan = match (bot_id, &bot) {
            (None, _) => Some("with no bot".to_owned()),
            (Some(id), Some(bot)) if bot.is_terminal() => Some(format!("for bot {id}, {bot}")),
            _ => None,
        };

        let mut why = match (status.as_str(), &orphan) {
            ("error", _) => format!("in error for {in_status}"),
            (_, Some(orphan)) => format!("{status} {orphan} for {in_status}"),
            _ => format!("deploying for {deploying_for}"),
        };
        let fresh = heartbeat_age.is_some_and(|age| age < freshness);
        let action = match &bot {
            _ if status == "busy" => "stop and free the orphaned slot",
            _ if status == "error" && retry_in.is_some_and(|secs| secs > 0.0) => {
                why.push_str(&format!(
                    ", {attempts} failed recoveries; next try in {}",
                    secs(retry_in.unwrap_or_default())
                ));
                "nothing yet: waiting for the retry"
            }
            Some(bot) if status == "deploying" && fresh && !bot.is_terminal() => {
                if bot.is_past_deploying() {
                    why.push_str(&format!(", but its bot is {bot} and heartbeating"));
                    "mark the slot busy"
                } else {
                    // Alive and still deploying: the worker leaves it alone.
                    continue;
                }
            }
            _ if attempts >= settings.max_recovery_attempts => {
                why.push_str(&format!(
                    ", {attempts} failed recoveries (limit {})",
                    settings.max_recovery_attempts
                ));
                "delete the application and the slot"
            }
            _ => {
                if attempts > 0 {
                    why.push_str(&format!(", {attempts} failed recoveries so far"));
                }
                if bot.as_ref().is_some_and(|bot| !bot.is_terminal()) {
                    "stop, free the slot, mark its bot FATAL"
                } else {
                    "stop and free the slot"
                }
            }
        };
        found.push(Actionable {
            kind: "slot",
            id: row.get(0),
            name: row.get(1),
            status,
            why,
            action,
        });
    }
    Ok(found)
}

/// Bots that must heartbeat and have been silent past the heartbeat timeout.
async fn silent_bots(
    client: &Client,
    settings: &BotHealthSettings,
) -> Result<Vec<Actionable>, tokio_postgres::Error> {
    let watched: Vec<&str> = HEARTBEAT_STATUSES.to_vec();
    let rows = client
        .query(
            "WITH now_utc AS (SELECT timezone('UTC', now()) AS t)
             SELECT b.id, b.status::text, b.last_heartbeat IS NULL,
                    extract(epoch FROM n.t - coalesce(b.last_heartbeat, ss.since, n.t))::float8
             FROM bots b
             CROSS JOIN now_utc n
             LEFT JOIN milo_workers.bot_status_since ss ON ss.bot_id = b.id
             WHERE b.status = ANY($1)
               AND coalesce(b.last_heartbeat, ss.since, n.t) < n.t - make_interval(secs => $2)
             ORDER BY b.id LIMIT $3",
            &[
                &watched,
                &settings.heartbeat_timeout.as_secs_f64(),
                &ROWS_SHOWN,
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| {
            let status: String = row.get(1);
            let never: bool = row.get(2);
            let silent = secs(row.get(3));
            let why = if never {
                format!("no heartbeat at all in {silent} since entering {status}")
            } else {
                format!("no heartbeat for {silent}")
            };
            Actionable {
                kind: "bot",
                id: row.get(0),
                name: String::new(),
                status,
                why,
                action: "mark the bot FATAL, stop and free its slot",
            }
        })
        .collect())
}

/// Whole seconds, as `1h 2m 3s`.
fn secs(seconds: f64) -> String {
    let whole = Duration::from_secs(seconds.max(0.0) as u64);
    humantime::format_duration(whole).to_string()
}

impl fmt::Display for FleetReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count_rows = |pairs: &[(String, i64)]| -> Vec<Vec<String>> {
            pairs
                .iter()
                .map(|(status, n)| vec![status.clone(), n.to_string()])
                .collect()
        };
        writeln!(f, "SLOTS")?;
        write_table(f, &["status", "count"], count_rows(&self.slots_by_status))?;
        writeln!(f, "\nBOTS")?;
        write_table(f, &["status", "count"], count_rows(&self.bots_by_status))?;

        let thresholds: Vec<String> = self
            .thresholds
            .iter()
            .map(|(name, value)| format!("{name} {value}"))
            .collect();
        writeln!(f, "\nWOULD ACT ON NOW ({})", thresholds.join(", "))?;
        if self.actionable.is_empty() {
            writeln!(f, "nothing")?;
        } else {
            let rows = self
                .actionable
                .iter()
                .map(|a| {
                    let name = if a.name.is_empty() {
                        a.status.clone()
                    } else {
                        format!("{} ({})", a.name, a.status)
                    };
                    vec![
                        a.kind.into(),
                        a.id.to_string(),
                        name,
                        a.why.clone(),
                        a.action.into(),
                    ]
                })
                .collect();
            write_table(f, &["row", "id", "name", "why", "would"], rows)?;
        }

        writeln!(f, "\nLAST {RECENT_ACTIONS} ACTIONS (UTC)")?;
        if self.recent_actions.is_empty() {
            writeln!(f, "none yet")?;
        } else {
            let id = |id: Option<i32>| id.map(|id| id.to_string()).unwrap_or_default();
            let rows = self
                .recent_actions
                .iter()
                .map(|a| {
                    vec![
                        a.at.clone(),
                        a.worker.clone(),
                        a.trigger.clone(),
                        a.action.clone(),
                        id(a.slot_id),
                        id(a.bot_id),
                        a.reason.clone(),
                    ]
                })
                .collect();
            let headers = ["at", "worker", "trigger", "action", "slot", "bot", "reason"];
            write_table(f, &headers, rows)?;
        }

        write!(f, "\nLISTENER: ")?;
        match self.listeners.as_slice() {
            [] => writeln!(
                f,
                "none connected (no session named {LISTENER_APPLICATION_NAME} on this database)"
            ),
            sessions => {
                let shown: Vec<String> = sessions
                    .iter()
                    .map(|s| format!("pid {} from {} since {} UTC", s.pid, s.client, s.since))
                    .collect();
                writeln!(f, "{} connected: {}", sessions.len(), shown.join("; "))
            }
        }
    }
}

/// A plain aligned table: a header row, a rule, then the rows. Cells are cut to fit.
fn write_table(
    f: &mut fmt::Formatter<'_>,
    headers: &[&str],
    rows: Vec<Vec<String>>,
) -> fmt::Result {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|row| row.iter().map(|cell| cut(cell)).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |f: &mut fmt::Formatter<'_>, cells: Vec<&str>| -> fmt::Result {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        writeln!(f, "{}", padded.join("  ").trim_end())
    };
    line(f, headers.to_vec())?;
    let rules: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    line(f, rules.iter().map(String::as_str).collect())?;
    for row in &rows {
        line(f, row.iter().map(String::as_str).collect())?;
    }
    Ok(())
}

fn cut(cell: &str) -> String {
    let one_line = cell.replace(['\n', '\r', '\t'], " ");
    if one_line.chars().count() <= CELL_MAX {
        return one_line;
    }
    let kept: String = one_line.chars().take(CELL_MAX - 1).collect();
    format!("{kept}…")
}

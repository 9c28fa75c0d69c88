//! `milo_workers.audit_log`: what was done, by which worker, on what trigger, and why.

use std::fmt;
use std::time::SystemTime;

use deadpool_postgres::Transaction;

use super::StoreError;

/// What started a run. Stored in the audit log; the words are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// A status change announced by a trigger's NOTIFY.
    Notify,
    /// The periodic safety sweep.
    Tick,
    /// A caller asked for a run (library `run_now`, the `sweep` command).
    Manual,
    /// A row reached the moment it could become actionable.
    Deadline,
    /// A sweep after (re)subscribing, covering whatever changed while nobody listened.
    Resync,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Notify => "notify",
            Self::Tick => "tick",
            Self::Manual => "manual",
            Self::Deadline => "deadline",
            Self::Resync => "resync",
        }
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What was done. Stored in the audit log; the words are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    BotMarkedFatal,
    SlotRecovered,
    SlotRecoveryFailed,
    SlotDeleted,
    SlotMarkedBusy,
    ResourcesReleased,
    ReleaseFailed,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BotMarkedFatal => "bot_marked_fatal",
            Self::SlotRecovered => "slot_recovered",
            Self::SlotRecoveryFailed => "slot_recovery_failed",
            Self::SlotDeleted => "slot_deleted",
            Self::SlotMarkedBusy => "slot_marked_busy",
            Self::ResourcesReleased => "resources_released",
            Self::ReleaseFailed => "release_failed",
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub action: Action,
    pub slot_id: Option<i32>,
    pub bot_id: Option<i32>,
    pub reason: String,
    /// When the row entered the status the action was decided from.
    pub status_since: Option<SystemTime>,
}

/// Who is writing: a worker on a trigger, in this replica.
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a> {
    pub worker: &'a str,
    pub trigger: Trigger,
    pub replica: &'a str,
}

/// Records entries in the caller's transaction, so they commit or vanish with the change.
pub async fn record(
    tx: &Transaction<'_>,
    actor: Actor<'_>,
    entries: &[AuditEntry],
) -> Result<(), StoreError> {
    if entries.is_empty() {
        return Ok(());
    }
    let actions: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
    let slots: Vec<Option<i32>> = entries.iter().map(|e| e.slot_id).collect();
    let bots: Vec<Option<i32>> = entries.iter().map(|e| e.bot_id).collect();
    let reasons: Vec<&str> = entries.iter().map(|e| e.reason.as_str()).collect();
    let since: Vec<Option<SystemTime>> = entries.iter().map(|e| e.status_since).collect();

    let statement = tx
        .prepare_cached(
            "INSERT INTO milo_workers.audit_log
                 (worker, trigger, action, slot_id, bot_id, reason, status_since, replica)
             SELECT $1, $2, a, s, b, r, t, $3
             FROM unnest($4::text[], $5::int4[], $6::int4[], $7::text[], $8::timestamp[])
                  AS e(a, s, b, r, t)",
        )
        .await?;
    tx.execute(
        &statement,
        &[
            &actor.worker,
            &actor.trigger.as_str(),
            &actor.replica,
            &actions,
            &slots,
            &bots,
            &reasons,
            &since,
        ],
    )
    .await?;
    crate::metrics::actions_recorded(actor.worker, entries);
    Ok(())
}

//! SlotRecovery: slots in `error`, and slots stuck `deploying`, are stopped on the platform
//! and returned to the pool; after too many failed attempts their application and row are
//! deleted. The bot on such a slot is marked FATAL.
//!
//! One batch is one transaction: claim the candidate slots (row locks, skipping any another
//! worker or replica holds), lock their bots, decide, make the platform calls concurrently,
//! write every outcome and its audit entry, commit. If the process dies midway the
//! transaction rolls back and the slots are candidates again.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;
use tracing::info;

use super::{Context, RunError, RunReport, Worker};
use crate::config::SlotRecoverySettings;
use crate::pipeline::{Batch, Scope};
use crate::platform::{Operation, PlatformError, SlotCall};
use crate::status::SlotStatus;
use crate::store::audit::{self, Actor};
use crate::store::bots::{self, BotRow};
use crate::store::slots::{self, Failure, SlotRow};
use crate::store::{locks, Action, AuditEntry, Trigger};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SlotRecoveryReport {
    /// Stopped on the platform and back to idle.
    pub recovered: u64,
    /// A platform call failed; the slot stays in error and is tried again later.
    pub failed: u64,
    /// Out of attempts: application and row deleted.
    pub deleted: u64,
    /// Orphaned busy slots (no bot, or a finished one) stopped and freed.
    pub released: u64,
    /// Alive after all (a deploying slot whose bot heartbeats), including those corrected
    /// to busy. Never counts as an attempt.
    pub skipped: u64,
}

impl SlotRecoveryReport {
    fn is_idle(&self) -> bool {
        *self == Self::default()
    }
}

impl RunReport for SlotRecoveryReport {
    fn log(&self, worker: &str, trigger: Trigger, elapsed: Duration) {
        // A focused check that found nothing to do is the common case (every status change
        // triggers one); it is logged at debug so the info log shows what matters.
        if trigger == Trigger::Notify && self.is_idle() {
            let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
            tracing::debug!(worker, %trigger, elapsed_ms, "run found nothing to do");
            return;
        }
        info!(
            worker,
            %trigger,
            recovered = self.recovered,
            failed = self.failed,
            deleted = self.deleted,
            skipped = self.skipped,
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            "slot recovery run finished"
        );
    }
}

/// What to do with one claimed slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Its bot is alive and still deploying: look again later.
    Skip,
    /// Its bot is alive and already running: the slot is really busy.
    MarkBusy,
    /// Stop the application and return the slot to the pool.
    Recover,
    /// Out of attempts: delete the application, then the row.
    Delete,
    /// A busy slot that no running bot holds: stop the application and free the slot.
    Release,
}

/// Decides for a claimed candidate slot, given its bot as locked (if it has one).
pub fn decide(slot: &SlotRow, bot: Option<&BotRow>, max_attempts: i32) -> Decision {
    // Busy slots are candidates only as orphans (no bot, or a finished one).
    if slot.status == SlotStatus::Busy {
        return Decision::Release;
    }
    if slot.status == SlotStatus::Deploying {
        if let Some(bot) = bot.filter(|bot| bot.fresh && !bot.status.is_terminal()) {
            return if bot.status.is_past_deploying() {
                Decision::MarkBusy
            } else {
                Decision::Skip
            };
        }
    }
    if slot.recovery_attempts >= max_attempts {
        Decision::Delete
    } else {
        Decision::Recover
    }
}

pub struct SlotRecovery {
    context: Context,
    settings: SlotRecoverySettings,
}

impl SlotRecovery {
    pub const NAME: &'static str = "slot_recovery";

    pub fn new(context: Context, settings: SlotRecoverySettings) -> Self {
        Self { context, settings }
    }

    /// Claims and handles one batch of candidates; returns the ids it left for later
    /// (claimed, but out of time before their platform call).
    async fn handle(
        &self,
        ids: &[i32],
        trigger: Trigger,
        report: &mut SlotRecoveryReport,
    ) -> Result<Vec<i32>, RunError> {
        let context = &self.context;
        context
            .bounded(self.handle_unbounded(ids, trigger, report))
            .await
    }

    async fn handle_unbounded(
        &self,
        ids: &[i32],
        trigger: Trigger,
        report: &mut SlotRecoveryReport,
    ) -> Result<Vec<i32>, RunError> {
        let mut client = self.context.pool.get().await?;
        let tx = client.transaction().await?;

        let settings = &self.settings;
        let claimed = slots::claim_candidates(
            &tx,
            ids,
            settings.deploy_timeout,
            settings.heartbeat_freshness,
        )
        .await?;
        if claimed.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let bot_ids: Vec<i32> = claimed.iter().filter_map(|s| s.assigned_bot_id).collect();
        let bots: HashMap<i32, BotRow> =
            bots::lock(&tx, &bot_ids, self.settings.heartbeat_freshness)
                .await?
                .into_iter()
                .map(|bot| (bot.id, bot))
                .collect();

        let decided: Vec<(&SlotRow, Decision)> = claimed
            .iter()
            .map(|slot| {
                let bot = slot.assigned_bot_id.and_then(|id| bots.get(&id));
                (slot, decide(slot, bot, self.settings.max_recovery_attempts))
            })
            .collect();

        let outcomes = self.call_platform(&decided).await;
        let writes = Writes::collect(&decided, &outcomes, &bots, &self.settings);

        let fatal = bots::mark_fatal(&tx, &writes.fatal).await?;
        slots::reset_to_idle(&tx, &writes.recovered).await?;
        slots::reset_to_idle(&tx, &writes.released).await?;
        slots::mark_error(&tx, &writes.release_failed, false).await?;
        slots::mark_error(&tx, &writes.failed, true).await?;
        slots::mark_error(&tx, &writes.delete_failed, false).await?;
        slots::mark_busy(&tx, &writes.busy).await?;
        slots::delete(&tx, &writes.deleted).await?;
        let entries = writes.audit_entries(&fatal);
        let actor = Actor {
            worker: Self::NAME,
            trigger,
            replica: &self.context.replica,
        };
        audit::record(&tx, actor, &entries).await?;
        tx.commit().await?;

        for entry in &entries {
            info!(
                action = entry.action.as_str(),
                slot_id = entry.slot_id,
                bot_id = entry.bot_id,
                reason = %entry.reason,
                "slot recovery action"
            );
        }
        report.recovered += writes.recovered.len() as u64;
        report.released += writes.released.len() as u64;
        report.failed += (writes.failed.len() + writes.delete_failed.len()) as u64;
        report.deleted += writes.deleted.len() as u64;
        report.skipped += writes.skipped + writes.busy.len() as u64;
        Ok(writes.deferred)
    }

    /// Stops or deletes the applications, concurrently up to the platform's limit. Each slot
    /// gets at most one call; a hung call only costs its own slot.
    async fn call_platform(&self, decided: &[(&SlotRow, Decision)]) -> Outcomes {
        let calls = decided
            .iter()
            .filter_map(|(slot, decision)| {
                let operation = match decision {
                    Decision::Recover | Decision::Release => Operation::Stop,
                    Decision::Delete => Operation::Delete,
                    Decision::Skip | Decision::MarkBusy => return None,
                };
                Some(SlotCall {
                    slot_id: slot.id,
                    operation,
                    uuid: slot.coolify_service_uuid.clone(),
                })
            })
            .collect();
        let context = &self.context;
        context
            .platform
            .call_each(calls, context.concurrency, context.platform_budget)
            .await
    }
}

type Outcomes = HashMap<i32, Option<Result<(), PlatformError>>>;

/// The writes of one batch, grouped so each kind is one statement.
#[derive(Default)]
struct Writes {
    fatal: Vec<(i32, String)>,
    recovered: Vec<i32>,
    failed: Vec<Failure>,
    delete_failed: Vec<Failure>,
    deleted: Vec<i32>,
    busy: Vec<i32>,
    released: Vec<i32>,
    release_failed: Vec<Failure>,
    skipped: u64,
    /// Claimed, but the batch ran out of time before its platform call: untouched.
    deferred: Vec<i32>,
    /// Per slot: its bot, what happened, why, and since when.
    entries: Vec<AuditEntry>,
    /// Bot id → (slot id, reason, since) for the FATAL entries, once known which took effect.
    fatal_context: HashMap<i32, AuditEntry>,
}

impl Writes {
    fn collect(
        decided: &[(&SlotRow, Decision)],
        outcomes: &Outcomes,
        bots: &HashMap<i32, BotRow>,
        settings: &SlotRecoverySettings,
    ) -> Self {
        let mut writes = Writes::default();
        for (slot, decision) in decided {
            let bot = slot.assigned_bot_id.and_then(|id| bots.get(&id));
            let why = why_candidate(slot, bot, settings.deploy_timeout);
            let entry = |action, reason: String| AuditEntry {
                action,
                slot_id: Some(slot.id),
                bot_id: slot.assigned_bot_id,
                reason,
                status_since: slot.status_since,
            };

            match decision {
                Decision::Skip => {
                    writes.skipped += 1;
                    continue;
                }
                Decision::MarkBusy => {
                    writes.busy.push(slot.id);
                    writes.entries.push(entry(
                        Action::SlotMarkedBusy,
                        "slot was deploying but its bot is running and heartbeating".into(),
                    ));
                    continue;
                }
                Decision::Recover | Decision::Delete | Decision::Release => {}
            }
            let Some(Some(outcome)) = outcomes.get(&slot.id) else {
                writes.deferred.push(slot.id);
                continue;
            };

            if let Some(bot) = bot.filter(|_| *decision != Decision::Release) {
                if bot
                    .status
                    .worker_may_move_to(&crate::status::BotStatus::Fatal)
                {
                    let reason = format!("slot recovery: {why}");
                    writes.fatal.push((bot.id, reason.clone()));
                    writes
                        .fatal_context
                        .insert(bot.id, entry(Action::BotMarkedFatal, reason));
                }
            }

            match (decision, outcome) {
                (Decision::Release, Ok(())) => {
                    writes.released.push(slot.id);
                    writes.entries.push(entry(Action::ResourcesReleased, why));
                }
                (Decision::Release, Err(error)) => {
                    let reason = format!("releasing an orphaned slot failed: {error} ({why})");
                    let retry_in = std::time::Duration::ZERO;
                    let failure = Failure {
                        slot_id: slot.id,
                        reason: reason.clone(),
                        retry_in,
                    };
                    writes.release_failed.push(failure);
                    writes.entries.push(entry(Action::ReleaseFailed, reason));
                }
                (Decision::Recover, Ok(())) => {
                    writes.recovered.push(slot.id);
                    writes.entries.push(entry(Action::SlotRecovered, why));
                }
                (Decision::Recover, Err(error)) => {
                    let attempt = slot.recovery_attempts + 1;
                    let reason = format!("recovery attempt {attempt} failed: {error}");
                    let retry_in = settings.retry_delay(attempt);
                    writes.failed.push(Failure {
                        slot_id: slot.id,
                        reason: reason.clone(),
                        retry_in,
                    });
                    writes
                        .entries
                        .push(entry(Action::SlotRecoveryFailed, reason));
                }
                (Decision::Delete, Ok(())) => {
                    writes.deleted.push(slot.id);
                    let reason = format!(
                        "deleted after {} failed recovery attempts",
                        slot.recovery_attempts
                    );
                    writes.entries.push(entry(Action::SlotDeleted, reason));
                }
                (Decision::Delete, Err(error)) => {
                    let reason = format!("delete failed, will retry: {error}");
                    let retry_in = settings.retry_delay(slot.recovery_attempts);
                    writes.delete_failed.push(Failure {
                        slot_id: slot.id,
                        reason: reason.clone(),
                        retry_in,
                    });
                    writes
                        .entries
                        .push(entry(Action::SlotRecoveryFailed, reason));
                }
                (Decision::Skip | Decision::MarkBusy, _) => unreachable!("handled above"),
            }
        }
        writes
    }

    /// The audit entries, with a FATAL entry only for bots the guarded write really changed.
    fn audit_entries(&self, fatal: &[i32]) -> Vec<AuditEntry> {
        let mut entries: Vec<AuditEntry> = fatal
            .iter()
            .filter_map(|id| self.fatal_context.get(id).cloned())
            .collect();
        entries.extend(self.entries.iter().cloned());
        entries
    }
}

/// Why the slot is a candidate, in words for `error_message`, `deployment_error` and the audit.
fn why_candidate(slot: &SlotRow, bot: Option<&BotRow>, deploy_timeout: Duration) -> String {
    let id = slot.id;
    let orphan = |state: &str| match (slot.assigned_bot_id, bot) {
        (None, _) => format!("slot {id} {state} with no bot"),
        (Some(bot_id), Some(bot)) => format!(
            "slot {id} {state} for bot {bot_id}, which is {}",
            bot.status
        ),
        (Some(bot_id), None) => format!("slot {id} {state} for bot {bot_id}, which is gone"),
    };
    match slot.status {
        SlotStatus::Busy => orphan("busy"),
        SlotStatus::Deploying if !bot.is_some_and(|bot| !bot.status.is_terminal()) => {
            orphan("deploying")
        }
        SlotStatus::Deploying => format!(
            "slot {id} stuck deploying for more than {}",
            humantime::format_duration(deploy_timeout)
        ),
        _ => match slot.error_message.as_deref() {
            Some(message) if !message.is_empty() => format!("slot {id} in error: {message}"),
            _ => format!("slot {id} in error"),
        },
    }
}

impl Worker for SlotRecovery {
    type Report = SlotRecoveryReport;
    const NAME: &'static str = Self::NAME;

    async fn run(&self, batch: &Batch) -> Result<SlotRecoveryReport, RunError> {
        let mut report = SlotRecoveryReport::default();
        let (deploy, fresh) = (
            self.settings.deploy_timeout,
            self.settings.heartbeat_freshness,
        );
        let mut sweep_lock = None;
        let ids = match &batch.scope {
            Scope::Ids(ids) => ids.clone(),
            Scope::Sweep => {
                let pool = &self.context.pool;
                let Some(lock) = locks::try_sweep(pool, locks::SLOT_RECOVERY_SWEEP).await? else {
                    info!("another replica is sweeping slots; this sweep is skipped");
                    return Ok(report);
                };
                sweep_lock = Some(lock);
                let client = self.context.pool.get().await?;
                slots::sweep_candidates(&client, deploy, fresh).await?
            }
            Scope::Due => {
                let client = self.context.pool.get().await?;
                slots::due(&client, deploy, fresh, self.context.batch_size as i64).await?
            }
        };

        // One transaction per batch; every round makes progress, since the calls started
        // within a batch's budget all get outcomes.
        let mut pending = ids;
        while !pending.is_empty() {
            let mut deferred = Vec::new();
            for chunk in pending.chunks(self.context.batch_size.max(1)) {
                deferred.extend(self.handle(chunk, batch.trigger, &mut report).await?);
            }
            pending = deferred;
        }
        if let Some(lock) = sweep_lock {
            lock.release().await;
        }
        Ok(report)
    }

    async fn next_deadline(&self) -> Result<Option<f64>, RunError> {
        let client = self.context.pool.get().await?;
        let (deploy, fresh) = (
            self.settings.deploy_timeout,
            self.settings.heartbeat_freshness,
        );
        Ok(slots::next_deadline(&client, deploy, fresh).await?)
    }
}

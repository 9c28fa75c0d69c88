//! BotHealth: bots that should be heartbeating (JOINING_CALL, IN_WAITING_ROOM, IN_CALL,
//! LEAVING) but have been silent for longer than the heartbeat timeout are marked FATAL, and
//! the slot each one held is stopped and returned to the pool.
//!
//! DEPLOYING bots are never looked at here: a deployment that hangs is a slot problem and
//! belongs to SlotRecovery.
//!
//! A batch is two transactions. The first marks the silent bots FATAL (guarded: still in a
//! watched status, still silent, not locked by anyone) with their audit entries. The second
//! claims their slots, stops them on the platform, and frees them, or, if the stop fails,
//! leaves them in `error` so SlotRecovery takes over. Keeping the platform calls out of the
//! first transaction means milo's writes to those bots never wait on the platform.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use std::time::SystemTime;

use serde::Serialize;
use tracing::{error, info};

use super::{Context, RunError, RunReport, Worker};
use crate::config::BotHealthSettings;
use crate::pipeline::{Batch, Scope};
use crate::platform::{Operation, SlotCall};
use crate::store::audit::{self, Actor};
use crate::store::bots::{self, MarkedBot, Silence};
use crate::store::slots::{self, Failure};
use crate::store::{locks, Action, AuditEntry, Trigger};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BotHealthReport {
    /// Bots in a heartbeat-watched status that were looked at.
    pub checked: u64,
    pub marked_fatal: u64,
    /// Slots stopped and returned to the pool.
    pub resources_released: u64,
    /// The run stopped marking at `max_fatal_per_run`.
    pub capped: bool,
}

impl BotHealthReport {
    fn is_idle(&self) -> bool {
        self.marked_fatal == 0 && self.resources_released == 0
    }
}

impl RunReport for BotHealthReport {
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
            checked = self.checked,
            marked_fatal = self.marked_fatal,
            resources_released = self.resources_released,
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            "bot health run finished"
        );
    }
}

/// Outages: while the database or the network between bots and database is down, no bot can
/// write a heartbeat, so right after an outage every bot looks silent. The rule: no bot is
/// judged on evidence older than this process's own uninterrupted view of the database. That
/// view starts at the first run, and again at every run after a failed one and at every
/// resync (the listener subscribing after a loss); silence is measured from the later of the
/// bot's last heartbeat and that moment. The price: after a start or an outage, this process
/// marks no bot FATAL for one heartbeat timeout. Other replicas with an unbroken view still do.
/// Slot ids by the bot holding them.
type Held = HashMap<i32, Vec<i32>>;

pub struct BotHealth {
    context: Context,
    settings: BotHealthSettings,
    /// Start of the uninterrupted view (UTC wall clock, database time); `None` until known.
    view_since: Mutex<Option<SystemTime>>,
    /// The last run hit `max_fatal_per_run`: deadlines are suspended, so that the rest wait
    /// for the tick (or an operator) instead of being marked a cap's worth every second.
    capped: AtomicBool,
}

impl BotHealth {
    pub const NAME: &'static str = "bot_health";

    pub fn new(context: Context, settings: BotHealthSettings) -> Self {
        Self {
            context,
            settings,
            view_since: Mutex::new(None),
            capped: AtomicBool::new(false),
        }
    }

    fn view_since(&self) -> Option<SystemTime> {
        *self
            .view_since
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set_view_since(&self, since: Option<SystemTime>) {
        *self
            .view_since
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = since;
    }

    fn silence(&self) -> Silence {
        let floor = if self.settings.outage_grace {
            self.view_since()
        } else {
            None
        };
        Silence {
            timeout: self.settings.heartbeat_timeout,
            floor,
        }
    }

    /// Starts a new uninterrupted view when there is none, or when the trigger says the view
    /// was interrupted.
    async fn refresh_view(&self, trigger: Trigger) -> Result<(), RunError> {
        if !self.settings.outage_grace
            || (self.view_since().is_some() && trigger != Trigger::Resync)
        {
            return Ok(());
        }
        let client = self.context.pool.get().await?;
        let now = bots::now(&client).await?;
        self.set_view_since(Some(now));
        Ok(())
    }

    fn actor(&self, trigger: Trigger) -> Actor<'_> {
        Actor {
            worker: Self::NAME,
            trigger,
            replica: &self.context.replica,
        }
    }

    /// Checks one batch; returns the ids that were checked.
    async fn handle(
        &self,
        ids: &[i32],
        trigger: Trigger,
        report: &mut BotHealthReport,
        held: &mut Option<Held>,
    ) -> Result<Vec<i32>, RunError> {
        let context = &self.context;
        context
            .bounded(self.handle_unbounded(ids, trigger, report, held))
            .await
    }

    async fn handle_unbounded(
        &self,
        ids: &[i32],
        trigger: Trigger,
        report: &mut BotHealthReport,
        held: &mut Option<Held>,
    ) -> Result<Vec<i32>, RunError> {
        let mut client = self.context.pool.get().await?;
        let tx = client.transaction().await?;
        let watched = bots::heartbeat_watched(&tx, ids).await?;
        let allowed = self
            .settings
            .max_fatal_per_run
            .saturating_sub(report.marked_fatal as usize);
        let marked = bots::mark_silent_fatal(&tx, &watched, self.silence(), allowed as i64).await?;
        let entries: Vec<AuditEntry> = marked
            .iter()
            .map(|bot| AuditEntry {
                action: Action::BotMarkedFatal,
                slot_id: None,
                bot_id: Some(bot.id),
                reason: bot.reason.clone(),
                status_since: bot.silent_since,
            })
            .collect();
        audit::record(&tx, self.actor(trigger), &entries).await?;
        tx.commit().await?;
        drop(client);

        for bot in &marked {
            let reason = &bot.reason;
            info!(action = "bot_marked_fatal", bot_id = bot.id, %reason, "bot health action");
        }
        report.checked += watched.len() as u64;
        report.marked_fatal += marked.len() as u64;
        if marked.len() == allowed && !report.capped {
            report.capped = true;
            error!(
                cap = self.settings.max_fatal_per_run,
                "FATAL cap reached in one run; the remaining silent bots wait for the next sweep. \
                 So many silent bots at once more likely means the heartbeat path is broken"
            );
        }
        if !marked.is_empty() {
            report.resources_released += self.release(&marked, trigger, held).await?;
        }
        Ok(watched)
    }

    /// Stops and frees the slots still held by bots just marked FATAL. Returns how many were
    /// freed. A slot another worker holds right now is left to it.
    async fn release(
        &self,
        marked: &[MarkedBot],
        trigger: Trigger,
        held: &mut Option<Held>,
    ) -> Result<u64, RunError> {
        let mut client = self.context.pool.get().await?;
        let tx = client.transaction().await?;
        if held.is_none() {
            *held = Some(slots::held(&tx).await?);
        }
        let bot_ids: Vec<i32> = marked.iter().map(|bot| bot.id).collect();
        let slot_ids: Vec<i32> = bot_ids
            .iter()
            .filter_map(|id| held.as_ref().and_then(|held| held.get(id)))
            .flatten()
            .copied()
            .collect();
        let held = slots::claim_held(&tx, &slot_ids, &bot_ids).await?;

        let calls = held
            .iter()
            .map(|slot| SlotCall {
                slot_id: slot.id,
                operation: Operation::Stop,
                uuid: slot.coolify_service_uuid.clone(),
            })
            .collect();
        let context = &self.context;
        let mut outcomes = context
            .platform
            .call_each(calls, context.concurrency, context.platform_budget)
            .await;

        let by_id: HashMap<i32, &MarkedBot> = marked.iter().map(|bot| (bot.id, bot)).collect();
        let mut freed = Vec::new();
        let mut failed = Vec::new();
        let mut entries = Vec::new();
        let mut deferred = Vec::new();
        for slot in &held {
            let Some(Some(outcome)) = outcomes.remove(&slot.id) else {
                deferred.extend(slot.assigned_bot_id);
                continue;
            };
            let bot = slot.assigned_bot_id.and_then(|id| by_id.get(&id));
            let (action, reason) = match outcome {
                Ok(()) => {
                    freed.push(slot.id);
                    let why = bot.map_or("", |bot| bot.reason.as_str());
                    (
                        Action::ResourcesReleased,
                        format!("slot of a FATAL bot stopped: {why}"),
                    )
                }
                Err(error) => {
                    let reason = format!("releasing the slot of a FATAL bot failed: {error}");
                    // Handed to SlotRecovery at once: no retry delay.
                    let retry_in = Duration::ZERO;
                    failed.push(Failure {
                        slot_id: slot.id,
                        reason: reason.clone(),
                        retry_in,
                    });
                    (Action::ReleaseFailed, reason)
                }
            };
            entries.push(AuditEntry {
                action,
                slot_id: Some(slot.id),
                bot_id: slot.assigned_bot_id,
                reason,
                // The release answers the bot's silence, so it is timed from there.
                status_since: bot.and_then(|bot| bot.silent_since),
            });
        }

        slots::reset_to_idle(&tx, &freed).await?;
        slots::mark_error(&tx, &failed, false).await?;
        audit::record(&tx, self.actor(trigger), &entries).await?;
        tx.commit().await?;

        for entry in &entries {
            info!(
                action = entry.action.as_str(),
                slot_id = entry.slot_id,
                bot_id = entry.bot_id,
                reason = %entry.reason,
                "bot health action"
            );
        }
        // Out of time before these slots' calls: release them in a fresh batch.
        let mut released = freed.len() as u64;
        if !deferred.is_empty() {
            let rest: Vec<MarkedBot> = marked
                .iter()
                .filter(|bot| deferred.contains(&bot.id))
                .cloned()
                .collect();
            released += Box::pin(self.release(&rest, trigger, &mut None)).await?;
        }
        Ok(released)
    }
}

impl Worker for BotHealth {
    type Report = BotHealthReport;
    const NAME: &'static str = Self::NAME;

    async fn run(&self, batch: &Batch) -> Result<BotHealthReport, RunError> {
        let outcome = self.run_batches(batch).await;
        match &outcome {
            // The view of the database was interrupted: the next run starts a new one.
            Err(_) => self.set_view_since(None),
            Ok(report) => self.capped.store(report.capped, Ordering::Relaxed),
        }
        outcome
    }

    async fn next_deadline(&self) -> Result<Option<f64>, RunError> {
        if self.capped.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let client = self.context.pool.get().await?;
        Ok(bots::next_deadline(&client, self.silence()).await?)
    }
}

impl BotHealth {
    async fn run_batches(&self, batch: &Batch) -> Result<BotHealthReport, RunError> {
        self.refresh_view(batch.trigger).await?;
        let mut report = BotHealthReport::default();
        let mut sweep_lock = None;
        let ids = match &batch.scope {
            Scope::Ids(ids) => ids.clone(),
            Scope::Sweep => {
                let pool = &self.context.pool;
                let Some(lock) = locks::try_sweep(pool, locks::BOT_HEALTH_SWEEP).await? else {
                    info!("another replica is sweeping bots; this sweep is skipped");
                    return Ok(report);
                };
                sweep_lock = Some(lock);
                let client = self.context.pool.get().await?;
                bots::all_watched(&client).await?
            }
            Scope::Due => {
                let client = self.context.pool.get().await?;
                let limit = self.context.batch_size as i64;
                bots::due(&client, self.silence(), limit).await?
            }
        };
        // Which slot each bot holds, read once per run when the first bot needs releasing.
        let mut held = None;
        for chunk in ids.chunks(self.context.batch_size.max(1)) {
            self.handle(chunk, batch.trigger, &mut report, &mut held)
                .await?;
        }
        if let Some(lock) = sweep_lock {
            lock.release().await;
        }
        Ok(report)
    }
}

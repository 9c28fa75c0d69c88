//! Property tests: random sequences of what milo does (assign a slot to a new bot, join, go
//! on through the call, finish, break a slot, heartbeat), of time passing, of platform
//! faults, and of worker runs (focused checks, sweeps, two replicas at once), applied both to
//! a real database with the real workers and to a reference model in plain Rust.
//!
//! Each step is checked twice. Its outcome must be the model's prediction from the state
//! before it (statuses, assignments, attempts, ages, the audit rows written and the platform
//! calls made) wherever the outcome is deterministic, which is everything but two replicas
//! racing. And the invariants must hold whatever ran: see [`check_invariants`].
//!
//! Time passes by moving every stored timestamp back; the model keeps ages in whole
//! hundreds of seconds and every threshold sits halfway between two hundreds, so the few
//! milliseconds a step really takes never decide an outcome.
//!
//! One database serves a whole test function, emptied between cases. `PROPTEST_CASES` sets
//! the number of cases (see README, "Property tests and soak").

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use milo_workers::config::Settings;
use milo_workers::pipeline::Batch;
use milo_workers::platform::{Operation, SimulatedPlatform};
use milo_workers::status::{BotStatus, HEARTBEAT_STATUSES};
use milo_workers::store::Trigger;
use milo_workers::workers::{BotHealth, SlotRecovery, Worker};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use tokio_postgres::Client;

use crate::common::{self, TestDb};

const HEARTBEAT_TIMEOUT: i64 = 650;
const DEPLOY_TIMEOUT: i64 = 950;
/// Heartbeat freshness, which is also the orphan grace.
const FRESHNESS: i64 = 350;
const MAX_ATTEMPTS: i32 = 3;
/// Time advances in steps of this many seconds.
const TICK: i64 = 100;

const DEFAULT_CASES: u32 = 24;

fn settings() -> Settings {
    let mut settings = common::settings();
    settings.bots.heartbeat_timeout = Duration::from_secs(HEARTBEAT_TIMEOUT as u64);
    settings.slots.deploy_timeout = Duration::from_secs(DEPLOY_TIMEOUT as u64);
    settings.slots.heartbeat_freshness = Duration::from_secs(FRESHNESS as u64);
    settings.slots.max_recovery_attempts = MAX_ATTEMPTS;
    settings.pool_size = 4;
    settings
}

// ------------------------------------------------------------------------------------------
// The state, as read from the database and as the model predicts it.

#[derive(Debug, Clone, PartialEq, Eq)]
struct Bot {
    status: String,
    /// Seconds since the last heartbeat, in whole ticks; `None` before the first.
    heartbeat_age: Option<i64>,
    /// Seconds since the bot entered its status.
    status_age: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    uuid: String,
    status: String,
    bot: Option<i32>,
    attempts: i32,
    used_age: Option<i64>,
    status_age: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct World {
    bots: BTreeMap<i32, Bot>,
    slots: BTreeMap<i32, Slot>,
}

/// One audit row: `(worker, action, slot, bot)`.
type AuditRow = (String, String, Option<i32>, Option<i32>);
/// The applications whose platform calls fail.
type Failing = HashSet<String>;
/// One platform call: `(operation, uuid, succeeded)`.
type CallRow = (Operation, String, bool);

fn is_terminal(status: &str) -> bool {
    BotStatus::parse(status).is_terminal()
}

fn watched(status: &str) -> bool {
    HEARTBEAT_STATUSES.contains(&status)
}

impl World {
    fn set_slot_status(&mut self, id: i32, status: &str) {
        let slot = self.slots.get_mut(&id).expect("slot");
        if slot.status != status {
            slot.status = status.to_owned();
            slot.status_age = 0;
        }
    }

    fn set_bot_status(&mut self, id: i32, status: &str) {
        let bot = self.bots.get_mut(&id).expect("bot");
        if bot.status != status {
            bot.status = status.to_owned();
            bot.status_age = 0;
        }
    }

    fn reset_to_idle(&mut self, id: i32) {
        self.set_slot_status(id, "idle");
        let slot = self.slots.get_mut(&id).expect("slot");
        slot.bot = None;
        slot.attempts = 0;
        slot.used_age = Some(0);
    }

    fn slot_of(&self, bot: i32) -> Option<i32> {
        self.slots
            .iter()
            .find(|(_, slot)| slot.bot == Some(bot))
            .map(|(id, _)| *id)
    }

    fn nth_slot(&self, n: usize) -> Option<i32> {
        let len = self.slots.len();
        (len > 0).then(|| *self.slots.keys().nth(n % len).expect("in range"))
    }

    fn nth_bot(&self, n: usize) -> Option<i32> {
        let len = self.bots.len();
        (len > 0).then(|| *self.bots.keys().nth(n % len).expect("in range"))
    }
}

/// What a worker step is predicted to do.
#[derive(Debug, Default)]
struct Predicted {
    world: World,
    audit: Vec<AuditRow>,
    calls: Vec<CallRow>,
}

impl Predicted {
    fn record(&mut self, worker: &str, action: &str, slot: Option<i32>, bot: Option<i32>) {
        self.audit
            .push((worker.to_owned(), action.to_owned(), slot, bot));
    }
}

// ------------------------------------------------------------------------------------------
// The reference model of the two workers.

const SLOT_RECOVERY: &str = "slot_recovery";
const BOT_HEALTH: &str = "bot_health";

fn is_slot_candidate(world: &World, slot: &Slot) -> bool {
    let deploy_age = slot.used_age.unwrap_or(slot.status_age);
    let finished_bot = |id: i32| {
        world
            .bots
            .get(&id)
            .is_some_and(|bot| is_terminal(&bot.status) && bot.status_age > FRESHNESS)
    };
    match slot.status.as_str() {
        "error" => true,
        "deploying" if deploy_age > DEPLOY_TIMEOUT => true,
        "busy" | "deploying" => slot.status_age > FRESHNESS && slot.bot.map_or(true, finished_bot),
        _ => false,
    }
}

/// SlotRecovery over `scope` (every slot when `None`), all in one batch.
fn model_slot_recovery(before: &World, scope: Option<&[i32]>, failing: &Failing) -> Predicted {
    let mut out = Predicted {
        world: before.clone(),
        ..Predicted::default()
    };
    for (&id, slot) in &before.slots {
        if scope.is_some_and(|ids| !ids.contains(&id)) || !is_slot_candidate(before, slot) {
            continue;
        }
        let bot = slot.bot.and_then(|b| before.bots.get(&b));
        let ok = !failing.contains(&slot.uuid);
        if slot.status == "busy" {
            out.calls.push((Operation::Stop, slot.uuid.clone(), ok));
            if ok {
                out.world.reset_to_idle(id);
                out.record(SLOT_RECOVERY, "resources_released", Some(id), slot.bot);
            } else {
                out.world.set_slot_status(id, "error");
                out.record(SLOT_RECOVERY, "release_failed", Some(id), slot.bot);
            }
            continue;
        }
        if slot.status == "deploying" {
            let alive = bot.filter(|bot| {
                bot.heartbeat_age.is_some_and(|age| age < FRESHNESS) && !is_terminal(&bot.status)
            });
            if let Some(bot) = alive {
                if BotStatus::parse(&bot.status).is_past_deploying() {
                    out.world.set_slot_status(id, "busy");
                    out.record(SLOT_RECOVERY, "slot_marked_busy", Some(id), slot.bot);
                }
                continue;
            }
        }
        if let Some(bot_id) = slot.bot {
            let status = BotStatus::parse(&before.bots[&bot_id].status);
            if status.worker_may_move_to(&BotStatus::Fatal) {
                out.world.set_bot_status(bot_id, "FATAL");
                out.record(SLOT_RECOVERY, "bot_marked_fatal", Some(id), Some(bot_id));
            }
        }
        if slot.attempts >= MAX_ATTEMPTS {
            out.calls.push((Operation::Delete, slot.uuid.clone(), ok));
            if ok {
                out.world.slots.remove(&id);
                out.record(SLOT_RECOVERY, "slot_deleted", Some(id), slot.bot);
            } else {
                out.world.set_slot_status(id, "error");
                out.record(SLOT_RECOVERY, "slot_recovery_failed", Some(id), slot.bot);
            }
        } else {
            out.calls.push((Operation::Stop, slot.uuid.clone(), ok));
            if ok {
                out.world.reset_to_idle(id);
                out.record(SLOT_RECOVERY, "slot_recovered", Some(id), slot.bot);
            } else {
                out.world.set_slot_status(id, "error");
                out.world.slots.get_mut(&id).expect("slot").attempts += 1;
                out.record(SLOT_RECOVERY, "slot_recovery_failed", Some(id), slot.bot);
            }
        }
    }
    out
}

/// BotHealth over `scope` (every bot when `None`).
fn model_bot_health(before: &World, scope: Option<&[i32]>, failing: &Failing) -> Predicted {
    let mut out = Predicted {
        world: before.clone(),
        ..Predicted::default()
    };
    let mut marked = Vec::new();
    for (&id, bot) in &before.bots {
        if scope.is_some_and(|ids| !ids.contains(&id)) || !watched(&bot.status) {
            continue;
        }
        if bot.heartbeat_age.unwrap_or(bot.status_age) > HEARTBEAT_TIMEOUT {
            out.world.set_bot_status(id, "FATAL");
            out.record(BOT_HEALTH, "bot_marked_fatal", None, Some(id));
            marked.push(id);
        }
    }
    for (&id, slot) in &before.slots {
        let held = slot.bot.is_some_and(|bot| marked.contains(&bot));
        if !held || !matches!(slot.status.as_str(), "busy" | "deploying") {
            continue;
        }
        let ok = !failing.contains(&slot.uuid);
        out.calls.push((Operation::Stop, slot.uuid.clone(), ok));
        if ok {
            out.world.reset_to_idle(id);
            out.record(BOT_HEALTH, "resources_released", Some(id), slot.bot);
        } else {
            out.world.set_slot_status(id, "error");
            out.record(BOT_HEALTH, "release_failed", Some(id), slot.bot);
        }
    }
    out
}

// ------------------------------------------------------------------------------------------
// Operations.

/// A worker run, by one replica.
#[derive(Debug, Clone, Copy)]
enum Run {
    SlotSweep,
    /// A focused check of every slot id.
    SlotAll,
    BotSweep,
    BotAll,
}

#[derive(Debug, Clone)]
enum Op {
    /// milo adds an idle slot to the pool.
    Provision,
    /// milo assigns an idle slot to a new bot and starts deploying it.
    Deploy {
        slot: usize,
    },
    /// The deploying bot joins: JOINING_CALL, first heartbeat, its slot busy.
    Join {
        bot: usize,
    },
    /// The bot moves one status on through the call (up to CALL_ENDED), heartbeating.
    Progress {
        bot: usize,
    },
    /// The bot is DONE; milo frees its slot, or forgets to.
    Finish {
        bot: usize,
        free_slot: bool,
    },
    /// milo marks a busy or deploying slot `error`.
    SlotError {
        slot: usize,
    },
    Heartbeat {
        bot: usize,
    },
    /// Time passes: this many ticks.
    Advance {
        ticks: i64,
    },
    Fail {
        slot: usize,
    },
    Heal {
        slot: usize,
    },
    SlotCheck {
        slot: usize,
    },
    SlotSweep,
    BotCheck {
        bot: usize,
    },
    BotSweep,
    /// Two replicas run at once.
    Replicas(Run, Run),
    /// A sweep of each worker, then the fleet must be consistent.
    Settle,
}

fn run_strategy() -> impl Strategy<Value = Run> {
    prop_oneof![
        Just(Run::SlotSweep),
        Just(Run::SlotAll),
        Just(Run::BotSweep),
        Just(Run::BotAll)
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let n = 0..8usize;
    prop_oneof![
        2 => Just(Op::Provision),
        4 => n.clone().prop_map(|slot| Op::Deploy { slot }),
        3 => n.clone().prop_map(|bot| Op::Join { bot }),
        3 => n.clone().prop_map(|bot| Op::Progress { bot }),
        2 => (n.clone(), any::<bool>()).prop_map(|(bot, free_slot)| Op::Finish { bot, free_slot }),
        2 => n.clone().prop_map(|slot| Op::SlotError { slot }),
        3 => n.clone().prop_map(|bot| Op::Heartbeat { bot }),
        5 => prop_oneof![3 => 1..=2i64, 1 => 3..=8i64].prop_map(|ticks| Op::Advance { ticks }),
        2 => n.clone().prop_map(|slot| Op::Fail { slot }),
        1 => n.clone().prop_map(|slot| Op::Heal { slot }),
        2 => n.clone().prop_map(|slot| Op::SlotCheck { slot }),
        2 => Just(Op::SlotSweep),
        2 => n.prop_map(|bot| Op::BotCheck { bot }),
        2 => Just(Op::BotSweep),
        3 => (run_strategy(), run_strategy()).prop_map(|(a, b)| Op::Replicas(a, b)),
        1 => Just(Op::Settle),
    ]
}

fn ops_strategy() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op_strategy(), 1..48)
}

// ------------------------------------------------------------------------------------------
// The real system.

/// Two replicas' workers on one database and one platform.
struct Harness {
    db: TestDb,
    milo: Client,
    platform: SimulatedPlatform,
    slots: [SlotRecovery; 2],
    bots: [BotHealth; 2],
}

impl Harness {
    async fn new() -> Self {
        let db = TestDb::new().await;
        let milo = db.client().await;
        let platform = SimulatedPlatform::new(Duration::from_millis(1), 0.0);
        let settings = settings();
        let context = |replica: &str| {
            let mut context = common::context(&db, &settings, Arc::new(platform.clone()));
            context.replica = replica.into();
            context
        };
        let slots = [
            SlotRecovery::new(context("a"), settings.slots.clone()),
            SlotRecovery::new(context("b"), settings.slots.clone()),
        ];
        let bots = [
            BotHealth::new(context("a"), settings.bots.clone()),
            BotHealth::new(context("b"), settings.bots.clone()),
        ];
        Self {
            db,
            milo,
            platform,
            slots,
            bots,
        }
    }

    async fn reset(&self) {
        self.milo
            .batch_execute(
                "TRUNCATE bot_pool_slots, bots, milo_workers.bot_status_since,
                     milo_workers.slot_status_since, milo_workers.slot_retry,
                     milo_workers.audit_log RESTART IDENTITY CASCADE",
            )
            .await
            .expect("reset");
    }

    async fn world(&self) -> World {
        let age = |column: &str| {
            format!(
                "(round(extract(epoch FROM timezone('UTC', now()) - {column}) / {TICK}) \
                 * {TICK})::int8"
            )
        };
        let bots = self
            .milo
            .query(
                &format!(
                    "SELECT b.id, b.status, {}, {} FROM bots b
                     JOIN milo_workers.bot_status_since ss ON ss.bot_id = b.id",
                    age("b.last_heartbeat"),
                    age("ss.since")
                ),
                &[],
            )
            .await
            .expect("bots");
        let slots = self
            .milo
            .query(
                &format!(
                    "SELECT s.id, s.coolify_service_uuid, s.status, s.assigned_bot_id,
                            s.recovery_attempts, {}, {}
                     FROM bot_pool_slots s
                     JOIN milo_workers.slot_status_since ss ON ss.slot_id = s.id",
                    age("s.last_used_at"),
                    age("ss.since")
                ),
                &[],
            )
            .await
            .expect("slots");
        World {
            bots: bots
                .iter()
                .map(|row| {
                    let bot = Bot {
                        status: row.get(1),
                        heartbeat_age: row.get(2),
                        status_age: row.get(3),
                    };
                    (row.get(0), bot)
                })
                .collect(),
            slots: slots
                .iter()
                .map(|row| {
                    let slot = Slot {
                        uuid: row.get(1),
                        status: row.get(2),
                        bot: row.get(3),
                        attempts: row.get(4),
                        used_age: row.get(5),
                        status_age: row.get(6),
                    };
                    (row.get(0), slot)
                })
                .collect(),
        }
    }

    /// Audit rows after `after_id`, and the last id.
    async fn audit_since(&self, after_id: i64) -> (Vec<AuditRow>, i64) {
        let rows = self
            .milo
            .query(
                "SELECT id, worker, action, slot_id, bot_id FROM milo_workers.audit_log
                 WHERE id > $1 ORDER BY id",
                &[&after_id],
            )
            .await
            .expect("audit");
        let last = rows.last().map_or(after_id, |row| row.get(0));
        let audit = rows
            .iter()
            .map(|row| (row.get(1), row.get(2), row.get(3), row.get(4)))
            .collect();
        (audit, last)
    }

    async fn run(&self, replica: usize, run: Run, world: &World) {
        let slot_ids: Vec<i32> = world.slots.keys().copied().collect();
        let bot_ids: Vec<i32> = world.bots.keys().copied().collect();
        match run {
            Run::SlotSweep => self.slots[replica]
                .run(&Batch::sweep(Trigger::Tick))
                .await
                .map(drop),
            Run::SlotAll => self.slots[replica]
                .run(&Batch::ids(Trigger::Notify, slot_ids))
                .await
                .map(drop),
            Run::BotSweep => self.bots[replica]
                .run(&Batch::sweep(Trigger::Tick))
                .await
                .map(drop),
            Run::BotAll => self.bots[replica]
                .run(&Batch::ids(Trigger::Notify, bot_ids))
                .await
                .map(drop),
        }
        .expect("worker run");
    }

    async fn exec(&self, sql: &str, params: &[&(dyn tokio_postgres::types::ToSql + Sync)]) {
        self.milo.execute(sql, params).await.expect(sql);
    }

    async fn provision(&self, case: u64, world: &mut World) {
        let n = world.slots.keys().max().map_or(1, |id| id + 1);
        let uuid = format!("app-{case}-{n}-{}", rand::random::<u32>());
        let id: i32 = self
            .milo
            .query_one(
                "INSERT INTO bot_pool_slots
                     (coolify_service_uuid, slot_name, status, last_used_at)
                 VALUES ($1, $1, 'idle', timezone('UTC', now())) RETURNING id",
                &[&uuid],
            )
            .await
            .expect("provision")
            .get(0);
        world.slots.insert(
            id,
            Slot {
                uuid,
                status: "idle".into(),
                bot: None,
                attempts: 0,
                used_age: Some(0),
                status_age: 0,
            },
        );
    }

    /// What milo does: applied to the database, and its effect on `world` (the model's
    /// prediction). Preconditions are decided on the model's state before the step.
    async fn milo(&self, op: &Op, case: u64, world: &mut World, failing: &mut HashSet<String>) {
        let now = "timezone('UTC', now())";
        match *op {
            Op::Provision => self.provision(case, world).await,
            Op::Deploy { slot } => {
                let Some(id) = world
                    .nth_slot(slot)
                    .filter(|id| world.slots[id].status == "idle")
                else {
                    return;
                };
                let bot: i32 = self
                    .milo
                    .query_one(
                        "INSERT INTO bots (status) VALUES ('DEPLOYING') RETURNING id",
                        &[],
                    )
                    .await
                    .expect("bot")
                    .get(0);
                self.exec(
                    &format!(
                        "UPDATE bot_pool_slots SET status = 'deploying', assigned_bot_id = $2,
                             last_used_at = {now} WHERE id = $1"
                    ),
                    &[&id, &bot],
                )
                .await;
                world.bots.insert(
                    bot,
                    Bot {
                        status: "DEPLOYING".into(),
                        heartbeat_age: None,
                        status_age: 0,
                    },
                );
                world.set_slot_status(id, "deploying");
                let slot = world.slots.get_mut(&id).expect("slot");
                slot.bot = Some(bot);
                slot.used_age = Some(0);
            }
            Op::Join { bot } => {
                let Some(id) = world
                    .nth_bot(bot)
                    .filter(|id| world.bots[id].status == "DEPLOYING")
                else {
                    return;
                };
                self.exec(
                    &format!(
                        "UPDATE bots SET status = 'JOINING_CALL', last_heartbeat = {now}
                         WHERE id = $1"
                    ),
                    &[&id],
                )
                .await;
                world.set_bot_status(id, "JOINING_CALL");
                world.bots.get_mut(&id).expect("bot").heartbeat_age = Some(0);
                let deploying = world
                    .slot_of(id)
                    .filter(|slot| world.slots[slot].status == "deploying");
                if let Some(slot) = deploying {
                    self.exec(
                        "UPDATE bot_pool_slots SET status = 'busy' WHERE id = $1",
                        &[&slot],
                    )
                    .await;
                    world.set_slot_status(slot, "busy");
                }
            }
            Op::Progress { bot } => {
                let Some(id) = world.nth_bot(bot) else { return };
                let next = match world.bots[&id].status.as_str() {
                    "JOINING_CALL" => "IN_WAITING_ROOM",
                    "IN_WAITING_ROOM" => "IN_CALL",
                    "IN_CALL" => "LEAVING",
                    "LEAVING" => "CALL_ENDED",
                    _ => return,
                };
                self.exec(
                    &format!("UPDATE bots SET status = $2, last_heartbeat = {now} WHERE id = $1"),
                    &[&id, &next],
                )
                .await;
                world.set_bot_status(id, next);
                world.bots.get_mut(&id).expect("bot").heartbeat_age = Some(0);
            }
            Op::Finish { bot, free_slot } => {
                let Some(id) = world
                    .nth_bot(bot)
                    .filter(|id| !is_terminal(&world.bots[id].status))
                else {
                    return;
                };
                self.exec("UPDATE bots SET status = 'DONE' WHERE id = $1", &[&id])
                    .await;
                world.set_bot_status(id, "DONE");
                let held = world.slot_of(id).filter(|slot| {
                    free_slot && matches!(world.slots[slot].status.as_str(), "busy" | "deploying")
                });
                if let Some(slot) = held {
                    self.exec(
                        &format!(
                            "UPDATE bot_pool_slots SET status = 'idle', assigned_bot_id = NULL,
                                 last_used_at = {now} WHERE id = $1"
                        ),
                        &[&slot],
                    )
                    .await;
                    world.set_slot_status(slot, "idle");
                    let slot = world.slots.get_mut(&slot).expect("slot");
                    slot.bot = None;
                    slot.used_age = Some(0);
                }
            }
            Op::SlotError { slot } => {
                let Some(id) = world
                    .nth_slot(slot)
                    .filter(|id| matches!(world.slots[id].status.as_str(), "busy" | "deploying"))
                else {
                    return;
                };
                self.exec(
                    "UPDATE bot_pool_slots SET status = 'error', error_message = 'milo: crashed'
                     WHERE id = $1",
                    &[&id],
                )
                .await;
                world.set_slot_status(id, "error");
            }
            Op::Heartbeat { bot } => {
                let Some(id) = world
                    .nth_bot(bot)
                    .filter(|id| !is_terminal(&world.bots[id].status))
                else {
                    return;
                };
                self.exec(
                    &format!("UPDATE bots SET last_heartbeat = {now} WHERE id = $1"),
                    &[&id],
                )
                .await;
                world.bots.get_mut(&id).expect("bot").heartbeat_age = Some(0);
            }
            Op::Advance { ticks } => {
                let secs = (ticks * TICK) as f64;
                for sql in [
                    "UPDATE bots SET last_heartbeat = last_heartbeat - make_interval(secs => $1)",
                    "UPDATE bot_pool_slots SET last_used_at = last_used_at
                         - make_interval(secs => $1)",
                    "UPDATE milo_workers.bot_status_since SET since = since
                         - make_interval(secs => $1)",
                    "UPDATE milo_workers.slot_status_since SET since = since
                         - make_interval(secs => $1)",
                    "UPDATE milo_workers.slot_retry SET not_before = not_before
                         - make_interval(secs => $1)",
                ] {
                    self.exec(sql, &[&secs]).await;
                }
                let by = ticks * TICK;
                for bot in world.bots.values_mut() {
                    bot.status_age += by;
                    bot.heartbeat_age = bot.heartbeat_age.map(|age| age + by);
                }
                for slot in world.slots.values_mut() {
                    slot.status_age += by;
                    slot.used_age = slot.used_age.map(|age| age + by);
                }
            }
            Op::Fail { slot } | Op::Heal { slot } => {
                let Some(id) = world.nth_slot(slot) else {
                    return;
                };
                let uuid = world.slots[&id].uuid.clone();
                if matches!(op, Op::Fail { .. }) {
                    self.platform.fail(&uuid);
                    failing.insert(uuid);
                } else {
                    self.platform.heal(&uuid);
                    failing.remove(&uuid);
                }
            }
            _ => unreachable!("not milo's: {op:?}"),
        }
    }

    /// Runs one case; an `Err` names the step and what went wrong.
    async fn case(&self, case: u64, ops: &[Op]) -> Result<(), String> {
        self.reset().await;
        let mut failing = HashSet::new();
        let mut world = World::default();
        for _ in 0..3 {
            self.provision(case, &mut world).await;
        }
        let mut audit_id = 0;
        let mut calls_seen = self.platform.calls().len();
        for (step, op) in ops.iter().enumerate() {
            let before = self.world().await;
            let fail = |what: String| format!("step {step} ({op:?}): {what}\nbefore: {before:#?}");
            if before != world {
                return Err(fail(format!("the model drifted: {world:#?}")));
            }
            let predicted = match op {
                Op::SlotCheck { slot } => {
                    let ids: Vec<i32> = before.nth_slot(*slot).into_iter().collect();
                    self.slots[0]
                        .run(&Batch::ids(Trigger::Notify, ids.clone()))
                        .await
                        .map_err(|e| fail(format!("run failed: {e}")))?;
                    Some(model_slot_recovery(&before, Some(&ids), &failing))
                }
                Op::SlotSweep => {
                    self.run(step % 2, Run::SlotSweep, &before).await;
                    Some(model_slot_recovery(&before, None, &failing))
                }
                Op::BotCheck { bot } => {
                    let ids: Vec<i32> = before.nth_bot(*bot).into_iter().collect();
                    self.bots[0]
                        .run(&Batch::ids(Trigger::Notify, ids.clone()))
                        .await
                        .map_err(|e| fail(format!("run failed: {e}")))?;
                    Some(model_bot_health(&before, Some(&ids), &failing))
                }
                Op::BotSweep => {
                    self.run(step % 2, Run::BotSweep, &before).await;
                    Some(model_bot_health(&before, None, &failing))
                }
                Op::Replicas(a, b) => {
                    tokio::join!(self.run(0, *a, &before), self.run(1, *b, &before));
                    None
                }
                Op::Settle => {
                    self.run(0, Run::BotSweep, &before).await;
                    let middle = self.world().await;
                    self.run(1, Run::SlotSweep, &middle).await;
                    let first = model_bot_health(&before, None, &failing);
                    let second = model_slot_recovery(&first.world, None, &failing);
                    Some(Predicted {
                        world: second.world,
                        audit: [first.audit, second.audit].concat(),
                        calls: [first.calls, second.calls].concat(),
                    })
                }
                milo => {
                    let mut next = before.clone();
                    self.milo(milo, case, &mut next, &mut failing).await;
                    Some(Predicted {
                        world: next,
                        ..Predicted::default()
                    })
                }
            };
            let after = self.world().await;
            let (audit, last) = self.audit_since(audit_id).await;
            audit_id = last;
            let all_calls = self.platform.calls();
            let calls: Vec<CallRow> = all_calls[calls_seen..]
                .iter()
                .map(|call| (call.operation, call.uuid.clone(), call.succeeded))
                .collect();
            calls_seen = all_calls.len();

            check_invariants(op, &before, &after, &audit, &calls).map_err(fail)?;
            if matches!(op, Op::Settle) {
                check_settled(&after).map_err(fail)?;
            }
            if self.platform.overlapping_calls() != 0 {
                return Err(fail(
                    "two platform calls for one application overlapped".into(),
                ));
            }
            match predicted {
                Some(predicted) => {
                    compare(&predicted, &after, &audit, &calls).map_err(fail)?;
                    world = predicted.world;
                }
                // Replicas racing: whatever happened, the invariants held; go on from there.
                None => world = after,
            }
        }
        Ok(())
    }
}

fn sorted<T: Ord + Clone>(items: &[T]) -> Vec<T> {
    let mut items = items.to_vec();
    items.sort();
    items
}

fn compare(
    predicted: &Predicted,
    after: &World,
    audit: &[AuditRow],
    calls: &[CallRow],
) -> Result<(), String> {
    if predicted.world != *after {
        return Err(format!(
            "state differs from the model\nmodel: {:#?}\nreal: {after:#?}",
            predicted.world
        ));
    }
    if sorted(&predicted.audit) != sorted(audit) {
        return Err(format!(
            "audit differs from the model\nmodel: {:?}\nreal: {audit:?}",
            predicted.audit
        ));
    }
    let calls_key = |calls: &[CallRow]| {
        sorted(
            &calls
                .iter()
                .map(|(op, uuid, ok)| (op.to_string(), uuid.clone(), *ok))
                .collect::<Vec<_>>(),
        )
    };
    if calls_key(&predicted.calls) != calls_key(calls) {
        return Err(format!(
            "platform calls differ from the model\nmodel: {:?}\nreal: {calls:?}",
            predicted.calls
        ));
    }
    Ok(())
}

/// What must hold after any step, whoever ran and however they interleaved.
fn check_invariants(
    op: &Op,
    before: &World,
    after: &World,
    audit: &[AuditRow],
    calls: &[CallRow],
) -> Result<(), String> {
    let is_worker_step = matches!(
        op,
        Op::SlotCheck { .. }
            | Op::SlotSweep
            | Op::BotCheck { .. }
            | Op::BotSweep
            | Op::Replicas(..)
            | Op::Settle
    );
    if !is_worker_step && !audit.is_empty() {
        return Err(format!("audit rows without a worker run: {audit:?}"));
    }
    let has = |worker: Option<&str>, action: &str, slot: Option<i32>, bot: Option<i32>| {
        audit.iter().any(|(w, a, s, b)| {
            worker.map_or(true, |worker| w == worker)
                && a == action
                && slot.map_or(true, |slot| *s == Some(slot))
                && bot.map_or(true, |bot| *b == Some(bot))
        })
    };

    for (id, was) in &before.bots {
        let now = &after.bots[id];
        if was.status == now.status {
            continue;
        }
        // The allowed-moves table is the one the workers' guards use.
        let (from, to) = (BotStatus::parse(&was.status), BotStatus::parse(&now.status));
        if is_worker_step && !from.worker_may_move_to(&to) {
            return Err(format!("bot {id}: a worker moved it {from} → {to}"));
        }
        if is_terminal(&was.status) {
            return Err(format!("bot {id} left {} for {}", was.status, now.status));
        }
        if is_worker_step && !has(None, "bot_marked_fatal", None, Some(*id)) {
            return Err(format!("bot {id} became {} with no audit row", now.status));
        }
    }
    for (worker, action, slot, bot) in audit {
        if worker != BOT_HEALTH {
            continue;
        }
        let Some(was) = bot.and_then(|bot| before.bots.get(&bot)) else {
            return Err(format!(
                "bot_health audited no known bot: {action} {slot:?}"
            ));
        };
        // DEPLOYING (and anything else unwatched) is never BotHealth's; nor is a fresh bot.
        if !watched(&was.status) {
            return Err(format!("bot_health acted on a {} bot: {bot:?}", was.status));
        }
        if action == "bot_marked_fatal"
            && was.heartbeat_age.unwrap_or(was.status_age) <= HEARTBEAT_TIMEOUT
        {
            return Err(format!(
                "bot_health marked a fresh bot FATAL: {bot:?} {was:?}"
            ));
        }
    }

    for (id, was) in &before.slots {
        let explained = |action: &str| has(None, action, Some(*id), None);
        let Some(now) = after.slots.get(id) else {
            if was.attempts < MAX_ATTEMPTS {
                return Err(format!("slot {id} deleted after {} attempts", was.attempts));
            }
            if !explained("slot_deleted") {
                return Err(format!("slot {id} deleted with no audit row"));
            }
            continue;
        };
        let changed = (&was.status, was.bot, was.attempts) != (&now.status, now.bot, now.attempts);
        if changed && is_worker_step && !audit.iter().any(|(_, _, s, _)| *s == Some(*id)) {
            return Err(format!(
                "slot {id} changed with no audit row: {was:?} → {now:?}"
            ));
        }
        if changed && is_worker_step && was.status != now.status {
            let (from, to) = (
                milo_workers::status::SlotStatus::parse(&was.status),
                milo_workers::status::SlotStatus::parse(&now.status),
            );
            if !from.worker_may_move_to(&to) {
                return Err(format!("slot {id}: a worker moved it {from} → {to}"));
            }
        }
    }

    // Each platform call answers exactly one recorded outcome: none duplicated, none hidden.
    let outcome_actions = [
        "slot_recovered",
        "slot_recovery_failed",
        "slot_deleted",
        "resources_released",
        "release_failed",
    ];
    let uuids: HashSet<&String> = calls.iter().map(|(_, uuid, _)| uuid).collect();
    for (id, slot) in &before.slots {
        let made = calls
            .iter()
            .filter(|(_, uuid, _)| *uuid == slot.uuid)
            .count();
        let recorded = audit
            .iter()
            .filter(|(_, a, s, _)| *s == Some(*id) && outcome_actions.contains(&a.as_str()))
            .count();
        if made != recorded {
            return Err(format!(
                "slot {id}: {made} platform calls for {recorded} recorded outcomes"
            ));
        }
        if made > 1 && !matches!(op, Op::Replicas(..) | Op::Settle) {
            return Err(format!("slot {id}: {made} platform calls in one run"));
        }
    }
    if uuids.len()
        > before
            .slots
            .values()
            .filter(|s| uuids.contains(&s.uuid))
            .count()
    {
        return Err(format!("calls for unknown applications: {calls:?}"));
    }
    Ok(())
}

/// After a sweep of each worker: every slot in a known status and consistent with its bot.
fn check_settled(after: &World) -> Result<(), String> {
    for (id, slot) in &after.slots {
        let bot = slot.bot.map(|b| &after.bots[&b]);
        let alive = bot.is_some_and(|bot| {
            bot.heartbeat_age.is_some_and(|age| age < FRESHNESS) && !is_terminal(&bot.status)
        });
        let stuck_deploying = slot.status == "deploying"
            && slot.used_age.unwrap_or(slot.status_age) > DEPLOY_TIMEOUT
            && !alive;
        let ok = match slot.status.as_str() {
            "idle" => slot.bot.is_none(),
            "error" => true,
            "busy" | "deploying" if stuck_deploying => false,
            "busy" | "deploying" => match bot {
                None => slot.status_age <= FRESHNESS,
                Some(bot) if bot.status == "FATAL" => false,
                Some(bot) if bot.status == "DONE" => {
                    bot.status_age <= FRESHNESS || slot.status_age <= FRESHNESS
                }
                Some(bot) => {
                    !watched(&bot.status)
                        || bot.heartbeat_age.unwrap_or(bot.status_age) <= HEARTBEAT_TIMEOUT
                }
            },
            _ => false,
        };
        if !ok {
            return Err(format!("slot {id} unsettled: {slot:?}, bot {bot:?}"));
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// The tests.

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

#[test]
fn workers_match_the_model_and_keep_the_invariants() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let harness = runtime.block_on(Harness::new());
    let mut runner = TestRunner::new(config());
    let case = AtomicU64::new(0);
    let result = runner.run(&ops_strategy(), |ops| {
        let case = case.fetch_add(1, Ordering::Relaxed);
        runtime
            .block_on(harness.case(case, &ops))
            .map_err(TestCaseError::fail)
    });
    let db = harness.db.name.clone();
    drop(harness);
    if let Err(failure) = result {
        panic!("{failure} (database {db})");
    }
}

//! A platform whose calls hang: the timeout bounds the damage to the hung slot, and a stop
//! does not wait for the call.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use milo_workers::platform::{Platform, PlatformError, SimulatedPlatform};

use crate::common::{self, eventually, Logs};

/// The simulated platform, also recording each call as it starts: `SimulatedPlatform::calls`
/// only lists calls that returned, and a hung call never does.
#[derive(Clone)]
struct Observed {
    inner: SimulatedPlatform,
    started: Arc<Mutex<Vec<String>>>,
}

impl Observed {
    fn new() -> Self {
        Self {
            inner: SimulatedPlatform::new(Duration::ZERO, 0.0),
            started: Arc::default(),
        }
    }

    fn started(&self, uuid: &str) -> bool {
        self.started.lock().unwrap().iter().any(|u| u == uuid)
    }
}

impl Platform for Observed {
    fn stop<'a>(&'a self, uuid: &'a str) -> BoxFuture<'a, Result<(), PlatformError>> {
        self.started.lock().unwrap().push(uuid.to_owned());
        self.inner.stop(uuid)
    }

    fn delete<'a>(&'a self, uuid: &'a str) -> BoxFuture<'a, Result<(), PlatformError>> {
        self.started.lock().unwrap().push(uuid.to_owned());
        self.inner.delete(uuid)
    }
}

#[tokio::test]
async fn a_hung_platform_call_times_out_and_costs_only_its_own_slot() {
    let db = common::TestDb::new().await;
    let milo = db.client().await;
    let hung = common::insert_slot(&milo, "hung", "busy", None, 60.0).await;
    let others = [
        common::insert_slot(&milo, "s1", "busy", None, 60.0).await,
        common::insert_slot(&milo, "s2", "busy", None, 60.0).await,
    ];
    let platform = Observed::new();
    platform.inner.hang("app-hung");
    let settings = milo_workers::config::Settings {
        platform_timeout: Duration::from_secs(1),
        ..common::settings()
    };
    let daemon = common::start_with(&db, settings, Arc::new(platform.clone())).await;

    milo.execute("UPDATE bot_pool_slots SET status = 'error'", &[])
        .await
        .unwrap();

    for slot in others {
        eventually("the other slots are recovered", || async {
            common::slot_status(&milo, slot).await.as_deref() == Some("idle")
        })
        .await;
    }
    eventually("the hung slot's attempt is counted", || async {
        common::slot_state(&milo, hung).await.unwrap().1 == 1
    })
    .await;
    let (status, attempts, message) = common::slot_state(&milo, hung).await.unwrap();
    assert_eq!((status.as_str(), attempts), ("error", 1));
    let message = message.unwrap_or_default();
    assert!(message.contains("timed out"), "{message}");
    assert_eq!(
        common::slot_audit(&milo, hung).await,
        [("slot_recovery_failed".to_owned(), "notify".to_owned())]
    );
    assert!(platform.started("app-hung"));
    assert!(
        platform
            .inner
            .calls()
            .iter()
            .all(|call| call.uuid != "app-hung"),
        "the hung call never returned"
    );

    // Once the platform answers again, the slot is not stuck: the next sweep recovers it.
    platform.inner.heal("app-hung");
    let report = daemon.run_slot_recovery_now().await.unwrap();
    assert_eq!(report.recovered, 1);
    assert_eq!(
        common::slot_status(&milo, hung).await.as_deref(),
        Some("idle")
    );
    assert_eq!(platform.inner.overlapping_calls(), 0);
    assert!(daemon.stop().await);
}

#[tokio::test]
async fn stop_cancels_a_run_stuck_in_a_platform_call_and_its_transaction_rolls_back() {
    let (logs, _guard) = Logs::capture("milo_workers=info");
    let db = common::TestDb::new().await;
    let milo = db.client().await;
    let bot = common::insert_bot(&milo, "IN_CALL", Some(1.0)).await;
    let slot = common::insert_slot(&milo, "hung", "busy", Some(bot), 60.0).await;
    let platform = Observed::new();
    platform.inner.hang("app-hung");
    // The call would time out long after the grace period ends.
    let settings = milo_workers::config::Settings {
        platform_timeout: Duration::from_secs(120),
        shutdown_grace: Duration::from_millis(300),
        ..common::settings()
    };
    let daemon = common::start_with(&db, settings, Arc::new(platform.clone())).await;

    milo.execute(
        "UPDATE bot_pool_slots SET status = 'error' WHERE id = $1",
        &[&slot],
    )
    .await
    .unwrap();
    eventually("the platform call is in flight", || async {
        platform.started("app-hung")
    })
    .await;

    let stopped = tokio::time::timeout(common::EVENTUALLY, daemon.stop())
        .await
        .expect("stop returns while the call still hangs");
    assert!(!stopped, "the run had to be cancelled");
    assert_eq!(
        logs.lines_with("run still in flight after the grace period; cancelled")
            .len(),
        1
    );

    // Nothing of the cancelled batch was committed, and its row lock is released.
    eventually("the slot's row lock is released", || async {
        let row = milo
            .query_opt(
                "SELECT id FROM bot_pool_slots WHERE id = $1 FOR UPDATE SKIP LOCKED",
                &[&slot],
            )
            .await
            .unwrap();
        row.is_some()
    })
    .await;
    assert_eq!(
        common::slot_state(&milo, slot).await.unwrap(),
        ("error".to_owned(), 0, None)
    );
    assert_eq!(common::bot_status(&milo, bot).await, "IN_CALL");
    assert!(common::slot_audit(&milo, slot).await.is_empty());
}

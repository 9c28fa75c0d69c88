//! The main job, end to end: a plain UPDATE breaks a slot, and the daemon repairs it through
//! trigger, NOTIFY, listener, pipeline, worker and platform, with the tick disabled.

use milo_workers::platform::{Operation, SimulatedPlatform};

use crate::common::{self, eventually};

#[tokio::test]
async fn a_slot_broken_by_a_plain_update_is_recovered_through_the_notification_path() {
    let db = common::TestDb::new().await;
    let milo = db.client().await;
    let bot = common::insert_bot(&milo, "IN_CALL", Some(1.0)).await;
    let slot = common::insert_slot(&milo, "s1", "busy", Some(bot), 60.0).await;
    let platform = SimulatedPlatform::new(std::time::Duration::ZERO, 0.0);
    let daemon = common::start(&db, common::settings(), &platform).await;

    milo.execute(
        "UPDATE bot_pool_slots SET status = 'error' WHERE id = $1",
        &[&slot],
    )
    .await
    .unwrap();

    eventually("the slot is idle again", || async {
        common::slot_status(&milo, slot).await.as_deref() == Some("idle")
    })
    .await;
    assert_eq!(common::bot_status(&milo, bot).await, "FATAL");
    let audit = common::slot_audit(&milo, slot).await;
    assert_eq!(
        audit,
        [
            ("bot_marked_fatal".to_owned(), "notify".to_owned()),
            ("slot_recovered".to_owned(), "notify".to_owned())
        ]
    );
    let calls = platform.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        (calls[0].operation, calls[0].uuid.as_str()),
        (Operation::Stop, "app-s1")
    );
    assert!(daemon.stop().await);
}

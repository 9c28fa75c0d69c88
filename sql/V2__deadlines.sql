-- milo-workers, schema version 2: deadlines and retry backoff.

-- When SlotRecovery may next try a slot whose recovery failed (UTC wall clock). Kept here, not
-- in memory, so that every replica and a restarted daemon follow the same schedule.
CREATE TABLE milo_workers.slot_retry (
    slot_id integer PRIMARY KEY,
    not_before timestamp NOT NULL
);

-- The deadline queries reach the rows they watch through the worker's own tables, so that no
-- index has to be added to milo's: these partial indexes hold only watched rows, and each
-- leads to milo's row by its primary key.
CREATE INDEX bot_status_since_watched ON milo_workers.bot_status_since (bot_id)
    WHERE status IN ('JOINING_CALL', 'IN_WAITING_ROOM', 'IN_CALL', 'LEAVING');

CREATE INDEX slot_status_since_watched ON milo_workers.slot_status_since (slot_id)
    WHERE status IN ('deploying', 'error');

-- milo-workers, schema version 3: find the slots a bot holds without scanning milo's table.
--
-- BotHealth frees the slot of each bot it marks FATAL. milo's `bot_pool_slots` may have no
-- index on `assigned_bot_id`, and the worker adds none to milo's tables; this partial index
-- on the worker's own table lists the busy and deploying slots instead, and each is then read
-- by primary key. A slot missed this way (say, written with the triggers disabled) is still
-- freed by SlotRecovery's sweep, as an orphan.
CREATE INDEX slot_status_since_held ON milo_workers.slot_status_since (slot_id)
    WHERE status IN ('busy', 'deploying');

-- milo-workers, schema version 1.
--
-- milo owns `bots` and `bot_pool_slots`. They are created here only where they are absent
-- (standalone use, the demo, the tests); on a real milo database the two CREATE TABLE IF NOT
-- EXISTS statements are no-ops and milo's own definitions, with all their extra columns, stay.
-- Nothing below adds or alters a column of milo's tables: the worker's own state lives in the
-- `milo_workers` schema, and its only footprint on milo's tables is the four triggers.

CREATE TABLE IF NOT EXISTS bots (
    id serial PRIMARY KEY,
    status varchar(255) NOT NULL,
    last_heartbeat timestamp,
    deployment_error varchar(1024),
    coolify_service_uuid varchar(255),
    created_at timestamp DEFAULT timezone('UTC', now()),
    end_time timestamp
);

CREATE TABLE IF NOT EXISTS bot_pool_slots (
    id serial PRIMARY KEY,
    coolify_service_uuid varchar(255) NOT NULL,
    slot_name varchar(255) NOT NULL UNIQUE,
    status varchar(50) NOT NULL DEFAULT 'idle',
    assigned_bot_id integer REFERENCES bots (id) ON DELETE SET NULL,
    last_used_at timestamp,
    error_message text,
    recovery_attempts integer NOT NULL DEFAULT 0,
    created_at timestamp NOT NULL DEFAULT now()
);

-- When each row entered its current status, as UTC wall-clock time like milo's own columns.
-- BotHealth counts a NULL heartbeat from here (never from the epoch), and the audit log uses
-- it to report how long a change waited for its action.
CREATE TABLE milo_workers.bot_status_since (
    bot_id integer PRIMARY KEY,
    status varchar(255) NOT NULL,
    since timestamp NOT NULL
);

CREATE TABLE milo_workers.slot_status_since (
    slot_id integer PRIMARY KEY,
    status varchar(50) NOT NULL,
    since timestamp NOT NULL
);

-- Rows that predate the triggers have no recorded entry time. Counting them from the moment
-- the worker was installed is the conservative choice: it never makes a bot look older.
INSERT INTO milo_workers.bot_status_since (bot_id, status, since)
SELECT id, status, timezone('UTC', now()) FROM bots
ON CONFLICT (bot_id) DO NOTHING;

INSERT INTO milo_workers.slot_status_since (slot_id, status, since)
SELECT id, status, timezone('UTC', now()) FROM bot_pool_slots
ON CONFLICT (slot_id) DO NOTHING;

-- Every action the workers take, written in the same transaction as the change itself.
-- Operators query this table: the column names and the action and trigger words are stable.
CREATE TABLE milo_workers.audit_log (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    worker text NOT NULL,
    trigger text NOT NULL,
    action text NOT NULL,
    slot_id integer,
    bot_id integer,
    reason text NOT NULL,
    -- When the row entered the status the action was decided from (UTC wall clock).
    status_since timestamp,
    -- Which daemon acted: host name and process id.
    replica text NOT NULL
);

CREATE INDEX audit_log_at ON milo_workers.audit_log (at);
CREATE INDEX audit_log_slot ON milo_workers.audit_log (slot_id) WHERE slot_id IS NOT NULL;
CREATE INDEX audit_log_bot ON milo_workers.audit_log (bot_id) WHERE bot_id IS NOT NULL;

-- The trigger functions run as their owner so that milo's own role needs no grant on the
-- worker's schema; the fixed search_path keeps that safe.
CREATE FUNCTION milo_workers.bot_status_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO milo_workers.bot_status_since (bot_id, status, since)
    VALUES (NEW.id, NEW.status, timezone('UTC', now()))
    ON CONFLICT (bot_id) DO UPDATE SET status = EXCLUDED.status, since = EXCLUDED.since;
    PERFORM pg_notify('milo_workers_bots', NEW.id::text || ':' || NEW.status);
    RETURN NULL;
END
$$;

CREATE FUNCTION milo_workers.slot_status_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO milo_workers.slot_status_since (slot_id, status, since)
    VALUES (NEW.id, NEW.status, timezone('UTC', now()))
    ON CONFLICT (slot_id) DO UPDATE SET status = EXCLUDED.status, since = EXCLUDED.since;
    PERFORM pg_notify('milo_workers_slots', NEW.id::text || ':' || NEW.status);
    RETURN NULL;
END
$$;

-- `UPDATE OF status` keeps the trigger from even firing for heartbeat writes, the most
-- frequent write to `bots`; the WHEN clause drops updates that set the same status again.
-- A notifying commit takes a cluster-wide lock, so nothing else may notify.
CREATE TRIGGER milo_workers_bot_inserted
    AFTER INSERT ON bots
    FOR EACH ROW EXECUTE FUNCTION milo_workers.bot_status_changed();

CREATE TRIGGER milo_workers_bot_status_changed
    AFTER UPDATE OF status ON bots
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION milo_workers.bot_status_changed();

CREATE TRIGGER milo_workers_slot_inserted
    AFTER INSERT ON bot_pool_slots
    FOR EACH ROW EXECUTE FUNCTION milo_workers.slot_status_changed();

CREATE TRIGGER milo_workers_slot_status_changed
    AFTER UPDATE OF status ON bot_pool_slots
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION milo_workers.slot_status_changed();

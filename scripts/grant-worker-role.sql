-- Least-privilege grants for the role the milo-workers daemon runs as.
--
-- Run by an owner (of milo's tables and of the milo_workers schema), AFTER
-- `milo-workers migrate` has installed the schema and triggers, and again after every upgrade
-- that adds migrations. The role must already exist:
--
--   CREATE ROLE milo_workers_daemon LOGIN PASSWORD '...';
--   psql "$OWNER_DATABASE_URL" -v ON_ERROR_STOP=1 -v role=milo_workers_daemon \
--        -f scripts/grant-worker-role.sql
--
-- The daemon then runs as that role with `--no-migrate`. It gets exactly what its statements
-- (src/store/*.rs, src/fleet.rs, src/daemon.rs) need: no ownership, no CREATE anywhere, no
-- INSERT on milo's tables, no UPDATE of any other column. Its writes to milo's tables fire the
-- worker's triggers, whose functions run as their owner (SECURITY DEFINER), so the role needs
-- no right on the tables the triggers write. LISTEN, advisory locks and
-- pg_notification_queue_usage() need no grant.
--
-- milo's tables are named unqualified, as the daemon names them: run this with the same
-- search_path the daemon's role will have (normally `public`). Repeating it is harmless.

BEGIN;

-- milo's bots: read (health checks, status), and mark FATAL with a reason. UPDATE on these
-- columns also permits the SELECT ... FOR UPDATE row locks.
GRANT SELECT ON TABLE bots TO :"role";
GRANT UPDATE (status, deployment_error) ON TABLE bots TO :"role";

-- milo's bot_pool_slots: read, return to idle / mark error / mark busy, and delete slots whose
-- application is gone from the platform.
GRANT SELECT, DELETE ON TABLE bot_pool_slots TO :"role";
GRANT UPDATE (status, assigned_bot_id, last_used_at, error_message, recovery_attempts)
    ON TABLE bot_pool_slots TO :"role";

-- The worker's own schema: look up its objects, nothing more (no CREATE).
GRANT USAGE ON SCHEMA milo_workers TO :"role";

-- Every action, in the action's transaction; SELECT for `milo-workers status`.
GRANT SELECT, INSERT ON TABLE milo_workers.audit_log TO :"role";
GRANT USAGE ON SEQUENCE milo_workers.audit_log_id_seq TO :"role";

-- Retry schedule of failed recoveries: upserted on failure, deleted on recovery or deletion.
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE milo_workers.slot_retry TO :"role";

-- When each row entered its status (written by the triggers): read by every check; a deleted
-- slot's entry is removed with it.
GRANT SELECT, DELETE ON TABLE milo_workers.slot_status_since TO :"role";
GRANT SELECT ON TABLE milo_workers.bot_status_since TO :"role";

-- Not granted on purpose: milo_workers.refinery_schema_history (only `migrate` reads it, and
-- it runs as the owner), and anything on the database or the public schema.

COMMIT;

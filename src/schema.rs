//! The worker's schema: `sql/` migrations applied with refinery, history kept in
//! `milo_workers.refinery_schema_history`, never in milo's own schema.

use tokio_postgres::Client;
use tracing::info;

mod embedded {
    refinery::embed_migrations!("sql");
}

/// Advisory lock key held while migrating, so that replicas starting together apply each
/// migration once. Chosen as the bytes of "milowork" read as a big-endian i64.
pub const MIGRATION_LOCK_KEY: i64 = 0x6d69_6c6f_776f_726b;

const HISTORY_TABLE: &str = "milo_workers.refinery_schema_history";

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("could not prepare the milo_workers schema")]
    PrepareFailed(#[source] tokio_postgres::Error),
    #[error("migration failed")]
    MigrationFailed(#[source] refinery::Error),
}

/// Applies every pending migration; a no-op when the schema is current.
pub async fn migrate(client: &mut Client) -> Result<usize, SchemaError> {
    client
        .batch_execute("CREATE SCHEMA IF NOT EXISTS milo_workers")
        .await
        .map_err(SchemaError::PrepareFailed)?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(SchemaError::PrepareFailed)?;

    let result = embedded::migrations::runner()
        .set_migration_table_name(HISTORY_TABLE)
        .run_async(client)
        .await;

    // Unlock even when the migration failed; the lock is session-level and the session may
    // go back to a pool.
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    let report = result.map_err(SchemaError::MigrationFailed)?;
    unlocked.map_err(SchemaError::PrepareFailed)?;

    let applied = report.applied_migrations().len();
    for migration in report.applied_migrations() {
        info!(
            version = migration.version(),
            name = migration.name(),
            "applied migration"
        );
    }
    Ok(applied)
}

//! Integration tests against a real PostgreSQL server, one fresh database per test.
//! `DATABASE_URL` names the server (default `postgres://postgres@127.0.0.1:5432/postgres`).

mod bot_health;
mod common;
mod consistency;
mod coolify;
mod deadlines;
mod end_to_end;
mod fleet;
mod guards;
mod http;
mod least_privilege;
mod pipeline;
mod properties;
mod replicas;
mod slot_recovery;
mod triggers;
mod listener_faults;
mod network_faults;
mod platform_faults;
mod proxy;
mod storm;
mod tls;

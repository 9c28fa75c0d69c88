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
mod listener_faults;
mod network_faults;
mod outages;
mod pipeline;
mod platform_faults;
mod properties;
mod proxy;
mod replicas;
mod slot_recovery;
mod storm;
mod tls;
mod triggers;

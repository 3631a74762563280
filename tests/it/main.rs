//! Black-box and end-to-end tests: each test starts the service on a random
//! port with a fresh database and its own topic prefix.

mod agent;
mod agent_logs;
mod agent_once;
mod api;
mod append_cache;
mod archive;
mod audit;
mod common;
mod delivery;
mod gmail;
mod graphql;
mod group_commit;
mod handoff;
mod identity;
mod kb_counts;
mod mailsync;
mod metrics;
mod ops;
mod outage;
mod pipeline;
mod projector;
mod ratelimit;
mod rebuild;
mod relay;
mod retrieval;
mod rls;
mod sessions;
mod sla;
mod status_link;
mod status_page;
mod tracing;
mod trail;
mod upcast;
mod whatsapp;
mod worker;

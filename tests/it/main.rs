//! Black-box and end-to-end tests: each test starts the service on a random
//! port with a fresh database and its own topic prefix.

mod agent;
mod api;
mod audit;
mod common;
mod gmail;
mod identity;
mod outage;
mod pipeline;
mod ratelimit;
mod relay;
mod whatsapp;

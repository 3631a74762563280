//! Black-box and end-to-end tests: each test starts the service on a random
//! port with a fresh database and its own topic prefix.

mod agent;
mod api;
mod audit;
mod common;
mod delivery;
mod gmail;
mod outage;
mod pipeline;
mod relay;
mod whatsapp;
mod worker;

//! The `casebook` binary's library: configuration, wiring of the roles, the
//! command line and the benchmarks. Tests start the service through
//! [`app::start`].

pub mod app;
pub mod audit;
pub mod bench;
pub mod cli;
pub mod config;
pub mod db;
pub mod logging;

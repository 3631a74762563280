//! `casebook bench …` (filled in below).
use clap::Args;

use crate::config::Config;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// intake, pipeline or append
    pub name: String,
    #[arg(long)]
    pub json: bool,
}

pub async fn run(_config: &Config, args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("unknown benchmark {:?}", args.name)
}

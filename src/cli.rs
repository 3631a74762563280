//! The `casebook` command line.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use casebook_api::users::{self, Permission, UserError};
use casebook_api::{Role as TokenRole, TokenKeys};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use uuid::Uuid;

use crate::app::{self, Role};
use crate::bench::{self, BenchArgs};
use crate::config::Config;
use crate::db;

#[derive(Debug, Parser)]
#[command(
    name = "casebook",
    version,
    about = "Event-sourced customer support backend"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the service (every role by default) until SIGINT/SIGTERM.
    Serve {
        /// all, api, relay, projector, agent or delivery; repeat for several.
        #[arg(long = "role", value_enum, default_value = "all")]
        roles: Vec<Role>,
    },
    /// Applies the database migrations and creates missing Kafka topics.
    Migrate,
    /// The knowledge base.
    Kb {
        #[command(subcommand)]
        command: KbCommand,
    },
    /// Bearer tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Users in Postgres: a change acts on that user's next request.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Rebuilds read models; shows a ticket as it stood.
    Replay {
        #[command(subcommand)]
        command: ReplayCommand,
    },
    /// Tamper evidence.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Retention: one year, then the archive.
    Archive {
        #[command(subcommand)]
        command: ArchiveCli,
    },
    /// Mail intake.
    Mail {
        #[command(subcommand)]
        command: MailCommand,
    },
    /// Benchmarks: intake, pipeline, append.
    Bench(BenchArgs),
}

#[derive(Debug, Subcommand)]
enum MailCommand {
    /// Mail that could not become a ticket message, newest first, with why.
    Refused {
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum KbCommand {
    /// Chunks and embeds Markdown/text files (or every one in a directory);
    /// unchanged documents are left as they are.
    Ingest {
        #[arg(required = true)]
        paths: Vec<std::path::PathBuf>,
    },
    /// Re-embeds every document with the configured (active) model, beside
    /// the old model's chunks: search keeps finding them meanwhile.
    Reembed {
        /// Then removes every other model's chunks (once every process
        /// embeds questions with the active model).
        #[arg(long)]
        prune: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Creates or updates the user with this role, opens a new session and
    /// prints its bearer token as the last line on stdout.
    Issue {
        #[arg(long)]
        role: TokenRole,
        #[arg(long)]
        sub: String,
        /// Required with --role customer: whose tickets they read.
        #[arg(long)]
        customer_id: Option<Uuid>,
        /// How long the token is valid (1 s to 30 days); a session idle for
        /// CASEBOOK_SESSION_IDLE_SECS is refused before that.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: i64,
        /// Grants a permission beyond the role (repeatable): auditor_pii.
        #[arg(long = "permission")]
        permissions: Vec<Permission>,
    },
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Adds a user (an existing sub is refused).
    Add {
        sub: String,
        #[arg(long)]
        role: TokenRole,
        #[arg(long)]
        name: Option<String>,
        /// Required with --role customer.
        #[arg(long)]
        customer_id: Option<Uuid>,
        /// Grants a permission beyond the role (repeatable): auditor_pii.
        #[arg(long = "permission")]
        permissions: Vec<Permission>,
    },
    /// Grants a permission (auditor_pii), from the user's next request on.
    Grant { sub: String, permission: Permission },
    /// Revokes a permission, from the user's next request on.
    Revoke { sub: String, permission: Permission },
    /// Changes a user's role, from their next request on.
    SetRole {
        sub: String,
        role: TokenRole,
        /// Required when the new role is customer.
        #[arg(long)]
        customer_id: Option<Uuid>,
    },
    /// Refuses the user's next request and revokes their sessions.
    Disable { sub: String },
    /// Lets a disabled user get tokens again (old sessions stay revoked).
    Enable { sub: String },
}

#[derive(Debug, Subcommand)]
enum ReplayCommand {
    /// Rebuilds read models from the event store.
    Projections {
        /// Only this projector (repeatable): crm-customers, crm-customer-identifiers, crm-tickets,
        /// crm-conversations, crm-messages, metrics.
        #[arg(long)]
        only: Vec<String>,
    },
    /// A ticket's events up to a moment and its state then.
    Ticket {
        ticket_id: Uuid,
        /// Events that occurred at or before this moment (RFC 3339).
        #[arg(long)]
        as_of: Option<DateTime<Utc>>,
        /// Events at or before this global position (with --as-of: both).
        #[arg(long)]
        as_of_position: Option<i64>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Checks every stream's chain, the log's order and every signed
    /// checkpoint; exit 1 naming the first failure.
    Verify {
        /// The trusted public key (hex); default: CASEBOOK_AUDIT_SIGNING_KEY's.
        #[arg(long)]
        public_key: Option<String>,
    },
    /// Writes a signed checkpoint of the whole log now and publishes it.
    Checkpoint,
    /// Prints a new Ed25519 key pair.
    Keygen,
    /// Prints an inclusion proof of one event in the latest checkpoint (JSON).
    Prove { event_id: Uuid },
    /// Checks an inclusion proof without the database.
    VerifyProof {
        /// The proof file (`audit prove`'s output); `-` for standard input.
        file: std::path::PathBuf,
        /// The trusted public key (hex); default: CASEBOOK_AUDIT_SIGNING_KEY's.
        #[arg(long)]
        public_key: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ArchiveCli {
    /// One retention pass: tickets resolved or closed more than 365 days
    /// before --as-of (default now), unless held, go to CASEBOOK_ARCHIVE_DIR
    /// and leave the hot tables.
    Run {
        #[arg(long)]
        as_of: Option<DateTime<Utc>>,
    },
    /// Sets a legal hold on a ticket (never purged), or releases it.
    Hold {
        ticket_id: Uuid,
        #[arg(long)]
        release: bool,
    },
    /// Brings an archived ticket back, verified against the manifest.
    Restore { ticket_id: Uuid },
}

/// Runs the command line; the exit code follows CONTRACT.md (0 success,
/// 1 failure explained on stderr, 2 bad usage).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("casebook: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("casebook: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = Config::from_env()?;
    // Logs (and, for the service, traces when OTEL_EXPORTER_OTLP_ENDPOINT is
    // set) start once the configuration is known to be good.
    let telemetry = match &cli.command {
        Command::Serve { roles } => {
            let roles = role_label(roles);
            crate::logging::init(true, config.traces.as_ref().map(|t| (t, roles.as_str())))?
        }
        _ => crate::logging::init(false, None)?,
    };
    let outcome = command(&config, cli).await;
    // Queued spans go out before the process ends (graceful shutdown).
    telemetry.shutdown().await;
    outcome
}

/// The roles a process runs, as the `casebook.role` resource attribute:
/// `api`, `relay+projector`, `all`.
fn role_label(roles: &[Role]) -> String {
    use clap::ValueEnum;
    let names: Vec<String> = roles
        .iter()
        .filter_map(|r| r.to_possible_value().map(|v| v.get_name().to_string()))
        .collect();
    if names.is_empty() {
        "all".into()
    } else {
        names.join("+")
    }
}

async fn command(config: &Config, cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve { roles } => {
            app::serve(config, &roles).await?;
        }
        Command::Migrate => {
            let pool = db::connect(&config.database_url, 2, db::Purpose::Maintenance).await?;
            db::migrate(&pool).await?;
            let kafka = app::kafka_settings(config);
            tokio::time::timeout(Duration::from_secs(30), kafka.ensure_topics())
                .await
                .map_err(|_| anyhow!("KAFKA_BROKERS: no answer within 30 s while creating topics"))?
                .context("KAFKA_BROKERS: creating topics")?;
            println!(
                "migrations applied; topics under prefix {:?} exist",
                config.topic_prefix
            );
        }
        Command::Kb {
            command: KbCommand::Ingest { paths },
        } => {
            let pool = db::connect(&config.database_url, 2, db::Purpose::Maintenance).await?;
            let kb = casebook_agent::knowledge::KnowledgeBase::new(pool, app::embedder(config)?);
            let (mut stored, mut unchanged) = (0, 0);
            for path in paths {
                for (file, outcome) in kb.ingest_path(&path).await? {
                    match outcome {
                        casebook_agent::knowledge::IngestOutcome::Unchanged => unchanged += 1,
                        casebook_agent::knowledge::IngestOutcome::Stored { chunks } => {
                            stored += 1;
                            println!("{}: {chunks} chunks", file.display());
                        }
                    }
                }
            }
            println!("{stored} documents stored, {unchanged} unchanged");
        }
        Command::Kb {
            command: KbCommand::Reembed { prune },
        } => {
            let pool = db::connect(&config.database_url, 2, db::Purpose::Maintenance).await?;
            let kb = casebook_agent::knowledge::KnowledgeBase::new(pool, app::embedder(config)?);
            let report = kb.reembed().await?;
            println!(
                "{} documents re-embedded with {} ({} chunks)",
                report.documents,
                kb.embedder().model_name(),
                report.chunks
            );
            if prune {
                println!(
                    "{} chunks of other models removed",
                    kb.prune_other_models().await?
                );
            }
        }
        Command::Token {
            command:
                TokenCommand::Issue {
                    role,
                    sub,
                    customer_id,
                    ttl_secs,
                    permissions,
                },
        } => {
            // Bad usage is told before anything is connected to.
            if let Err(e) = users::check_sub(&sub)
                .and_then(|()| users::check_customer(role, customer_id))
                .and_then(|()| {
                    (1..=users::MAX_TOKEN_TTL_SECS)
                        .contains(&ttl_secs)
                        .then_some(())
                        .ok_or(UserError::InvalidTtl)
                })
            {
                return Ok(usage(e));
            }
            let keys = TokenKeys::new(config.jwt_secret()?);
            let pool = db::connect(&config.database_url, 2, db::Purpose::Maintenance).await?;
            match users::issue_token(&pool, &keys, role, &sub, customer_id, ttl_secs).await {
                Ok(issued) => {
                    // Granted before the token is shown to anyone.
                    for permission in &permissions {
                        users::set_permission(&pool, &sub, *permission, true).await?;
                    }
                    println!("{}", issued.token)
                }
                Err(e) if e.is_usage() => return Ok(usage(e)),
                Err(e) => return Err(e.into()),
            }
        }
        Command::User { command } => {
            let pool = db::connect(&config.database_url, 2, db::Purpose::Maintenance).await?;
            let result = match command {
                UserCommand::Add {
                    sub,
                    role,
                    name,
                    customer_id,
                    permissions,
                } => match users::add_user(&pool, &sub, role, name.as_deref(), customer_id).await {
                    Ok(u) => {
                        for permission in &permissions {
                            users::set_permission(&pool, &sub, *permission, true).await?;
                        }
                        Ok(format!("user {:?} added as {}", u.sub, u.role))
                    }
                    Err(e) => Err(e),
                },
                UserCommand::Grant { sub, permission } => {
                    users::set_permission(&pool, &sub, permission, true)
                        .await
                        .map(|p| format!("user {sub:?} now holds: {}", p.join(", ")))
                }
                UserCommand::Revoke { sub, permission } => {
                    users::set_permission(&pool, &sub, permission, false)
                        .await
                        .map(|_| format!("user {sub:?} no longer holds {permission}"))
                }
                UserCommand::SetRole {
                    sub,
                    role,
                    customer_id,
                } => users::set_role(&pool, &sub, role, customer_id)
                    .await
                    .map(|u| format!("user {:?} is now {}", u.sub, u.role)),
                UserCommand::Disable { sub } => users::disable_user(&pool, &sub)
                    .await
                    .map(|u| format!("user {:?} disabled; their sessions are revoked", u.sub)),
                UserCommand::Enable { sub } => users::enable_user(&pool, &sub)
                    .await
                    .map(|u| format!("user {:?} enabled", u.sub)),
            };
            match result {
                Ok(done) => println!("{done}"),
                Err(e) if e.is_usage() => return Ok(usage(e)),
                Err(e) => return Err(e.into()),
            }
        }
        Command::Replay {
            command: ReplayCommand::Projections { only },
        } => {
            let all = casebook_projections::all_projectors();
            let chosen: Vec<_> = if only.is_empty() {
                all
            } else {
                let names: Vec<&str> = all.iter().map(|p| p.name()).collect();
                if let Some(unknown) = only.iter().find(|o| !names.contains(&o.as_str())) {
                    return Err(anyhow!(
                        "--only {unknown}: no such projector (known: {})",
                        names.join(", ")
                    ));
                }
                all.into_iter()
                    .filter(|p| only.iter().any(|o| o == p.name()))
                    .collect()
            };
            let connections = casebook_replay::rebuild::connections_for(chosen.len());
            let pool =
                db::connect(&config.database_url, connections, db::Purpose::Maintenance).await?;
            let display = RebuildProgress::new();
            let reports = casebook_replay::rebuild_with_progress(
                &pool,
                &chosen,
                casebook_replay::rebuild::CHUNK,
                &|p| display.show(p),
            )
            .await?;
            for report in reports {
                println!(
                    "{}: {} events read, {} applied ({} caught up in the swap) in {} ms",
                    report.projector,
                    report.events_read,
                    report.events_applied,
                    report.caught_up,
                    report.millis
                );
            }
        }
        Command::Replay {
            command:
                ReplayCommand::Ticket {
                    ticket_id,
                    as_of,
                    as_of_position,
                    json,
                },
        } => {
            let pool = db::connect(&config.database_url, 2, db::Purpose::Maintenance).await?;
            let moment = casebook_replay::AsOf {
                time: as_of,
                position: as_of_position,
            };
            let history = casebook_replay::ticket_at(&pool, &ticket_id.to_string(), moment).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&history)?);
            } else {
                print_history(&history);
            }
        }
        Command::Audit { command } => return audit(config, command).await,
        Command::Archive { command } => archive(config, command).await?,
        Command::Mail {
            command: MailCommand::Refused { limit, json },
        } => {
            let pool = db::connect(&config.database_url, 2, db::Purpose::Maintenance).await?;
            let refused = casebook_commands::gmail::refused_mail(&pool, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&refused)?);
            } else if refused.is_empty() {
                println!("no refused mail");
            } else {
                for r in &refused {
                    println!(
                        "{}  {}  message {}  ({} attempts): {}",
                        r.discovered_at.to_rfc3339(),
                        r.mailbox,
                        r.gmail_message_id,
                        r.attempts,
                        r.reason
                    );
                }
            }
        }
        Command::Bench(args) => bench::run(config, args).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn archive(config: &Config, command: ArchiveCli) -> anyhow::Result<()> {
    let pool = db::connect(&config.database_url, 2, db::Purpose::Maintenance).await?;
    match command {
        ArchiveCli::Run { as_of } => {
            let key = config.audit_signing_key()?;
            let report = crate::audit::archive_pass(
                &pool,
                &config.archive_dir,
                as_of.unwrap_or_else(Utc::now),
                &key,
            )
            .await?;
            let tickets: usize = report.purged.iter().map(|p| p.tickets.len()).sum();
            let events: u64 = report.purged.iter().map(|p| p.events).sum();
            println!(
                "archived {tickets} tickets ({events} events) in {} files; {} eligible, {} on legal hold",
                report.purged.len(),
                report.eligible,
                report.held
            );
            for p in &report.purged {
                println!(
                    "  {}  sha256 {}  {} tickets",
                    p.file,
                    p.sha256,
                    p.tickets.len()
                );
            }
        }
        ArchiveCli::Hold { ticket_id, release } => {
            let changed =
                casebook_replay::archive::hold(&pool, &ticket_id.to_string(), release).await?;
            let what = if release { "released" } else { "on legal hold" };
            if changed {
                println!("ticket {ticket_id}: {what}");
            } else {
                println!("ticket {ticket_id}: already {what}");
            }
        }
        ArchiveCli::Restore { ticket_id } => {
            let n = casebook_replay::archive::restore(
                &pool,
                &config.archive_dir,
                &ticket_id.to_string(),
            )
            .await?;
            println!("ticket {ticket_id}: {n} events restored, verified against the manifest");
        }
    }
    Ok(())
}

async fn audit(config: &Config, command: AuditCommand) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    let trusted_key =
        |given: Option<String>| -> anyhow::Result<Option<ed25519_dalek::VerifyingKey>> {
            Ok(match given {
                Some(hex) => Some(casebook_domain::checkpoint::public_key_from_hex(&hex)?),
                None if config.has_audit_signing_key() => {
                    Some(config.audit_signing_key()?.verifying_key())
                }
                None => None,
            })
        };
    match command {
        AuditCommand::Verify { public_key } => {
            let key = trusted_key(public_key)?;
            let pool = db::connect(&config.database_url, 2, db::Purpose::Maintenance).await?;
            let bar = if std::io::stderr().is_terminal() {
                let total = casebook_replay::log_size(&pool).await?;
                let bar = indicatif::ProgressBar::new(total);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:40} {pos}/{len} events  {per_sec}  eta {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                Some(bar)
            } else {
                None
            };
            let report = casebook_replay::verify_log(&pool, key.as_ref(), |n| {
                if let Some(bar) = &bar {
                    bar.set_position(n);
                }
            })
            .await?;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            if report.failure.is_none() && report.purged > 0 {
                if let Err(e) =
                    casebook_replay::archive::verify_purged(&pool, &config.archive_dir).await
                {
                    eprintln!("casebook: purged events do not match their archive: {e}");
                    return Ok(ExitCode::from(1));
                }
            }
            match report.failure {
                None => println!(
                    "intact: {} streams, {} events, {} purged, {} checkpoints",
                    report.streams, report.events, report.purged, report.checkpoints
                ),
                Some(failure) => {
                    eprintln!(
                        "casebook: {failure}; {} events in {} streams verified before it",
                        report.events, report.streams
                    );
                    return Ok(ExitCode::from(1));
                }
            }
        }
        AuditCommand::Checkpoint => {
            let key = config.audit_signing_key()?;
            let pool = db::connect(&config.database_url, 2, db::Purpose::Maintenance).await?;
            let kafka = app::kafka_settings(config);
            let producer = kafka.producer().context("KAFKA_BROKERS")?;
            tokio::time::timeout(Duration::from_secs(30), kafka.ensure_topics())
                .await
                .map_err(|_| anyhow!("KAFKA_BROKERS: no answer within 30 s while creating topics"))?
                .context("KAFKA_BROKERS: creating topics")?;
            use casebook_replay::checkpoint::Created;
            match crate::audit::checkpoint_now(&pool, &key, &kafka, &producer).await? {
                Created::New { checkpoint, added } => println!(
                    "checkpoint {}: {} events (+{added}), last position {}, root {}",
                    checkpoint.id,
                    checkpoint.checkpoint.body.size,
                    checkpoint.checkpoint.body.last_position,
                    checkpoint.checkpoint.body.root
                ),
                Created::Unchanged(c) => println!(
                    "checkpoint {} is current: {} events, root {}",
                    c.id, c.checkpoint.body.size, c.checkpoint.body.root
                ),
                Created::Empty => println!("the log is empty: nothing to checkpoint"),
            }
        }
        AuditCommand::Keygen => {
            let seed: [u8; 32] = rand::random();
            let key = ed25519_dalek::SigningKey::from_bytes(&seed);
            println!("CASEBOOK_AUDIT_SIGNING_KEY={}", hex::encode(seed));
            println!(
                "public key: {}",
                hex::encode(key.verifying_key().as_bytes())
            );
        }
        AuditCommand::Prove { event_id } => {
            let pool = db::connect(&config.database_url, 2, db::Purpose::Maintenance).await?;
            let proof = casebook_replay::checkpoint::prove(&pool, event_id).await?;
            println!("{}", serde_json::to_string_pretty(&proof)?);
        }
        AuditCommand::VerifyProof { file, public_key } => {
            let key = trusted_key(public_key)?.ok_or_else(|| {
                anyhow!("no trusted key: pass --public-key or set CASEBOOK_AUDIT_SIGNING_KEY")
            })?;
            // A proof is a few kilobytes; refuse anything absurd.
            const MAX_PROOF: u64 = 16 * 1024 * 1024;
            let text = if file.as_os_str() == "-" {
                use std::io::Read;
                let mut text = String::new();
                std::io::stdin().take(MAX_PROOF).read_to_string(&mut text)?;
                text
            } else {
                let len = std::fs::metadata(&file)
                    .with_context(|| format!("{}", file.display()))?
                    .len();
                if len > MAX_PROOF {
                    return Err(anyhow!("{}: larger than a proof can be", file.display()));
                }
                std::fs::read_to_string(&file).with_context(|| format!("{}", file.display()))?
            };
            let proof: casebook_domain::checkpoint::InclusionProof =
                serde_json::from_str(&text).context("not an inclusion proof")?;
            match proof.verify(&key) {
                Ok(()) => println!(
                    "included: event {} (position {}) is leaf {} of checkpoint over {} events, root {}",
                    proof.content.event_id,
                    proof.position,
                    proof.leaf_index,
                    proof.checkpoint.body.size,
                    proof.checkpoint.body.root
                ),
                Err(e) => {
                    eprintln!("casebook: proof refused: {e}");
                    return Ok(ExitCode::from(1));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Bad usage: said on stderr, exit 2.
fn usage(e: UserError) -> ExitCode {
    eprintln!("casebook: {e}");
    ExitCode::from(2)
}

fn print_history(h: &casebook_replay::TicketHistory) {
    match (h.as_of, h.as_of_position) {
        (Some(t), Some(p)) => println!(
            "ticket {} as of {} and position {p}",
            h.ticket_id,
            t.to_rfc3339()
        ),
        (Some(t), None) => println!("ticket {} as of {}", h.ticket_id, t.to_rfc3339()),
        (None, Some(p)) => println!("ticket {} as of position {p}", h.ticket_id),
        (None, None) => println!("ticket {} (all events)", h.ticket_id),
    }
    for e in &h.events {
        println!(
            "  #{:<3} {}  {:<24} {}:{}  {}",
            e.sequence,
            e.occurred_at.to_rfc3339(),
            e.event_type,
            e.actor.kind.as_str(),
            e.actor.id,
            &e.hash[..16]
        );
    }
    let s = &h.state;
    println!(
        "state: status {}, channel {}, priority {}, {} messages, first response {}, assignee {}",
        s.status.as_str(),
        s.channel.map(|c| c.as_str()).unwrap_or("-"),
        s.priority.as_str(),
        s.messages_count,
        s.first_response_at
            .map(|t| t.to_rfc3339())
            .unwrap_or_else(|| "none".into()),
        s.assignee.as_deref().unwrap_or("-"),
    );
    println!(
        "{} drafts, {} approvals, {} escalations ({} open); chain {}",
        s.drafts.len(),
        s.approvals.len(),
        s.escalations.len(),
        s.escalations.iter().filter(|e| e.open).count(),
        if h.chain_valid { "valid" } else { "BROKEN" }
    );
}

/// One projector's bar (on a terminal), when it started and when it last
/// printed a line.
type ProjectorProgress = (Option<indicatif::ProgressBar>, Instant, Instant);

/// A rebuild's progress on stderr: a bar per projector with rate and ETA
/// on a terminal (several rebuild at once), a plain line per projector at
/// most every two seconds (and at each swap) otherwise.
struct RebuildProgress {
    bars: Option<indicatif::MultiProgress>,
    /// Per projector: its bar (on a terminal), when it started and when it
    /// last printed a line.
    projectors: std::sync::Mutex<HashMap<&'static str, ProjectorProgress>>,
}

impl RebuildProgress {
    fn new() -> Self {
        use std::io::IsTerminal;
        Self {
            bars: std::io::stderr()
                .is_terminal()
                .then(indicatif::MultiProgress::new),
            projectors: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn show(&self, p: casebook_replay::Progress) {
        let Ok(mut projectors) = self.projectors.lock() else {
            return;
        };
        let now = Instant::now();
        let (bar, started, printed) = projectors.entry(p.projector).or_insert_with(|| {
            let bar = self.bars.as_ref().map(|bars| {
                let bar = bars.add(indicatif::ProgressBar::new(p.total));
                if let Ok(style) = indicatif::ProgressStyle::with_template(
                    "{msg:>26} [{bar:40}] {human_pos}/{human_len} events, {per_sec}, ETA {eta}",
                ) {
                    bar.set_style(style.progress_chars("=> "));
                }
                bar.set_message(p.projector);
                bar
            });
            (bar, now, now)
        });
        if let Some(bar) = bar {
            bar.set_length(p.total);
            bar.set_position(p.done);
            if p.swapped {
                bar.finish_with_message(format!("{}: swapped in", p.projector));
            }
            return;
        }
        if !p.swapped && now.duration_since(*printed) < Duration::from_secs(2) {
            return;
        }
        *printed = now;
        let secs = now.duration_since(*started).as_secs_f64().max(0.001);
        let rate = p.done as f64 / secs;
        let left = p.total.saturating_sub(p.done) as f64;
        let eta = if rate > 0.0 { left / rate } else { 0.0 };
        eprintln!(
            "{}: {}/{} events, {:.0} events/s, ETA {:.0} s{}",
            p.projector,
            p.done,
            p.total,
            rate,
            eta,
            if p.swapped { ", swapped in" } else { "" }
        );
    }
}

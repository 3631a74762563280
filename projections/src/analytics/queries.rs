//! Reads of the metrics buckets and the figures the dashboard adds from the
//! CRM read models. Every function takes the connection the caller scoped.

use chrono::{DateTime, Datelike, TimeZone, Utc};
use sqlx::PgConnection;

use super::figures::{Figures, Grain, ALL};

/// The most buckets one series returns (100 days of hours).
pub const MAX_BUCKETS: i64 = 2400;

/// How many buckets of `grain` the range `[from, to)` spans.
pub fn bucket_count(grain: Grain, from: DateTime<Utc>, to: DateTime<Utc>) -> i64 {
    if to <= from {
        return 0;
    }
    let first = grain.start(from);
    let span = (to - first).num_seconds();
    let size = grain.delta().num_seconds();
    (span + size - 1) / size
}

/// The buckets of `grain` starting in `[start of from's bucket, to)`, one
/// per bucket (empty ones with zero figures), oldest first; at most
/// [`MAX_BUCKETS`].
pub async fn series(
    conn: &mut PgConnection,
    grain: Grain,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    channel: &str,
    config: &str,
) -> Result<Vec<(DateTime<Utc>, Figures)>, sqlx::Error> {
    let first = grain.start(from);
    let count = bucket_count(grain, from, to).clamp(0, MAX_BUCKETS);
    let stored: Vec<(DateTime<Utc>, sqlx::types::Json<Figures>)> = sqlx::query_as(
        "SELECT start, figures FROM metrics_buckets
          WHERE grain = $1 AND channel = $2 AND config = $3 AND start >= $4 AND start < $5
          ORDER BY start",
    )
    .bind(grain.as_str())
    .bind(channel)
    .bind(config)
    .bind(first)
    .bind(to)
    .fetch_all(&mut *conn)
    .await?;
    let mut stored = stored.into_iter().peekable();
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count {
        let start = first + grain.delta() * i as i32;
        let figures = match stored.peek() {
            Some((s, _)) if *s == start => stored.next().map(|(_, f)| f.0).unwrap_or_default(),
            _ => Figures::default(),
        };
        out.push((start, figures));
    }
    Ok(out)
}

/// The merged figures of one bucket (zero when nothing happened in it).
pub async fn bucket(
    conn: &mut PgConnection,
    grain: Grain,
    at: DateTime<Utc>,
    channel: &str,
    config: &str,
) -> Result<(DateTime<Utc>, Figures), sqlx::Error> {
    let start = grain.start(at);
    let figures: Option<sqlx::types::Json<Figures>> = sqlx::query_scalar(
        "SELECT figures FROM metrics_buckets WHERE grain = $1 AND channel = $2 AND config = $3 AND start = $4",
    )
    .bind(grain.as_str())
    .bind(channel)
    .bind(config)
    .bind(start)
    .fetch_optional(&mut *conn)
    .await?;
    Ok((start, figures.map(|f| f.0).unwrap_or_default()))
}

/// Everything in `[from, to)` merged into one set of figures: whole days
/// where the range covers them, hours at its ragged ends.
pub async fn total(
    conn: &mut PgConnection,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    channel: &str,
    config: &str,
) -> Result<Figures, sqlx::Error> {
    let mut total = Figures::default();
    if to <= from {
        return Ok(total);
    }
    let hour_from = Grain::Hour.start(from);
    let day_from = {
        let d = Grain::Day.start(from);
        if d < hour_from {
            d + Grain::Day.delta()
        } else {
            d
        }
    };
    let day_to = Grain::Day.start(to);
    let rows: Vec<(sqlx::types::Json<Figures>,)> = if day_from < day_to {
        sqlx::query_as(
            "SELECT figures FROM metrics_buckets
              WHERE channel = $1 AND config = $2
                AND ((grain = 'day' AND start >= $3 AND start < $4)
                  OR (grain = 'hour' AND ((start >= $5 AND start < $3) OR (start >= $4 AND start < $6))))",
        )
        .bind(channel)
        .bind(config)
        .bind(day_from)
        .bind(day_to)
        .bind(hour_from)
        .bind(to)
        .fetch_all(&mut *conn)
        .await?
    } else {
        sqlx::query_as(
            "SELECT figures FROM metrics_buckets
              WHERE channel = $1 AND config = $2 AND grain = 'hour' AND start >= $3 AND start < $4",
        )
        .bind(channel)
        .bind(config)
        .bind(hour_from)
        .bind(to)
        .fetch_all(&mut *conn)
        .await?
    };
    for (f,) in rows {
        total.merge(&f.0);
    }
    Ok(total)
}

/// The AI configurations with figures in `[from, to)`, at most `limit`.
pub async fn configurations(
    conn: &mut PgConnection,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT DISTINCT config FROM metrics_buckets
          WHERE grain = 'hour' AND channel = $1 AND config <> $1 AND start >= $2 AND start < $3
          ORDER BY config LIMIT $4",
    )
    .bind(ALL)
    .bind(Grain::Hour.start(from))
    .bind(to)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await
}

/// The start of `at`'s calendar year (UTC).
pub fn year_start(at: DateTime<Utc>) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(at.year(), 1, 1, 0, 0, 0)
        .single()
        .expect("January 1st exists")
}

/// Model spend in millionths of a dollar from `since` (a day's start).
pub async fn model_cost_since(
    conn: &mut PgConnection,
    since: DateTime<Utc>,
) -> Result<u64, sqlx::Error> {
    let micro: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum((figures->>'model_cost_micro_usd')::bigint), 0)::bigint FROM metrics_buckets
          WHERE grain = 'day' AND channel = $1 AND config = $1 AND start >= $2",
    )
    .bind(ALL)
    .bind(Grain::Day.start(since))
    .fetch_one(&mut *conn)
    .await?;
    Ok(micro.max(0) as u64)
}

/// A ticket's model usage so far: (cost in micro-dollars, tokens in, out).
pub async fn ticket_model_usage(
    conn: &mut PgConnection,
    ticket_id: uuid::Uuid,
) -> Result<Option<(u64, u64, u64)>, sqlx::Error> {
    let facts: Option<sqlx::types::Json<super::TicketFacts>> =
        sqlx::query_scalar("SELECT facts FROM metrics_tickets WHERE ticket_id = $1")
            .bind(ticket_id)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(facts.map(|f| {
        (
            f.0.model_cost_micro_usd,
            f.0.model_tokens_in,
            f.0.model_tokens_out,
        )
    }))
}

/// What is open right now, from the CRM read models.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenWork {
    pub open_tickets: i64,
    pub pending_approvals: i64,
    pub open_escalations: i64,
    /// Open tickets whose next SLA deadline falls within the window.
    pub sla_at_risk: i64,
    /// Open tickets per assignee (`None`: the unassigned human queue).
    pub queues: Vec<(Option<String>, i64)>,
}

/// The most assignees the dashboard lists.
pub const MAX_QUEUES: i64 = 200;

/// Everything the dashboard shows, in two statements: what is open now,
/// the current hour's and day's buckets, and the year's model spend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DashboardFigures {
    pub work: OpenWork,
    pub hour_start: DateTime<Utc>,
    pub hour: Figures,
    pub day_start: DateTime<Utc>,
    pub day: Figures,
    pub model_cost_ytd_micro_usd: u64,
}

pub async fn dashboard(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    risk_window: chrono::TimeDelta,
) -> Result<DashboardFigures, sqlx::Error> {
    type Row = (
        i64,
        i64,
        i64,
        i64,
        Option<sqlx::types::Json<Figures>>,
        Option<sqlx::types::Json<Figures>>,
        i64,
    );
    let hour_start = Grain::Hour.start(now);
    let day_start = Grain::Day.start(now);
    let (open_tickets, sla_at_risk, pending_approvals, open_escalations, hour, day, cost): Row =
        sqlx::query_as(
            "SELECT
               (SELECT count(*) FROM crm_tickets WHERE status NOT IN ('resolved', 'closed')),
               (SELECT count(*) FROM crm_tickets WHERE status NOT IN ('resolved', 'closed')
                   AND sla_due_at > $1 AND sla_due_at <= $2),
               (SELECT count(*) FROM crm_approvals WHERE status = 'pending'),
               (SELECT count(*) FROM crm_escalations WHERE status = 'open'),
               (SELECT figures FROM metrics_buckets
                 WHERE grain = 'hour' AND channel = $3 AND config = $3 AND start = $4),
               (SELECT figures FROM metrics_buckets
                 WHERE grain = 'day' AND channel = $3 AND config = $3 AND start = $5),
               (SELECT coalesce(sum((figures->>'model_cost_micro_usd')::bigint), 0)::bigint FROM metrics_buckets
                 WHERE grain = 'day' AND channel = $3 AND config = $3 AND start >= $6)",
        )
        .bind(now)
        .bind(now + risk_window)
        .bind(ALL)
        .bind(hour_start)
        .bind(day_start)
        .bind(year_start(now))
        .fetch_one(&mut *conn)
        .await?;
    let queues = queues(conn).await?;
    Ok(DashboardFigures {
        work: OpenWork {
            open_tickets,
            pending_approvals,
            open_escalations,
            sla_at_risk,
            queues,
        },
        hour_start,
        hour: hour.map(|f| f.0).unwrap_or_default(),
        day_start,
        day: day.map(|f| f.0).unwrap_or_default(),
        model_cost_ytd_micro_usd: cost.max(0) as u64,
    })
}

/// Open tickets a person holds, per assignee (the unassigned queue too).
async fn queues(conn: &mut PgConnection) -> Result<Vec<(Option<String>, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT assigned_to, count(*) FROM crm_tickets
          WHERE status NOT IN ('resolved', 'closed') AND handler = 'human'
          GROUP BY assigned_to ORDER BY count(*) DESC, assigned_to LIMIT $1",
    )
    .bind(MAX_QUEUES)
    .fetch_all(&mut *conn)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_counts_cover_partial_buckets() {
        let t = |h, m| Utc.with_ymd_and_hms(2026, 11, 24, h, m, 0).unwrap();
        assert_eq!(bucket_count(Grain::Hour, t(9, 0), t(9, 0)), 0);
        assert_eq!(bucket_count(Grain::Hour, t(9, 0), t(10, 0)), 1);
        assert_eq!(bucket_count(Grain::Hour, t(9, 30), t(10, 1)), 2);
        assert_eq!(bucket_count(Grain::Day, t(9, 30), t(23, 59)), 1);
        assert_eq!(
            bucket_count(Grain::Day, t(0, 0), t(0, 0) + chrono::TimeDelta::days(30)),
            30
        );
        assert_eq!(
            year_start(t(9, 0)),
            Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
        );
    }
}

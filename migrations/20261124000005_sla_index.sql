-- The SLA monitor looks for open tickets whose next deadline has passed,
-- every few seconds: an index of just those.
CREATE INDEX crm_tickets_open_due_idx ON crm_tickets (sla_due_at)
    WHERE status NOT IN ('resolved', 'closed');

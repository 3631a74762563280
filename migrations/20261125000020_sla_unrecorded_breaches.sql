-- The SLA monitor must only see tickets with a breach still to record.
-- Each kind's deadline is kept while its breach is still to be recorded
-- (NULL once recorded, met, or the ticket is resolved or closed), and the
-- earliest of them is indexed: tickets whose breaches are all recorded
-- leave the index, so however many there are, a new breach is found.
ALTER TABLE crm_tickets
    ADD COLUMN first_response_breach_due timestamptz,
    ADD COLUMN resolution_breach_due     timestamptz;

UPDATE crm_tickets
   SET first_response_breach_due = CASE
           WHEN status NOT IN ('resolved', 'closed') AND first_response_at IS NULL
                AND NOT COALESCE(state->'sla_breaches' ? 'first_response', false)
           THEN first_response_due END,
       resolution_breach_due = CASE
           WHEN status NOT IN ('resolved', 'closed')
                AND NOT COALESCE(state->'sla_breaches' ? 'resolution', false)
           THEN resolution_due END;

ALTER TABLE crm_tickets
    ADD COLUMN sla_breach_due_at timestamptz
        GENERATED ALWAYS AS (LEAST(first_response_breach_due, resolution_breach_due)) STORED;

CREATE INDEX crm_tickets_sla_unrecorded_idx ON crm_tickets (sla_breach_due_at)
    WHERE sla_breach_due_at IS NOT NULL;

-- Replaced by the index above: it kept every open overdue ticket, breaches
-- recorded or not.
DROP INDEX IF EXISTS crm_tickets_open_due_idx;

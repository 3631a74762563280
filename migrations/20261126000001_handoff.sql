-- The human hand-off's read models: who holds each ticket, when it was
-- resolved and closed, which closed ticket it follows, and the escalation
-- and approval queues staff work from. Every table carries `customer_id`
-- (row-level security filters on it). All rows are projections of ticket
-- events (crm-tickets projector); `casebook replay projections --only
-- crm-tickets` rebuilds them exactly. The backfill below only approximates
-- rows projected before this migration (the event times it needs are not
-- in the old rows).

ALTER TABLE crm_tickets
    -- The contract's name for `assigned_to`.
    ADD COLUMN assignee                 text GENERATED ALWAYS AS (assigned_to) STORED,
    -- 'ai' until escalated or assigned; 'human' until handed back or
    -- resolved with nobody assigned.
    ADD COLUMN handler                  text NOT NULL DEFAULT 'ai' CHECK (handler IN ('ai', 'human')),
    ADD COLUMN resolved_at              timestamptz,
    ADD COLUMN closed_at                timestamptz,
    ADD COLUMN previous_ticket_id       uuid,
    ADD COLUMN last_customer_message_at timestamptz;

UPDATE crm_tickets
   SET handler = CASE WHEN assigned_to IS NOT NULL OR status = 'escalated' THEN 'human' ELSE 'ai' END,
       resolved_at = CASE WHEN status = 'resolved' THEN updated_at END,
       closed_at = CASE WHEN status = 'closed' THEN updated_at END;

-- myQueue: a person's open tickets, most recently active first.
CREATE INDEX crm_tickets_assignee_idx ON crm_tickets (assigned_to, status, updated_at DESC)
    WHERE assigned_to IS NOT NULL;
-- The unassigned human queue.
CREATE INDEX crm_tickets_human_unassigned_idx ON crm_tickets (status, updated_at DESC)
    WHERE handler = 'human' AND assigned_to IS NULL;
-- The auto-close job: resolved tickets by when they were resolved.
CREATE INDEX crm_tickets_resolved_idx ON crm_tickets (resolved_at)
    WHERE status = 'resolved';
CREATE INDEX crm_tickets_previous_idx ON crm_tickets (previous_ticket_id)
    WHERE previous_ticket_id IS NOT NULL;

CREATE TABLE crm_escalations
(
    escalation_id   uuid PRIMARY KEY,
    ticket_id       uuid        NOT NULL,
    customer_id     uuid        NOT NULL,
    reason          text        NOT NULL,
    note            text,
    status          text        NOT NULL CHECK (status IN ('open', 'resolved')),
    -- The ticket's assignee while the escalation is open.
    assigned_to     text,
    created_at      timestamptz NOT NULL,
    resolved_at     timestamptz,
    resolved_by     text,
    resolution_note text
);
CREATE INDEX crm_escalations_status_idx ON crm_escalations (status, created_at);
CREATE INDEX crm_escalations_assigned_idx ON crm_escalations (assigned_to, status, created_at);
CREATE INDEX crm_escalations_ticket_idx ON crm_escalations (ticket_id, created_at);
CREATE INDEX crm_escalations_customer_idx ON crm_escalations (customer_id);

CREATE TABLE crm_approvals
(
    approval_id uuid PRIMARY KEY,
    ticket_id   uuid        NOT NULL,
    customer_id uuid        NOT NULL,
    status      text        NOT NULL CHECK (status IN ('pending', 'approved', 'rejected')),
    draft_id    uuid        NOT NULL,
    draft_body  text        NOT NULL,
    -- What the person sent instead of the draft, if they edited it.
    edited_body text,
    confidence  float8      NOT NULL,
    -- Why the draft was held.
    reasons     text[]      NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL,
    decided_at  timestamptz,
    decided_by  text,
    -- Why it was rejected.
    reason      text
);
CREATE INDEX crm_approvals_status_idx ON crm_approvals (status, created_at);
CREATE INDEX crm_approvals_ticket_idx ON crm_approvals (ticket_id, created_at);
CREATE INDEX crm_approvals_customer_idx ON crm_approvals (customer_id);

-- Escalations and approvals projected before this migration.
INSERT INTO crm_escalations (escalation_id, ticket_id, customer_id, reason, note, status, assigned_to, created_at,
                             resolved_at, resolved_by, resolution_note)
SELECT (e.payload->>'escalation_id')::uuid, t.ticket_id, t.customer_id, e.payload->>'reason',
       e.payload->>'note', 'open', t.assigned_to, e.occurred_at, NULL, NULL, NULL
  FROM events e JOIN crm_tickets t ON t.ticket_id::text = e.aggregate_id
 WHERE e.aggregate_type = 'ticket' AND e.event_type = 'TicketEscalated'
ON CONFLICT (escalation_id) DO NOTHING;
UPDATE crm_escalations c
   SET status = 'resolved', resolved_at = e.occurred_at, resolved_by = e.payload->>'resolved_by',
       resolution_note = e.payload->>'note'
  FROM events e
 WHERE e.aggregate_type = 'ticket' AND e.event_type = 'EscalationResolved'
   AND e.payload->>'escalation_id' = c.escalation_id::text;
INSERT INTO crm_approvals (approval_id, ticket_id, customer_id, status, draft_id, draft_body, confidence, created_at)
SELECT (a.payload->>'approval_id')::uuid, t.ticket_id, t.customer_id, 'pending',
       (a.payload->>'draft_id')::uuid, d.payload->>'body', (d.payload->>'confidence')::float8, a.occurred_at
  FROM events a
  JOIN crm_tickets t ON t.ticket_id::text = a.aggregate_id
  JOIN events d ON d.aggregate_type = 'ticket' AND d.aggregate_id = a.aggregate_id
               AND d.event_type = 'ResponseDrafted' AND d.payload->>'draft_id' = a.payload->>'draft_id'
 WHERE a.aggregate_type = 'ticket' AND a.event_type = 'ApprovalRequested'
ON CONFLICT (approval_id) DO NOTHING;
UPDATE crm_approvals c
   SET status = CASE e.event_type WHEN 'ResponseApproved' THEN 'approved' ELSE 'rejected' END,
       edited_body = e.payload->>'edited_body', decided_at = e.occurred_at,
       decided_by = COALESCE(e.payload->>'approved_by', e.payload->>'rejected_by'), reason = e.payload->>'reason'
  FROM events e
 WHERE e.aggregate_type = 'ticket' AND e.event_type IN ('ResponseApproved', 'ResponseRejected')
   AND e.payload->>'approval_id' = c.approval_id::text;

-- Read models built by the projectors from `fte.events`, and the
-- bookkeeping that makes each projector apply every event exactly once.

-- Kafka offsets, written in the same transaction as the rows they produced:
-- the record of what each batch consumed. Consumers resume from the group's
-- offsets committed to Kafka after this transaction (never ahead of it).
CREATE TABLE projector_offsets
(
    projector   text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projector, topic, partition)
);

-- The last sequence applied per stream: a relay that republishes after a
-- crash produces copies at new offsets; these are recognised and skipped.
CREATE TABLE projector_streams
(
    projector      text   NOT NULL,
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    last_sequence  bigint NOT NULL,
    PRIMARY KEY (projector, aggregate_type, aggregate_id)
);

-- How far each projector has got, for lag metrics and readiness.
CREATE TABLE projector_progress
(
    projector       text PRIMARY KEY,
    last_position   bigint      NOT NULL,
    last_event_at   timestamptz NOT NULL,
    events_applied  bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE crm_customers
(
    customer_id uuid PRIMARY KEY,
    name        text,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);

CREATE TABLE crm_customer_identifiers
(
    kind        text        NOT NULL CHECK (kind IN ('email', 'phone', 'whatsapp')),
    value       text        NOT NULL,
    customer_id uuid        NOT NULL,
    linked_at   timestamptz NOT NULL,
    PRIMARY KEY (kind, value)
);
CREATE INDEX crm_customer_identifiers_customer_idx ON crm_customer_identifiers (customer_id);

CREATE TABLE crm_tickets
(
    ticket_id          uuid PRIMARY KEY,
    customer_id        uuid        NOT NULL,
    channel            text        NOT NULL,
    subject            text,
    category           text        NOT NULL,
    priority           text        NOT NULL,
    status             text        NOT NULL,
    assigned_to        text,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    first_response_at  timestamptz,
    first_response_due timestamptz NOT NULL,
    resolution_due     timestamptz NOT NULL,
    sla_due_at         timestamptz NOT NULL,
    sla_breached       boolean     NOT NULL DEFAULT false,
    messages_count     integer     NOT NULL DEFAULT 0,
    open_escalations   integer     NOT NULL DEFAULT 0,
    pending_approvals  integer     NOT NULL DEFAULT 0,
    feedback_helpful   boolean,
    -- When the read model first learned of the ticket (pipeline latency).
    projected_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The domain's ticket state, folded by the projector with the same
    -- code the write side uses, so status rules live in one place.
    state              jsonb       NOT NULL
);
CREATE INDEX crm_tickets_customer_idx ON crm_tickets (customer_id, created_at DESC);
CREATE INDEX crm_tickets_status_idx ON crm_tickets (status, sla_due_at);
CREATE INDEX crm_tickets_created_idx ON crm_tickets (created_at DESC, ticket_id);

CREATE TABLE crm_conversations
(
    ticket_id       uuid PRIMARY KEY,
    customer_id     uuid        NOT NULL,
    channels        text[]      NOT NULL,
    started_at      timestamptz NOT NULL,
    last_message_at timestamptz NOT NULL,
    inbound_count   integer     NOT NULL DEFAULT 0,
    outbound_count  integer     NOT NULL DEFAULT 0
);
CREATE INDEX crm_conversations_customer_idx ON crm_conversations (customer_id, last_message_at DESC);

CREATE TABLE crm_messages
(
    message_id         uuid PRIMARY KEY,
    ticket_id          uuid        NOT NULL,
    customer_id        uuid,
    direction          text        NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    channel            text        NOT NULL,
    channel_message_id text,
    body               text        NOT NULL,
    at                 timestamptz NOT NULL,
    delivery_status    text,
    position           bigint      NOT NULL
);
CREATE INDEX crm_messages_ticket_idx ON crm_messages (ticket_id, at, position);
CREATE INDEX crm_messages_channel_id_idx ON crm_messages (channel, channel_message_id);

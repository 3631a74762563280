-- Each part of a reply handed to a provider (Twilio, Gmail), written by the
-- delivery worker before the provider call ('started') and completed with
-- the provider's id once the provider accepted it ('accepted'), so that a
-- retry or a redelivery resumes at the part that failed and never sends
-- again what the provider acknowledged. A part left 'started' (a timeout
-- after the request went out, a crash mid-call) is looked up at the
-- provider before anything is resent. 'refused': the provider certainly did
-- not take it. No message body, address or number is kept here.
CREATE TABLE delivery_parts (
    response_id         uuid        NOT NULL,
    part_index          integer     NOT NULL CHECK (part_index >= 0 AND part_index < 1000),
    ticket_id           uuid        NOT NULL,
    service             text        NOT NULL CHECK (service IN ('twilio', 'gmail')),
    state               text        NOT NULL CHECK (state IN ('started', 'accepted', 'refused')),
    provider_message_id text        CHECK (length(provider_message_id) <= 200),
    attempts            integer     NOT NULL DEFAULT 1,
    -- The delivery events for this part are in the event store.
    recorded            boolean     NOT NULL DEFAULT false,
    first_started_at    timestamptz NOT NULL DEFAULT now(),
    last_started_at     timestamptz NOT NULL DEFAULT now(),
    accepted_at         timestamptz,
    PRIMARY KEY (response_id, part_index),
    CHECK ((state = 'accepted') = (provider_message_id IS NOT NULL))
);

-- A provider id found while reconciling is only ours if no other part
-- claimed it already.
CREATE UNIQUE INDEX delivery_parts_provider_id_idx
    ON delivery_parts (service, provider_message_id)
    WHERE provider_message_id IS NOT NULL;

-- The hand-off's queues are read models like the others: casebook_api reads
-- them only in a caller's scope (a customer sees their own rows), and only
-- commands and projectors write them.
SELECT casebook_protect_read_model('crm_escalations');
SELECT casebook_protect_read_model('crm_approvals');

-- Roles enforced twice: GraphQL resolvers check the caller's role, and
-- Postgres checks it again on every read-model row, so that a resolver bug
-- cannot leak another customer's data.
--
-- The API reads inside a transaction that does
--   SET LOCAL ROLE casebook_api;
--   SELECT set_config('casebook.role', <role>, true),
--          set_config('casebook.customer_id', <customer id or ''>, true);
-- (projections/src/access.rs). `casebook_api` may only SELECT the read
-- models; projectors and commands run as the owner and never set
-- `casebook.role`, which leaves them full access. RLS is FORCEd, so the
-- policies hold for the table owner too whenever the settings are present
-- (a superuser, as in the local stack, bypasses RLS altogether; that is why
-- the API never reads as the owner with a caller's scope but as
-- `casebook_api`).

-- The role is cluster-wide: another database of the same cluster (one per
-- test) may have created it already, or be creating it right now.
DO
$$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'casebook_api') THEN
        BEGIN
            CREATE ROLE casebook_api NOLOGIN;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN NULL;
        END;
    END IF;
    -- The migrating user is the user the service connects as: it must be
    -- able to SET ROLE casebook_api (a superuser always can).
    IF NOT pg_has_role(current_user, 'casebook_api', 'MEMBER') THEN
        BEGIN
            EXECUTE format('GRANT casebook_api TO %I', current_user);
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN NULL;
        END;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO casebook_api', current_schema());
END
$$;

-- The caller's scope of the current transaction; NULL when unset. A
-- placeholder setting reads '' (not NULL) once a transaction of the same
-- connection has set it, hence the nullif.
CREATE OR REPLACE FUNCTION casebook_scope_role() RETURNS text
    LANGUAGE sql
    STABLE
AS
$$
SELECT nullif(current_setting('casebook.role', true), '')
$$;

CREATE OR REPLACE FUNCTION casebook_scope_customer() RETURNS uuid
    LANGUAGE sql
    STABLE
AS
$$
SELECT nullif(current_setting('casebook.customer_id', true), '')::uuid
$$;

-- The policies every protected table gets, whatever its rows:
--   casebook_unscoped: no scope set (projectors, commands, as the owner)
--     → everything, reads and writes;
--   casebook_staff_read: agent, supervisor, analyst, auditor → read all;
--   casebook_api_scoped (RESTRICTIVE, casebook_api only): nothing at all
--     without a scope (a forgotten SET LOCAL leaks nothing), and never a
--     write, even if a write grant were added by mistake.
-- Idempotent: it can be applied again to a table, and to new tables.
CREATE OR REPLACE FUNCTION casebook_protect_table(tbl regclass) RETURNS void
    LANGUAGE plpgsql
    -- DROP POLICY IF EXISTS would notice every first application.
    SET client_min_messages = warning
AS
$fn$
BEGIN
    EXECUTE format('GRANT SELECT ON %s TO casebook_api', tbl);
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', tbl);
    EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', tbl);

    EXECUTE format('DROP POLICY IF EXISTS casebook_unscoped ON %s', tbl);
    EXECUTE format('CREATE POLICY casebook_unscoped ON %s AS PERMISSIVE FOR ALL '
                       'USING (casebook_scope_role() IS NULL) '
                       'WITH CHECK (casebook_scope_role() IS NULL)', tbl);

    EXECUTE format('DROP POLICY IF EXISTS casebook_staff_read ON %s', tbl);
    EXECUTE format('CREATE POLICY casebook_staff_read ON %s AS PERMISSIVE FOR SELECT '
                       'USING (casebook_scope_role() IN (''agent'', ''supervisor'', ''analyst'', ''auditor''))',
                   tbl);

    EXECUTE format('DROP POLICY IF EXISTS casebook_api_scoped ON %s', tbl);
    EXECUTE format('CREATE POLICY casebook_api_scoped ON %s AS RESTRICTIVE FOR ALL TO casebook_api '
                       'USING (casebook_scope_role() IS NOT NULL) '
                       'WITH CHECK (false)', tbl);
END
$fn$;

-- A read model with a `customer_id` column: as casebook_protect_table, and
-- a customer reads the rows whose customer_id is their own.
CREATE OR REPLACE FUNCTION casebook_protect_read_model(tbl regclass) RETURNS void
    LANGUAGE plpgsql
    -- DROP POLICY IF EXISTS would notice every first application.
    SET client_min_messages = warning
AS
$fn$
BEGIN
    IF NOT EXISTS (SELECT 1
                   FROM pg_attribute
                   WHERE attrelid = tbl
                     AND attname = 'customer_id'
                     AND NOT attisdropped) THEN
        RAISE EXCEPTION '% has no customer_id column', tbl;
    END IF;
    PERFORM casebook_protect_table(tbl);
    EXECUTE format('DROP POLICY IF EXISTS casebook_customer_read ON %s', tbl);
    EXECUTE format('CREATE POLICY casebook_customer_read ON %s AS PERMISSIVE FOR SELECT '
                       'USING (casebook_scope_role() = ''customer'' '
                       'AND customer_id = casebook_scope_customer())', tbl);
END
$fn$;

SELECT casebook_protect_read_model('crm_customers');
SELECT casebook_protect_read_model('crm_customer_identifiers');
SELECT casebook_protect_read_model('crm_tickets');
SELECT casebook_protect_read_model('crm_conversations');
SELECT casebook_protect_read_model('crm_messages');
-- The knowledge base (knowledgeSearch): staff read it, customers do not.
SELECT casebook_protect_table('kb_documents');
SELECT casebook_protect_table('kb_chunks');

-- Custom domains (`phloem domains add`, neon.ts `customDomains`): a host name served by
-- one function of one branch. The name is unique platform-wide (the primary key), and a
-- domain belongs to its branch alone: a child branch does not inherit it, and deleting the
-- branch deletes it. The function is named by slug, not referenced (as a trigger's is): a
-- redeploy or a delete of the function does not touch the domain.
CREATE TABLE custom_domains (
    hostname       text PRIMARY KEY,
    branch_id      text NOT NULL REFERENCES branches (id) ON DELETE CASCADE,
    function_slug  text NOT NULL,
    hsts           boolean NOT NULL DEFAULT false,
    owner          text,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX custom_domains_branch_idx ON custom_domains (branch_id);

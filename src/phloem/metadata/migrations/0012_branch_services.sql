-- Branch services (Neon Auth, the AI Gateway, object storage) a branch has on, as its
-- neon.ts declares them; a branch create copies the rows (a child has its parent's
-- services), a delete removes them.
CREATE TABLE branch_services (
    branch_id   text NOT NULL REFERENCES branches (id) ON DELETE CASCADE,
    service     text NOT NULL,
    config      jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (branch_id, service)
);

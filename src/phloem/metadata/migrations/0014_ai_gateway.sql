-- The AI Gateway (issue 15): a branch's gateway secret and its usage counters. Both go
-- with the branch (ON DELETE CASCADE); a child branch starts with a secret of its own
-- (a parent's token is refused on it) and no usage.
--
-- The secret is sealed like every secret at rest (AES-256-GCM bound to the branch id);
-- the tokens functions get are HMACs of it (phloem.services.ai_gateway.tokens).
CREATE TABLE ai_gateway_branches (
    branch_id      text PRIMARY KEY REFERENCES branches (id) ON DELETE CASCADE,
    secret_sealed  text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- Counters per branch, calling function ('' when the branch-wide token called), provider
-- kind and model: one upsert per request, never a row per request.
CREATE TABLE ai_usage (
    branch_id      text NOT NULL REFERENCES branches (id) ON DELETE CASCADE,
    function_slug  text NOT NULL,
    provider       text NOT NULL,
    model          text NOT NULL,
    requests       bigint NOT NULL DEFAULT 0,
    errors         bigint NOT NULL DEFAULT 0,
    input_tokens   bigint NOT NULL DEFAULT 0,
    output_tokens  bigint NOT NULL DEFAULT 0,
    first_at       timestamptz NOT NULL DEFAULT now(),
    last_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (branch_id, function_slug, provider, model)
);

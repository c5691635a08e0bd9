"""Names vulture (scripts/check) cannot see being used: called by a framework, a protocol
or the kernel, or read by users of the public API. Add a name here only with its reason;
anything else vulture reports is dead and goes."""
# ruff: noqa
_ = object()

# Pydantic: model settings and response fields, read by FastAPI when it serialises.
_.model_config
_.phloem_version  # backup manifest field, written to manifest.json
_.logical_size_bytes
_.copied_deployments
_.branch_name
_.latest_deployment
_.functionPath  # trigger fields (neon.ts names)
_.trigger

# httptools calls its protocol's callbacks by name.
_.on_url
_.on_header
_.on_body
_.on_message_complete

# asyncio.AbstractServer's interface (gateway/admission.py Listener).
_.get_loop
_.start_serving

# uvicorn.Server hooks overridden (control/serving.py, tests/gateway).
_.capture_signals

# http.server.BaseHTTPRequestHandler hook (tests/examples).
_.log_message
_.do_GET  # tests/project/test_npm_registry.py: the local upstream's GET

# The interpreter reads it (sys.dont_write_bytecode in the zygote's children).
_.dont_write_bytecode

# Held so the event loop's weak reference to the task is not the only one.
_._relay

# Public API of phloem.config and phloem.functions, called from users' code.
_.define_config
_.parse_env
_.pending_count

# Neon API v2 response fields (control/neon_v2): Neon's CLI reads them from the JSON.
_.account_id
_.active_deployment
_.active_seconds_limit
_.active_time
_.active_time_seconds
_.annotations
_.applications
_.archived
_.auth_accounts
_.auth_method
_.authentication_method
_.autoscaling_limit_max_cu
_.autoscaling_limit_min_cu
_.branch_logical_size_limit
_.branch_logical_size_limit_bytes
_.branches_limit
_.compute_time_seconds
_.connection_parameters
_.connection_uri
_.connection_uris
_.cpu_used_sec
_.creation_source
_.current_deployment
_.current_state
_.data_transfer_bytes
_.disabled
_.email
_.history_retention_seconds
_.integrations
_.last_name
_.login
_.managed_by
_.max_autoscaling_limit
_.memory_mib
_.organizations
_.owner_id
_.owner_name
_.pagination
_.parent_lsn
_.parent_timestamp
_.passwordless_access
_.pg_version
_.platform_id
_.pooler_enabled
_.pooler_mode
_.primary
_.projects
_.projects_limit
_.provisioner
_.proxy_host
_.region_id
_.state_changed_at
_.store_passwords
_.suspend_timeout_seconds
_.written_data_bytes

# Response field of the rollback route (control/api.py), read by clients.
_.previous_deployment_id

# http.server's hooks, called by its request loop (tests/services/ai_upstream.py).
_.do_GET
_.do_POST
_.protocol_version
_.daemon_threads

# Branch services call it to serve their ASGI apps (phloem.services.upstream).
_.serve_asgi

# acme.client.ClientNetwork attributes read by the acme library (gateway/acme/client.py).
_.verify_ssl
_.account

# Response field of the custom domain routes (control/domains_api.py), read by clients.
_.certificate

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

# The interpreter reads it (sys.dont_write_bytecode in the zygote's children).
_.dont_write_bytecode

# Held so the event loop's weak reference to the task is not the only one.
_._relay

# Public API of phloem.config and phloem.functions, called from users' code.
_.define_config
_.parse_env
_.pending_count

# Waiting on another branch of issue 12: platform.py's lifecycle rewrite removes it;
# the lead deletes this line when merging it.
_.running_platform

"""The Node.js runtime (``nodejs24``): provisioning, bundling and the isolate host."""

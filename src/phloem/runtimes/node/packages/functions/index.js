// waitUntil and attachDatabasePool, backed by the phloem Node host when the code runs in
// an isolate, and by plain Node behaviour elsewhere (tests, scripts, `node` by hand).
//
// The host publishes globalThis.__phloem_waitUntil (work keeps the isolate alive after the
// response, within its budget) and globalThis.__phloem_onShutdown (called after the
// isolate has drained on SIGINT, before it exits).

/**
 * Keep the isolate alive until `promise` settles (at most the function's wait_until
 * budget, 15 minutes by default), even after the response has been sent.
 */
export function waitUntil(promise) {
  const hook = globalThis.__phloem_waitUntil;
  if (typeof hook === "function") {
    hook(promise);
    return;
  }
  // Outside phloem the process lives while the work has I/O pending; only report failures.
  Promise.resolve(promise).catch((err) => console.error("waitUntil work failed:", err));
}

const attached = new Set();

/**
 * Close `pool` (anything with `end()` or `close()`: pg.Pool, mysql2, ioredis, ...) once the
 * isolate has drained before eviction, so its connections are released cleanly instead of
 * being cut when the process exits.
 */
export function attachDatabasePool(pool) {
  if (pool === null || typeof pool !== "object") {
    throw new TypeError("attachDatabasePool: pool must be an object with end() or close()");
  }
  const close = typeof pool.end === "function" ? "end" : typeof pool.close === "function" ? "close" : null;
  if (close === null) {
    throw new TypeError("attachDatabasePool: pool has neither end() nor close()");
  }
  if (attached.has(pool)) return;
  attached.add(pool);
  const register = globalThis.__phloem_onShutdown;
  if (typeof register === "function") {
    register(async () => {
      try {
        await pool[close]();
      } catch (err) {
        console.error("attachDatabasePool: closing the pool failed:", err);
      }
    });
  }
}

/** The functions' execution context, as `ctx` of fetch(request, env, ctx) exposes it. */
export function getContext() {
  return { waitUntil };
}

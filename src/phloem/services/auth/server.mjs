// Neon Auth for one branch: Better Auth on a listening Unix socket phloem hands over.
//
// phloem (root) binds the socket in the branch's directory and starts this file as an
// unprivileged system user with the socket as fd LISTEN_FD and a pipe as fd READY_FD:
//
//   node server.mjs                 serve (migrates first), write "ready\n" to READY_FD
//   node server.mjs --migrate       create the schema and tables, then exit
//
// Configuration comes from the environment (never argv: it holds a password):
//   AUTH_DATABASE_URL   the branch's own database (as its owner role)
//   AUTH_ORIGIN         this branch's auth origin, e.g. http://br-x--auth.fn.localhost:8787
//   AUTH_BASE_PATH      where Better Auth serves, e.g. /main/auth (Neon: /<database>/auth)
//   AUTH_TRUSTED_ORIGINS  JSON list of extra origins allowed to send credentials
//   LISTEN_FD, READY_FD
//
// A request through a local forwarder (phloem dev, env run --forward-services) carries the
// client's Host as X-Phloem-Signed-Host (src/phloem/dev/forward.py). When that names a
// loopback origin (127.0.0.1, localhost, [::1], with a port) the request is served by a
// Better Auth instance whose baseURL, trusted origin, JWT issuer and audience are that
// origin, so code that checks `new URL(NEON_AUTH_BASE_URL).origin` locally accepts the
// tokens; every other request, and every other header value, gets the branch's origin.
// The instances share the pool, hence the users, sessions and signing keys.
//
// Every table lives in schema neon_auth and every query names it (kysely withSchema):
// the branch's pooler drops search_path startup options, so nothing may rely on it.
import http from "node:http";
import fs from "node:fs";
import crypto from "node:crypto";
import pg from "pg";
import { Kysely, PostgresDialect } from "kysely";
import { betterAuth } from "better-auth";
import { bearer, jwt } from "better-auth/plugins";
import { toNodeHandler } from "better-auth/node";
import { getMigrations } from "better-auth/db/migration";

const SCHEMA = "neon_auth";

function need(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

const origin = need("AUTH_ORIGIN");
const basePath = need("AUTH_BASE_PATH");
const trusted = JSON.parse(process.env.AUTH_TRUSTED_ORIGINS || "[]");

const pool = new pg.Pool({ connectionString: need("AUTH_DATABASE_URL"), max: 5,
                           idleTimeoutMillis: 30_000 });
// A restarted cluster (branch reset) breaks idle connections: drop them, never crash.
pool.on("error", (err) => console.error(`[neon-auth] idle connection lost: ${err.message}`));

// The secret (session cookie signatures, encryption of the JWKS private keys) is kept
// in the branch's database, so a child branch, which copies the keys and sessions,
// can decrypt and verify them: everything auth knows travels with the data.
async function branchSecret() {
  const client = await pool.connect();
  try {
    await client.query(`CREATE SCHEMA IF NOT EXISTS ${SCHEMA}`);
    await client.query(`CREATE TABLE IF NOT EXISTS ${SCHEMA}.phloem_settings (
        name text PRIMARY KEY, value text NOT NULL)`);
    await client.query(
      `INSERT INTO ${SCHEMA}.phloem_settings (name, value) VALUES ('secret', $1)
       ON CONFLICT (name) DO NOTHING`, [crypto.randomBytes(32).toString("base64url")]);
    const { rows } = await client.query(
      `SELECT value FROM ${SCHEMA}.phloem_settings WHERE name = 'secret'`);
    return rows[0].value;
  } finally {
    client.release();
  }
}

function log(what, fields) {
  console.log(`[neon-auth] ${what} ${JSON.stringify(fields)}`);
}

function options(secret, self = origin) {
  return {
    appName: "phloem",
    baseURL: self,
    basePath,
    secret,
    database: { dialect: new PostgresDialect({ pool }), type: "postgres",
                schemaName: SCHEMA, transaction: true },
    trustedOrigins: [...new Set([self, origin, ...trusted])],
    telemetry: { enabled: false },
    // No mail is sent: development links go to the log (the branch's auth.log).
    emailAndPassword: {
      enabled: true,
      requireEmailVerification: false,
      sendResetPassword: async ({ user, url }) => log("password reset link", { email: user.email, url }),
    },
    emailVerification: {
      sendOnSignUp: true,
      sendVerificationEmail: async ({ user, url }) => log("verification link", { email: user.email, url }),
    },
    // The names @neondatabase/auth forwards: __Secure-neon-auth.session_token, ...
    advanced: { cookiePrefix: "neon-auth", useSecureCookies: true },
    plugins: [
      // Authorization: Bearer <session token> works as the session cookie does.
      bearer(),
      jwt({
        jwks: { jwksPath: "/.well-known/jwks.json" },
        // The branch's origin is the issuer (and audience): a child copies the keys with
        // the data but has another origin, so its tokens fail the parent's issuer check.
        // Through a local forwarder it is the forwarder's origin (see localOrigin).
        jwt: { issuer: self, audience: self },
      }),
    ],
  };
}

// Browsers on a trusted origin (an SPA calling createAuthClient(NEON_AUTH_BASE_URL)
// directly) need CORS with credentials; Better Auth leaves CORS to its host.
const patterns = [origin, ...trusted].map((p) => new RegExp(
  "^" + p.split("*").map((part) => part.replace(/[.+?^${}()|[\]\\/]/g, "\\$&")).join("[^/]*") + "$"));

function cors(req, res, local) {
  const from = req.headers.origin;
  if (!from || !(from === local || patterns.some((p) => p.test(from)))) return false;
  res.setHeader("access-control-allow-origin", from);
  res.setHeader("access-control-allow-credentials", "true");
  res.setHeader("vary", "Origin");
  res.setHeader("access-control-expose-headers", "set-auth-jwt, set-auth-token");
  if (req.method !== "OPTIONS") return false;
  res.setHeader("access-control-allow-methods", "GET, POST, OPTIONS");
  res.setHeader("access-control-allow-headers",
                req.headers["access-control-request-headers"] || "content-type, authorization");
  res.setHeader("access-control-max-age", "600");
  res.writeHead(204);
  res.end();
  return true;
}

// The origin of a local forwarder the request came through, or null. Only loopback names
// are taken: such an issuer is accepted only by a verifier on the caller's own machine
// that expects exactly that origin, while a foreign name (any client can send the header
// straight to the gateway) could make tokens look issued by another server.
const LOOPBACK = /^(127\.0\.0\.1|localhost|\[::1\]):[0-9]{1,5}$/;

function localOrigin(req) {
  const value = req.headers["x-phloem-signed-host"];
  if (typeof value !== "string") return null;
  const host = value.trim().toLowerCase();
  if (!LOOPBACK.test(host)) return null;
  try {
    const url = new URL(`http://${host}`);
    return url.port ? url.origin : null;  // port 80 (or 0xx forms of it): not a forwarder
  } catch {
    return null;
  }
}

// One Better Auth instance per local origin, made on first use; the oldest goes beyond
// MAX_LOCAL (each forwarder run has a new port; an instance holds only rate-limit state).
const MAX_LOCAL = 16;

function handlers(secret) {
  const main = toNodeHandler(betterAuth(options(secret)));
  const local = new Map();
  return (req) => {
    const self = localOrigin(req);
    if (self === null) return [main, null];
    let handler = local.get(self);
    if (handler === undefined) {
      if (local.size >= MAX_LOCAL) local.delete(local.keys().next().value);
      handler = toNodeHandler(betterAuth(options(secret, self)));
      local.set(self, handler);
    }
    return [handler, self];
  };
}

async function migrate(opts) {
  const { runMigrations } = await getMigrations(opts);
  await runMigrations();
}

async function main() {
  const secret = await branchSecret();
  await migrate(options(secret));
  if (process.argv.includes("--migrate")) {
    await pool.end();
    return;
  }
  const pick = handlers(secret);
  const server = http.createServer((req, res) => {
    const [handler, local] = pick(req);
    if (cors(req, res, local)) return;
    handler(req, res).catch((err) => {
      console.error(`[neon-auth] ${req.method} ${req.url}: ${err?.stack ?? err}`);
      if (!res.headersSent) res.writeHead(500, { "content-type": "application/json" });
      res.end('{"error":"internal"}');
    });
  });
  server.keepAliveTimeout = 65_000;
  server.listen({ fd: Number(need("LISTEN_FD")) }, () => {
    fs.writeSync(Number(need("READY_FD")), "ready\n");
    fs.closeSync(Number(need("READY_FD")));
  });
  const shutdown = () => {
    // Idle keep-alive connections would hold close() open; a stuck pool must not either.
    setTimeout(() => process.exit(0), 3000).unref();
    server.close(() => pool.end().finally(() => process.exit(0)));
    server.closeIdleConnections();
  };
  process.on("SIGTERM", shutdown);
  process.on("SIGINT", shutdown);
}

main().catch((err) => {
  console.error(`[neon-auth] failed: ${err?.stack ?? err}`);
  process.exit(1);
});

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

function options(secret) {
  return {
    appName: "phloem",
    baseURL: origin,
    basePath,
    secret,
    database: { dialect: new PostgresDialect({ pool }), type: "postgres",
                schemaName: SCHEMA, transaction: true },
    trustedOrigins: [origin, ...trusted],
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
        jwt: { issuer: origin, audience: origin },
      }),
    ],
  };
}

// Browsers on a trusted origin (an SPA calling createAuthClient(NEON_AUTH_BASE_URL)
// directly) need CORS with credentials; Better Auth leaves CORS to its host.
const patterns = [origin, ...trusted].map((p) => new RegExp(
  "^" + p.split("*").map((part) => part.replace(/[.+?^${}()|[\]\\/]/g, "\\$&")).join("[^/]*") + "$"));

function cors(req, res) {
  const from = req.headers.origin;
  if (!from || !patterns.some((p) => p.test(from))) return false;
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

async function migrate(opts) {
  const { runMigrations } = await getMigrations(opts);
  await runMigrations();
}

async function main() {
  const opts = options(await branchSecret());
  await migrate(opts);
  if (process.argv.includes("--migrate")) {
    await pool.end();
    return;
  }
  const auth = betterAuth(opts);
  const handler = toNodeHandler(auth);
  const server = http.createServer((req, res) => {
    if (cors(req, res)) return;
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

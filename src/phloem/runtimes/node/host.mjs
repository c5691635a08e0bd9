// The Node isolate host: serve one function bundle on an inherited Unix socket.
//
// The Node twin of phloem/runtimes/python/host.py. It runs inside the isolate, as the
// function's uid, and is shipped bundled with @hono/node-server (see provision.py), so
// it needs nothing but node itself and the function's bundle.
//
//   node host.mjs --bundle /path/bundle.mjs --fd 3 --ready-fd 4
//   node host.mjs --bundle /path/bundle.mjs --check
//   node host.mjs --standby --ready-fd 3      (as root; see "standby" below)
//
// The bundle's default export is an object with fetch(request, env, ctx) (WinterTC /
// Workers style; a Hono app is one) and optionally upgrade(req, socket, head), which gets
// WebSocket (and other Upgrade) requests; or a function, which is then fetch itself. env is @hono/node-server's {incoming, outgoing};
// ctx.waitUntil(promise) keeps the isolate alive after the response for the wait_until
// budget (PHLOEM_WAIT_UNTIL_S).
//
// Status pipe (--ready-fd), one byte per event, as for the Python host: R ready (the
// module's top-level code ran and the server listens), W wait_until work pending, D none
// pending.
//
// SIGINT/SIGTERM: the function's own process.on(...) handlers run first (and phloem waits
// for promises they return); then the server stops accepting, in-flight requests, open
// upgraded sockets and wait_until work finish (bounded by PHLOEM_DRAIN_S, default the
// wait_until budget), and the process exits 0. A second signal exits at once.

import { getRequestListener } from "@hono/node-server";
import { AsyncLocalStorage } from "node:async_hooks";
import { writeSync } from "node:fs";
import { createServer } from "node:http";
import { isAbsolute, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { format } from "node:util";

const EXIT_ENTRY = 3;
const NO_FETCH = "entry: default export has no fetch(request) method";

function parseArgs(argv) {
  const args = { bundle: null, fd: null, readyFd: null, check: false, standby: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) usage(`${a} needs a value`);
      return argv[++i];
    };
    if (a === "--bundle") args.bundle = value();
    else if (a === "--fd") args.fd = Number.parseInt(value(), 10);
    else if (a === "--ready-fd") args.readyFd = Number.parseInt(value(), 10);
    else if (a === "--check") args.check = true;
    else if (a === "--standby") args.standby = true;
    else usage(`unknown argument ${a}`);
  }
  if (args.standby) {
    if (!Number.isInteger(args.fd)) usage("--fd is required with --standby");
    return args;
  }
  if (!args.bundle) usage("--bundle is required");
  if (!args.check && !Number.isInteger(args.fd)) usage("--fd is required unless --check");
  return args;
}

function usage(message) {
  process.stderr.write(
    `phloem-node-host: ${message}\n` +
      "usage: host.mjs --bundle FILE (--check | --fd N [--ready-fd M]) | --standby --fd N --ready-fd M\n",
  );
  process.exit(2);
}

function seconds(name, fallback) {
  const v = Number.parseFloat(process.env[name] ?? "");
  return Number.isFinite(v) && v >= 0 ? v : fallback;
}

// setTimeout fires at once for delays past 2^31 - 1 ms (~24.8 days).
const timerMs = (s) => Math.min(s * 1000, 2 ** 31 - 1);

// ---------------------------------------------------------------------------- status pipe

let statusFd = null;

function status(byte) {
  if (statusFd === null) return;
  try {
    writeSync(statusFd, byte);
  } catch {
    statusFd = null; // the supervisor is gone; PHLOEM_SUPERVISOR_PID handling exits us
  }
}

let watchingParent = false;

function dieWithParent() {
  // No PR_SET_PDEATHSIG from JavaScript: watch the parent instead, so isolates of a
  // SIGKILLed platform do not linger holding their sockets.
  const parent = Number.parseInt(process.env.PHLOEM_SUPERVISOR_PID ?? "", 10);
  if (!Number.isInteger(parent) || watchingParent) return;
  watchingParent = true;
  if (process.ppid !== parent) process.exit(1);
  setInterval(() => {
    if (process.ppid !== parent) process.exit(1);
  }, 1000).unref();
}

// ------------------------------------------------------------------ logs tagged by request

const requestIds = new AsyncLocalStorage();

function tagConsole() {
  // console.* calls made while handling a request get "[rid=<X-Request-Id>] " on each
  // line, like the Python host's output, so logs tie to requests.
  for (const name of ["log", "info", "debug", "warn", "error", "trace"]) {
    const original = console[name].bind(console);
    console[name] = (...args) => {
      const rid = requestIds.getStore();
      if (rid === undefined || name === "trace") return original(...args);
      const text = format(...args);
      return original("%s", text.replace(/^/gm, `[rid=${rid}] `));
    };
  }
}

function requestIdOf(incoming) {
  const rid = incoming.headers["x-request-id"];
  return typeof rid === "string" && rid.length <= 200 ? rid : undefined;
}

// ------------------------------------------------------------------------------ waitUntil

const waitUntilBudgetS = seconds("PHLOEM_WAIT_UNTIL_S", 900);
const pending = new Set();
let pendingIdle = null; // resolves when pending becomes empty

function waitUntil(work) {
  let timer;
  const finished = Promise.resolve(work).then(
    () => undefined,
    (err) => console.error("phloem: wait_until work failed:", err),
  );
  const budget = new Promise((resolveBudget) => {
    timer = setTimeout(() => {
      // JavaScript cannot cancel a promise: stop waiting for it and say so.
      console.error(`phloem: wait_until work cancelled after its ${waitUntilBudgetS} s budget`);
      resolveBudget();
    }, timerMs(waitUntilBudgetS));
    timer.unref();
  });
  if (pending.size === 0) status("W");
  const entry = Promise.race([finished, budget]).finally(() => {
    clearTimeout(timer);
    pending.delete(entry);
    if (pending.size === 0) {
      status("D");
      if (pendingIdle) pendingIdle.resolve();
      pendingIdle = null;
    }
  });
  pending.add(entry);
}

// Closers registered with @phloem/functions' attachDatabasePool: run once the isolate has
// drained, so pools end cleanly instead of being cut by the exit. Bounded: a pool that
// cannot reach its server must not hold the eviction.
const shutdownHooks = [];

function onShutdown(hook) {
  if (typeof hook === "function") shutdownHooks.push(hook);
}

async function runShutdownHooks() {
  if (shutdownHooks.length === 0) return;
  let timer;
  const bound = new Promise((resolveBound) => {
    timer = setTimeout(resolveBound, 5000);
  });
  await Promise.race([Promise.allSettled(shutdownHooks.map((hook) => hook())), bound]);
  clearTimeout(timer);
}

function waitUntilDrained() {
  if (pending.size === 0) return Promise.resolve();
  pendingIdle ??= Promise.withResolvers();
  return pendingIdle.promise;
}

// ---------------------------------------------------------------------------- shutdown

// Signal handling must know about the function's own handlers: a Neon function closes its
// pools and WebSockets in process.on("SIGINT"), and the process must not exit before they
// finished. process.emit is replaced before any signal listener exists (node binds the
// signal handle to process.emit when the first listener is added), so phloem calls the
// function's listeners itself, keeps what they return, and then drains.
const SIGNALS = ["SIGINT", "SIGTERM"];
const handlerResults = [];
const ownListener = () => {};
let shutdown = null; // set once serving: (signal) => void

function installSignalHandling() {
  const originalEmit = process.emit;
  process.emit = function emit(event, ...args) {
    if (!SIGNALS.includes(event)) return originalEmit.call(this, event, ...args);
    for (const listener of process.rawListeners(event)) {
      if (listener === ownListener) continue;
      try {
        const result = listener.call(process, ...args);
        if (result && typeof result.then === "function") handlerResults.push(result);
      } catch (err) {
        console.error(`phloem: the function's ${event} handler threw:`, err);
      }
    }
    onSignal(event);
    return true;
  };
  for (const sig of SIGNALS) process.on(sig, ownListener);
}

let signalled = false;

function onSignal(sig) {
  if (signalled) {
    process.stderr.write(`phloem: second ${sig}, exiting now\n`);
    process.exit(1);
  }
  signalled = true;
  if (shutdown) shutdown(sig);
  else {
    // Still importing the bundle: nothing to drain.
    Promise.allSettled(handlerResults).then(() => process.exit(0));
  }
}

// ------------------------------------------------------------------------------ the app

async function loadHandler(bundle) {
  const url = pathToFileURL(isAbsolute(bundle) ? bundle : resolve(bundle)).href;
  const mod = await import(url);
  const handler = mod.default;
  if (handler === undefined || handler === null) {
    return { error: `${NO_FETCH} (the module has no default export)` };
  }
  if (typeof handler.fetch === "function") return { handler };
  if (typeof handler === "function") {
    // `export default async function handler(request)`: the function is the fetch handler
    // (Neon's bots use this shape). Called plainly, with the same arguments as fetch.
    return { handler: { fetch: (request, env, ctx) => handler(request, env, ctx) } };
  }
  return { error: `${NO_FETCH} (export a fetch function or an object with one)` };
}

function reply(socket, statusLine, text) {
  // A raw HTTP/1.1 response on a socket taken over by the 'upgrade' event.
  if (!socket.writable) return socket.destroy();
  const body = `${text}\n`;
  socket.end(
    `HTTP/1.1 ${statusLine}\r\nContent-Type: text/plain; charset=utf-8\r\n` +
      `Content-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
  );
}

function checkResponse(value) {
  if (value !== null && typeof value === "object" && typeof value.status === "number") {
    return value;
  }
  const got = value === null ? "null" : typeof value;
  throw new TypeError(`fetch() must return a Response (or a promise of one), got ${got}`);
}

function newServer() {
  return createServer({
    requestTimeout: 0, // the gateway enforces its own limits; long uploads are fine
    // No idle timeout: the gateway keeps, trims and closes its upstream connections. With
    // one, Node re-armed a socket timer on every response and sent "Keep-Alive:
    // timeout=3600", which the gateway forwards (it passes response heads through).
    keepAliveTimeout: 0,
    headersTimeout: 60_000,
  });
}

// target: { fd } of the listening socket the supervisor bound, or { server } already
// listening (a standby bound it before dropping root).
function serve(handler, target) {
  let inflight = 0;
  let shuttingDown = false;
  const upgraded = new Set();
  let onQuiet = null; // called whenever a request or an upgraded socket ends

  const ended = () => {
    inflight--;
    if (onQuiet) onQuiet();
  };

  const listener = getRequestListener(
    (request, env) => {
      const ctx = {
        waitUntil,
        passThroughOnException() {},
        props: {},
      };
      const result = handler.fetch(request, env, ctx);
      return result && typeof result.then === "function"
        ? result.then(checkResponse)
        : checkResponse(result);
    },
    {
      errorHandler: (err) => {
        console.error("phloem: fetch() failed:", err);
        return new Response("Internal Server Error", { status: 500 });
      },
    },
  );

  const hasUpgrade = typeof handler.upgrade === "function";
  const server = target.server ?? newServer();

  server.on("request", (incoming, outgoing) => {
    inflight++;
    outgoing.once("close", ended);
    if (!hasUpgrade && (incoming.headers.upgrade ?? "").toLowerCase() === "websocket") {
      // No upgrade export: refuse the handshake plainly (other Upgrade requests, such as
      // h2c, are served as the ordinary requests they also are).
      outgoing.writeHead(501, { "Content-Type": "text/plain; charset=utf-8", Connection: "close" });
      outgoing.end("this function does not accept WebSocket connections (no upgrade export)\n");
      return;
    }
    const rid = requestIdOf(incoming);
    if (rid === undefined) listener(incoming, outgoing);
    else requestIds.run(rid, listener, incoming, outgoing);
  });

  if (hasUpgrade) {
    server.on("upgrade", (req, socket, head) => {
      if (shuttingDown) return reply(socket, "503 Service Unavailable", "shutting down");
      upgraded.add(socket);
      socket.once("close", () => {
        upgraded.delete(socket);
        if (onQuiet) onQuiet();
      });
      const failed = (err) => {
        console.error("phloem: upgrade() failed:", err);
        reply(socket, "500 Internal Server Error", "Internal Server Error");
      };
      const call = () => {
        try {
          const result = handler.upgrade(req, socket, head);
          if (result && typeof result.then === "function") result.then(undefined, failed);
        } catch (err) {
          failed(err);
        }
      };
      const rid = requestIdOf(req);
      if (rid === undefined) call();
      else requestIds.run(rid, call);
    });
  }

  server.on("clientError", (err, socket) => {
    if (err.code === "ECONNRESET" || !socket.writable) return socket.destroy();
    reply(socket, "400 Bad Request", "Bad Request");
  });

  const drainBudgetS = seconds("PHLOEM_DRAIN_S", waitUntilBudgetS);

  shutdown = async (sig) => {
    shuttingDown = true;
    server.close(); // stop accepting; idle keep-alive connections are closed
    server.closeIdleConnections();
    const quiet = new Promise((resolveQuiet) => {
      onQuiet = () => {
        server.closeIdleConnections();
        if (inflight === 0 && upgraded.size === 0) resolveQuiet();
      };
      onQuiet();
    });
    const all = (async () => {
      await Promise.allSettled([quiet, ...handlerResults]);
      // Requests and handlers may have queued wait_until work (which may queue more).
      while (pending.size > 0) await waitUntilDrained();
    })();
    let timer;
    const bounded = new Promise((resolveBound) => {
      timer = setTimeout(() => {
        console.error(
          `phloem: still busy ${drainBudgetS} s after ${sig} ` +
            `(${inflight} requests, ${upgraded.size} upgraded sockets, ` +
            `${pending.size} wait_until); exiting`,
        );
        resolveBound();
      }, timerMs(drainBudgetS));
    });
    await Promise.race([all, bounded]);
    clearTimeout(timer);
    await runShutdownHooks();
    process.exit(0);
  };

  server.on("error", (err) => {
    console.error("phloem: server error:", err);
    process.exit(1);
  });
  if (target.server) status("R");
  else server.listen({ fd: target.fd }, () => status("R"));
}

// ---------------------------------------------------------------------------- standby

// A standby is started ahead of need, as root (in a sandbox, with only the setuid and
// setgid capabilities left), with Node booted and this host loaded, and the listening
// socket of the isolate it will become already inherited (--fd). It waits for its
// activation on stdin, two JSON lines: the first names the uid/gid, directory and bundle,
// and it drops to that uid and gid for good (and checks it cannot get root back) before it
// reads the second, the function's env, so not a byte the function supplied is handled
// with privileges; only then does it import the user's bundle. stdin stays open as a
// lifeline: its end means the platform is gone. What a cold start saves is Node's boot and
// this module's load (about half of it).
function stdinLines() {
  let buffered = "";
  const waiting = [];
  const lines = [];
  let ended = false;
  process.stdin.setEncoding("utf8");
  process.stdin.on("data", (chunk) => {
    buffered += chunk;
    let at;
    while ((at = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, at);
      buffered = buffered.slice(at + 1);
      if (waiting.length) waiting.shift().resolve(line);
      else lines.push(line);
    }
  });
  process.stdin.on("end", () => {
    ended = true;
    for (const w of waiting.splice(0)) w.reject(new Error("stdin closed"));
  });
  return () =>
    new Promise((resolveLine, rejectLine) => {
      if (lines.length) resolveLine(lines.shift());
      else if (ended) rejectLine(new Error("stdin closed"));
      else waiting.push({ resolve: resolveLine, reject: rejectLine });
    });
}

async function activateStandby(nextLine) {
  let spec;
  try {
    spec = JSON.parse(await nextLine());
  } catch (err) {
    console.error("phloem: standby: no valid activation on stdin:", err?.message ?? err);
    process.exit(2);
  }
  if (!Number.isInteger(spec.uid) || spec.uid === 0 || !Number.isInteger(spec.gid)) {
    console.error("phloem: standby: refusing an activation without a non-root uid");
    process.exit(2);
  }
  process.setgroups([]);
  process.setgid(spec.gid);
  process.setuid(spec.uid);
  let regained = false;
  try {
    process.setuid(0);
    regained = true;
  } catch {}
  if (
    regained ||
    process.getuid() !== spec.uid ||
    process.geteuid() !== spec.uid ||
    process.getgid() !== spec.gid ||
    process.getegid() !== spec.gid ||
    process.getgroups().some((g) => g !== spec.gid)
  ) {
    console.error("phloem: standby: dropping privileges did not hold; exiting");
    process.exit(70);
  }
  let env;
  try {
    ({ env } = JSON.parse(await nextLine()));
  } catch (err) {
    console.error("phloem: standby: no env after the activation:", err?.message ?? err);
    process.exit(2);
  }
  process.chdir(spec.cwd);
  for (const key of Object.keys(process.env)) delete process.env[key];
  Object.assign(process.env, env);
  process.stdin.on("end", () => process.exit(1));
  return { bundle: spec.bundle };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  let target = { fd: args.fd };
  if (args.standby) {
    statusFd = Number.isInteger(args.readyFd) ? args.readyFd : null;
    dieWithParent();
    const nextLine = stdinLines();
    status("S"); // booted and loaded: ready to be activated
    const activated = await activateStandby(nextLine);
    args.bundle = activated.bundle;
  }
  if (!args.check) {
    statusFd = Number.isInteger(args.readyFd) ? args.readyFd : null;
    dieWithParent();
    installSignalHandling();
    tagConsole();
  }
  globalThis.__phloem_waitUntil = waitUntil;
  globalThis.__phloem_onShutdown = onShutdown;
  let loaded;
  try {
    loaded = await loadHandler(args.bundle);
  } catch (err) {
    console.error(`entry: importing ${args.bundle} raised:`);
    console.error(err);
    process.exit(EXIT_ENTRY);
  }
  if (loaded.error) {
    console.error(loaded.error);
    process.exit(EXIT_ENTRY);
  }
  if (args.check) process.exit(0); // the module's timers and pools must not keep us
  if (signalled) return; // a signal arrived while importing; onSignal exits
  serve(loaded.handler, target);
}

main();

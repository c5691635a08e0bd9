// Evaluate a project's bundled neon.ts for one branch and print what phloem needs as JSON.
//
//   node evalconfig.mjs /tmp/neon.config.mjs '{"name":"main","id":"br-...","exists":true,...}'
//
// Output: {"functions": {slug: {name, source, env, limits, runtime, bundler, ...}},
//          "tuning": {...} | null, "unsupported": [[key, what], ...],
//          "refused": [[key, why], ...], "triggers": {name: {function, cron, functionPath?, enabled?}} | null,
//          "services": {"auth"?: {}, "ai"?: {}, "storage"?: {"buckets": {...}}}}
// "unsupported" are services phloem lacks; "refused" are other keys phloem does not honour,
// each with the reason, so that no key is dropped without a word.
// Exit 2 with a message on stderr when the module cannot be evaluated or is not a config.
// The checks that name fields and rules for the user live in phloem/project/neon.py; here we only
// turn JavaScript values into JSON without losing what JSON would drop (undefined env
// values, closures).

import { pathToFileURL } from "node:url";

function fail(message) {
  process.stderr.write(`${message}\n`);
  process.exit(2);
}

function enabled(toggle) {
  if (toggle === undefined || toggle === null || toggle === false) return false;
  if (typeof toggle === "object") return toggle.enabled !== false;
  return Boolean(toggle);
}

function nonEmpty(record) {
  return record !== undefined && record !== null && typeof record === "object" && Object.keys(record).length > 0;
}

// env values must survive JSON: an `undefined` (an unset process.env.X) would vanish.
function plainEnv(env, where) {
  if (env === undefined) return {};
  if (env === null || typeof env !== "object" || Array.isArray(env)) fail(`${where}: must be an object of strings`);
  const out = {};
  for (const [key, value] of Object.entries(env)) {
    if (typeof value !== "string") {
      fail(`${where}.${key}: must be a string (got ${value === undefined ? "undefined: is the variable set when the config is evaluated?" : typeof value})`);
    }
    out[key] = value;
  }
  return out;
}

function describeFunctions(functions, where) {
  const out = {};
  if (functions === undefined) return out;
  if (functions === null || typeof functions !== "object") fail(`${where}: must be an object keyed by slug`);
  for (const [slug, def] of Object.entries(functions)) {
    if (def === null || typeof def !== "object") fail(`${where}.${slug}: must be an object`);
    const { env, ...rest } = def;
    for (const [key, value] of Object.entries(rest)) {
      if (key === "bundler" && typeof value === "function") {
        fail(`${where}.${slug}.bundler: a bundler function is not supported: phloem builds on the ` +
             `platform, where it cannot run a build step of the config; use "esbuild" (phloem ` +
             `bundles the source) or "none" (deploy the prebuilt entry as it is)`);
      }
      if (typeof value === "function") fail(`${where}.${slug}.${key}: functions are not supported here`);
    }
    out[slug] = { ...rest, env: plainEnv(env, `${where}.${slug}.env`) };
  }
  return out;
}

// @neon/config 1.8 declares customDomains on a function (and in the branch closure's
// function tuning), not at the top level.
const CUSTOM_DOMAINS = "customDomains belongs on a function: functions.<slug>.customDomains";
const refused = [];

const [bundlePath, targetJson] = process.argv.slice(2);
if (!bundlePath || !targetJson) fail("usage: evalconfig.mjs BUNDLE TARGET_JSON");
const target = Object.freeze(JSON.parse(targetJson));

let mod;
try {
  mod = await import(pathToFileURL(bundlePath).href);
} catch (err) {
  fail(`evaluating it raised: ${err?.stack ?? err}`);
}
const config = mod.default ?? mod.config;
if (config === null || typeof config !== "object") {
  fail("must export its configuration: export default defineConfig({ functions: { ... } })");
}

const unsupported = [];
if (enabled(config.dataApi)) unsupported.push(["dataApi", "the Data API"]);
// Branch services phloem provides: service name -> its config (plain JSON).
const services = {};
if (enabled(config.auth)) services.auth = {};
if (enabled(config.aiGateway) || enabled(config.preview?.aiGateway)) services.ai = {};
const buckets = nonEmpty(config.preview?.buckets) ? config.preview.buckets : config.buckets;
if (nonEmpty(buckets)) services.storage = { buckets: JSON.parse(JSON.stringify(buckets)) };
if (config.experimental?.hooks !== undefined) {
  refused.push(["experimental.hooks", "lifecycle hooks are not supported: phloem has no hook points to run them at"]);
}
if (config.customDomains !== undefined) refused.push(["customDomains", CUSTOM_DOMAINS]);

// Every other key is refused by name rather than dropped.
const KNOWN = {
  "": ["auth", "dataApi", "aiGateway", "buckets", "preview", "functions", "triggers", "branch",
       "experimental", "customDomains"],
  "preview.": ["functions", "buckets", "aiGateway"],
  "experimental.": ["hooks"],
};
for (const [prefix, known] of Object.entries(KNOWN)) {
  const record = prefix === "" ? config : config[prefix.slice(0, -1)];
  if (record === undefined || record === null || typeof record !== "object") continue;
  for (const key of Object.keys(record)) {
    if (!known.includes(key)) refused.push([`${prefix}${key}`, `unknown key (known: ${known.join(", ")})`]);
  }
}

// Schedule triggers (a cron) and storage_object_created triggers (a bucket) are phloem's;
// a trigger with neither is refused by name.
let triggers = null;
if (config.triggers !== undefined && config.triggers !== null) {
  if (typeof config.triggers !== "object" || Array.isArray(config.triggers)) fail("triggers: must be a record of name -> { function, cron, functionPath?, enabled? }");
  triggers = {};
  for (const [name, spec] of Object.entries(config.triggers)) {
    if (spec !== null && typeof spec === "object" && spec.cron === undefined
        && spec.type !== "storage_object_created") {
      unsupported.push([`triggers.${name}`, "object storage triggers"]);
    } else {
      triggers[name] = spec;
    }
  }
}

const both = config.functions !== undefined && config.preview?.functions !== undefined;
if (both) fail("functions: declare functions at the top level or under preview, not both");
const functions = config.functions !== undefined
  ? describeFunctions(config.functions, "functions")
  : describeFunctions(config.preview?.functions, "preview.functions");

let tuning = null;
if (config.branch !== undefined) {
  if (typeof config.branch !== "function") fail("branch: must be a function: branch: (branch) => ({ ... })");
  try {
    tuning = (await config.branch(target)) ?? {};
  } catch (err) {
    fail(`branch: the closure raised for branch "${target.name}": ${err?.message ?? err}`);
  }
  if (typeof tuning !== "object" || Array.isArray(tuning)) fail("branch: the closure must return an object");
  const fnTuning = tuning.functions ?? tuning.preview?.functions;
  tuning = { ...tuning, functions: describeFunctions(fnTuning, "branch.functions") };
  delete tuning.preview;
  for (const [key, value] of Object.entries(tuning)) {
    if (typeof value === "function") fail(`branch: ${key}: functions are not supported here`);
  }
}

process.stdout.write(JSON.stringify({ functions, tuning, unsupported, refused, triggers, services }));

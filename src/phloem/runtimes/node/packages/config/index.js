// defineConfig for a project's neon.ts: checks the shape and freezes it. phloem reads the
// result with `phloem config plan|apply` (which also refuses services it does not have);
// functions read it with parseEnv(config).

const SLUG = /^[a-z0-9]{1,20}$/;
const FUNCTION_KEYS = new Set(["name", "source", "env", "limits", "runtime", "externalPackages", "bundler", "dev", "customDomains"]);

function fail(path, rule) {
  throw new TypeError(`defineConfig: ${path}: ${rule}`);
}

function checkFunctions(functions, where) {
  if (functions === undefined) return;
  if (functions === null || typeof functions !== "object" || Array.isArray(functions)) {
    fail(where, "must be an object keyed by function slug");
  }
  for (const [slug, def] of Object.entries(functions)) {
    const at = `${where}.${slug}`;
    if (!SLUG.test(slug)) fail(at, "slug must match ^[a-z0-9]{1,20}$");
    if (def === null || typeof def !== "object") fail(at, "must be an object");
    for (const key of Object.keys(def)) {
      if (!FUNCTION_KEYS.has(key)) fail(`${at}.${key}`, "unknown key");
    }
    if (typeof def.name !== "string" || def.name === "") fail(`${at}.name`, "must be a non-empty string");
    if (typeof def.source !== "string" || def.source === "") fail(`${at}.source`, "must be a non-empty string");
    if (def.env !== undefined) {
      if (def.env === null || typeof def.env !== "object") fail(`${at}.env`, "must be an object of strings");
      for (const [key, value] of Object.entries(def.env)) {
        if (typeof value !== "string") fail(`${at}.env.${key}`, "must be a string");
      }
    }
  }
}

/**
 * Check and freeze a project's configuration:
 *
 *   export default defineConfig({
 *     functions: { todos: { name: "todo api", source: "src/index.ts" } },
 *     branch: (branch) => ({ functions: { todos: { env: { MODE: branch.name } } } }),
 *   });
 */
export function defineConfig(input) {
  if (input === null || typeof input !== "object" || Array.isArray(input)) {
    fail("config", "defineConfig expects an object: defineConfig({ functions: { ... } })");
  }
  checkFunctions(input.functions, "functions");
  if (input.preview !== undefined) checkFunctions(input.preview.functions, "preview.functions");
  if (input.functions !== undefined && input.preview?.functions !== undefined) {
    fail("functions", "declare functions either at the top level or under preview, not both");
  }
  if (input.branch !== undefined && typeof input.branch !== "function") {
    fail("branch", "must be a function: branch: (branch) => ({ ... })");
  }
  return Object.freeze({ ...input });
}

/** The functions a config declares (top level, or the older preview.functions). */
export function configuredFunctions(config) {
  return config.functions ?? config.preview?.functions ?? {};
}

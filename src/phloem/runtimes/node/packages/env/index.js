// parseEnv: the variables phloem injects into a function (and `phloem env run` / `env pull`
// give local commands), validated, in the same shape as Neon's parseEnv.

const KEYS = {
  DATABASE_URL: ["postgres", "databaseUrl"],
  DATABASE_URL_UNPOOLED: ["postgres", "databaseUrlUnpooled"],
  NEON_BRANCH: ["branch", "name"],
  PHLOEM_BRANCH: ["branch", "name"],
};

export class EnvError extends Error {
  constructor(issues) {
    super(
      [
        "parseEnv: required variables are missing from process.env:",
        ...issues.map((issue) => `  - ${issue}`),
        "phloem injects them into deployed functions; locally run your command with",
        "`phloem env run -- <command>` or write them to .env with `phloem env pull`.",
      ].join("\n"),
    );
    this.name = "EnvError";
    this.code = "PLATFORM_ENV_NOT_INJECTED";
    this.issues = issues;
  }
}

function read(source, key, issues) {
  const value = source[key];
  if (value === undefined) issues.push(`${key} is missing`);
  else if (value === "") issues.push(`${key} must not be empty`);
  return value;
}

/**
 * The injected variables, validated:
 *
 *   const env = parseEnv(config);          // { postgres: { databaseUrl, databaseUrlUnpooled }, branch: { name } }
 *   const env = parseEnv(config, "todos"); // ... plus function: { <keys of functions.todos.env> }
 *   const env = parseEnv(config, ["DATABASE_URL"]); // { postgres: { databaseUrl } }
 *
 * Throws EnvError listing every missing variable.
 */
export function parseEnv(config, scopeOrKeys, source = process.env) {
  const issues = [];
  const result = {};
  if (Array.isArray(scopeOrKeys)) {
    for (const key of scopeOrKeys) {
      if (!Object.hasOwn(KEYS, key)) {
        issues.push(`${key} is not one of ${Object.keys(KEYS).join(", ")}`);
        continue;
      }
      const value = read(source, key, issues);
      if (!value) continue;
      const [namespace, property] = KEYS[key];
      (result[namespace] ??= {})[property] = value;
    }
  } else {
    const databaseUrl = read(source, "DATABASE_URL", issues);
    const databaseUrlUnpooled = read(source, "DATABASE_URL_UNPOOLED", issues);
    if (databaseUrl && databaseUrlUnpooled) result.postgres = { databaseUrl, databaseUrlUnpooled };
    const branch = source.NEON_BRANCH || source.PHLOEM_BRANCH;
    if (branch) result.branch = { name: branch };
    if (typeof scopeOrKeys === "string") {
      const functions = config?.functions ?? config?.preview?.functions ?? {};
      const fn = functions[scopeOrKeys];
      if (!fn) throw new EnvError([`no function "${scopeOrKeys}" is declared in the config`]);
      const own = {};
      for (const key of Object.keys(fn.env ?? {})) {
        const value = source[key];
        if (value === undefined) issues.push(`${key} is missing (function "${scopeOrKeys}")`);
        else own[key] = value;
      }
      result.function = own;
    }
  }
  if (issues.length > 0) throw new EnvError(issues);
  return result;
}

/** The variables of a parsed env as KEY=value pairs (for a child process's env). */
export function toEntries(env) {
  const out = {};
  if (env.postgres?.databaseUrl) out.DATABASE_URL = env.postgres.databaseUrl;
  if (env.postgres?.databaseUrlUnpooled) out.DATABASE_URL_UNPOOLED = env.postgres.databaseUrlUnpooled;
  if (env.branch?.name) out.NEON_BRANCH = env.branch.name;
  Object.assign(out, env.function ?? {});
  return out;
}

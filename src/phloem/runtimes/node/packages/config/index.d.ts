/** One function of a project. */
export interface FunctionDef {
  /** Display label. */
  name: string;
  /** Entry file relative to the config file (e.g. "src/index.ts"). */
  source: string;
  /** The function's own variables, resolved when the config is applied. */
  env?: Record<string, string>;
  /** phloem limits, e.g. { max_isolates: 2, idle_s: 60 } (see `phloem functions deploy --help`). */
  limits?: Record<string, number>;
  runtime?: "nodejs24";
}

/** What the branch closure is told about the branch it decides for. */
export interface BranchTarget {
  readonly name: string;
  readonly id?: string;
  readonly exists: boolean;
  readonly isDefault?: boolean;
  readonly parentId?: string;
}

export interface FunctionTuning {
  env?: Record<string, string>;
  limits?: Record<string, number>;
  runtime?: "nodejs24";
  name?: string;
}

/** Per-branch tuning returned by the branch closure. */
export interface BranchTuning {
  functions?: Record<string, FunctionTuning>;
  preview?: { functions?: Record<string, FunctionTuning> };
  parent?: string;
  protected?: boolean;
  ttl?: string | number;
}

/** A schedule trigger: POST to `function` at `functionPath` (default "/") when `cron`
 * (five fields, UTC, at most once a minute) matches. */
export interface ScheduleTrigger {
  function: string;
  cron: string;
  functionPath?: string;
  enabled?: boolean;
}

export interface Config {
  functions?: Record<string, FunctionDef>;
  preview?: { functions?: Record<string, FunctionDef> };
  branch?: (branch: BranchTarget) => BranchTuning | undefined;
  /** Services phloem does not provide; a config enabling them is refused when applied. */
  auth?: boolean | { enabled?: boolean };
  dataApi?: boolean | Record<string, unknown>;
  aiGateway?: boolean | { enabled?: boolean };
  buckets?: Record<string, unknown>;
  /** Schedule triggers; object-created triggers need object storage (refused). */
  triggers?: Record<string, ScheduleTrigger>;
}

export declare function defineConfig<const C extends Config>(input: C): Readonly<C>;
export declare function configuredFunctions(config: Config): Record<string, FunctionDef>;

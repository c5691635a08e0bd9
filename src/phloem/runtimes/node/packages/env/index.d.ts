export interface PostgresEnv {
  /** Pooled, through PgBouncer in transaction mode. */
  databaseUrl: string;
  /** Direct: migrations, LISTEN/NOTIFY, long transactions. */
  databaseUrlUnpooled: string;
}

export interface ParsedEnv {
  postgres: PostgresEnv;
  branch?: { name: string };
  function?: Record<string, string>;
}

export type SelectableKey = "DATABASE_URL" | "DATABASE_URL_UNPOOLED" | "NEON_BRANCH" | "PHLOEM_BRANCH";

export declare class EnvError extends Error {
  readonly code: "PLATFORM_ENV_NOT_INJECTED";
  readonly issues: string[];
}

interface ConfigLike {
  functions?: Record<string, { env?: Record<string, string> }>;
  preview?: { functions?: Record<string, { env?: Record<string, string> }> };
}

export declare function parseEnv(config?: ConfigLike, scope?: string): ParsedEnv;
export declare function parseEnv(
  config: ConfigLike | undefined,
  keys: readonly SelectableKey[],
): Partial<ParsedEnv> & { postgres?: Partial<PostgresEnv> };

export declare function toEntries(env: Partial<ParsedEnv>): Record<string, string>;

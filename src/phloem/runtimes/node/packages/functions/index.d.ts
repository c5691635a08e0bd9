/** Keep the isolate alive until `promise` settles (within the function's wait_until budget). */
export declare function waitUntil(promise: Promise<unknown> | unknown): void;

/** Something that can be closed: pg.Pool (`end`), mysql2, ioredis, ... (`end` or `close`). */
export interface ClosablePool {
  end?: () => unknown;
  close?: () => unknown;
}

/** Close `pool` after the isolate has drained before eviction. */
export declare function attachDatabasePool(pool: ClosablePool): void;

export interface ExecutionContext {
  waitUntil(promise: Promise<unknown> | unknown): void;
}

/** The execution context (`ctx.waitUntil`) outside a request handler. */
export declare function getContext(): ExecutionContext;

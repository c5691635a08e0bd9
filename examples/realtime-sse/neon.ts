import { defineConfig } from "@neon/config/v1";

// One function on every branch. phloem injects DATABASE_URL, DATABASE_URL_UNPOOLED and
// NEON_BRANCH; the key below is the function's own env.
export default defineConfig({
  functions: {
    events: {
      name: "realtime events (SSE)",
      source: "src/index.ts",
      env: {
        // Seconds between ": ping" comments on idle streams.
        SSE_PING_INTERVAL_S: process.env.SSE_PING_INTERVAL_S ?? "25",
      },
    },
  },
});

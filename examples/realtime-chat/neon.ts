import { defineConfig } from "@neon/config/v1";

// One function on every branch. phloem injects DATABASE_URL, DATABASE_URL_UNPOOLED and
// NEON_BRANCH; the keys below are the function's own env.
export default defineConfig({
  functions: {
    chat: {
      name: "realtime chat",
      source: "src/index.ts",
      env: {
        // HS256 secret for the demo tokens minted by POST /token and checked on upgrade.
        CHAT_JWT_SECRET: process.env.CHAT_JWT_SECRET ?? "",
        // Seconds between WebSocket pings (a silent client is dropped after two).
        CHAT_PING_INTERVAL_S: process.env.CHAT_PING_INTERVAL_S ?? "25",
      },
    },
  },
});

import { defineConfig } from "@neon/config/v1";

export default defineConfig({
  functions: {
    agent: {
      name: "streaming agent (CORS)",
      source: "src/index.ts",
      env: {
        // HS256 secret of the Bearer tokens your auth service issues to browsers.
        AGENT_JWT_SECRET: process.env.AGENT_JWT_SECRET ?? "",
        // Origins whose pages may call the function (comma-separated, exact match).
        AGENT_ALLOWED_ORIGINS: process.env.AGENT_ALLOWED_ORIGINS ?? "http://localhost:5173",
        // How long a run streams by default, and the pace of its chunks.
        AGENT_DURATION_S: process.env.AGENT_DURATION_S ?? "300",
        AGENT_TICK_MS: process.env.AGENT_TICK_MS ?? "1000",
      },
    },
  },
});

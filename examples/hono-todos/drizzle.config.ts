import { defineConfig } from "drizzle-kit";

// Schema changes go over the direct connection (not PgBouncer):
//   phloem env run -- npx drizzle-kit push
export default defineConfig({
  dialect: "postgresql",
  schema: "./src/db/schema.ts",
  dbCredentials: { url: process.env.DATABASE_URL_UNPOOLED ?? "" },
});

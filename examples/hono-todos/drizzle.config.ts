import { defineConfig } from "drizzle-kit";

// Schema changes go over the direct connection (not PgBouncer):
//   phloem env run -- npx drizzle-kit push
export default defineConfig({
  dialect: "postgresql",
  schema: "./src/db/schema.ts",
  dbCredentials: { url: process.env.DATABASE_URL_UNPOOLED ?? "" },
  // Only this app's tables: a branch may hold other apps' tables, which push must not
  // offer to drop or rename.
  tablesFilter: ["todos", "todo_events"],
});

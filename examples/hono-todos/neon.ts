import { defineConfig } from "@neon/config/v1";

// One function, `todos`, served from src/index.ts on every branch of the database.
export default defineConfig({
  functions: {
    todos: {
      name: "todo api",
      source: "src/index.ts",
    },
  },
  // Preview branches say which branch they are in every response header.
  branch: (branch) => ({
    functions: { todos: { env: { TODOS_BANNER: branch.isDefault ? "" : `preview ${branch.name}` } } },
  }),
});

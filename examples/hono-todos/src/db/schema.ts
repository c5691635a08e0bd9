import { boolean, integer, pgTable, serial, text, timestamp } from "drizzle-orm/pg-core";

export const todos = pgTable("todos", {
  id: serial("id").primaryKey(),
  text: text("text").notNull(),
  done: boolean("done").notNull().default(false),
  createdAt: timestamp("created_at", { withTimezone: true }).notNull().defaultNow(),
});

export const todoEvents = pgTable("todo_events", {
  id: serial("id").primaryKey(),
  todoId: integer("todo_id").notNull(),
  kind: text("kind").notNull(),
  at: timestamp("at", { withTimezone: true }).notNull().defaultNow(),
});

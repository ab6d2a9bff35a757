/**
 * The Docker image copies its files one by one (Dockerfile COPY, and the
 * .dockerignore whitelist that makes up the build context). A module the
 * programs import but the image leaves out fails only at run time, in a
 * container; this checks it without Docker: every local file the image's
 * entry points reach, statically or by import(), is in both lists.
 */
import { expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { dirname, join, normalize, relative } from "node:path";
import { ROOT } from "../harness.ts";

const ENTRY_POINTS = ["registry.ts", "client.ts", "scripts/healthcheck.ts"];

/** Every local file reachable from `entries` through import statements, import() and `with { type: "text" }` imports. */
function reachable(entries: string[]): Set<string> {
  const seen = new Set<string>();
  const visit = (file: string) => {
    if (seen.has(file)) return;
    seen.add(file);
    if (!file.endsWith(".ts")) return;
    const text = readFileSync(join(ROOT, file), "utf8");
    for (const m of text.matchAll(/(?:from|import)\s*\(?\s*"(\.{1,2}\/[^"]+)"/g)) {
      visit(relative(ROOT, normalize(join(ROOT, dirname(file), m[1]!))));
    }
  };
  for (const e of entries) visit(e);
  return seen;
}

test("every file the image's programs import is copied into the image and allowed into its build context", () => {
  const files = reachable(ENTRY_POINTS);
  expect(files.size).toBeGreaterThan(10);
  const dockerfile = readFileSync(join(ROOT, "Dockerfile"), "utf8");
  const copied = [...dockerfile.matchAll(/^COPY (?!--from)(.+) \S+$/gm)].flatMap((m) => m[1]!.split(/\s+/));
  const allowed = readFileSync(join(ROOT, ".dockerignore"), "utf8")
    .split("\n")
    .filter((l) => l.startsWith("!"))
    .map((l) => l.slice(1));
  const glob = (pattern: string) => new RegExp(`^${pattern.replace(/\./g, "\\.").replace(/\*/g, "[^/]*")}$`);
  const missing = (list: string[]) => [...files].filter((f) => !list.some((p) => glob(p).test(f)));
  expect(missing(copied)).toEqual([]);
  expect(missing(allowed)).toEqual([]);
});

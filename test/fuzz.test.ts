/**
 * The CI-sized run of scripts/fuzz.ts: a few thousand seeded random and
 * mutated frames against a registry process and a node process, with real
 * nodes registering meanwhile. `bun run fuzz -- --iterations N` runs a long
 * one. The seed is printed; FUZZ_SEED=<seed> replays a failing run.
 */
import { expect, test } from "bun:test";
import { runFuzz } from "../scripts/fuzz.ts";

test("fuzz: neither server crashes or grows without bound, and real nodes all register and meet", async () => {
  const seed = process.env.FUZZ_SEED ? Number(process.env.FUZZ_SEED) : undefined;
  const lines: string[] = [];
  const r = await runFuzz({ iterations: 4000, seed, realNodes: 4, log: (l) => lines.push(l) });
  console.log(lines.filter((l) => !l.endsWith(" frames")).join("\n"));
  expect(r.problems).toEqual([]);
  expect(r.ok).toBe(true);
  expect(r.frames).toBe(4000);
  expect(r.realNodes).toEqual({ started: 4, registered: 4 });
  // The frames reached the code under test: each server refused some for each main reason.
  for (const code of ["bad-json", "bad-message", "line-too-long"]) {
    expect(r.replies.registry[code] ?? 0).toBeGreaterThan(0);
    expect(r.replies.listener[code] ?? 0).toBeGreaterThan(0);
  }
  expect(r.replies.registry["unexpected-message"] ?? 0).toBeGreaterThan(0);
  expect(r.fuzzRegistrations).toBeGreaterThan(0);
  expect(r.rssMiB.registry?.peak ?? 0).toBeGreaterThan(0);
}, 60_000);

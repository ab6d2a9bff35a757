/**
 * The CI-sized run of scripts/fuzz.ts, run as the script it is: a few
 * thousand seeded random and mutated frames against a registry process and a
 * node process, with real nodes registering and issue 11's attackers running
 * meanwhile. `bun run fuzz --
 * --iterations N` runs a long one. The seed is printed; FUZZ_SEED=<seed>
 * replays a failing run.
 */
import { afterEach, expect, test } from "bun:test";
import { ATTACK_KINDS, spawnScript, withDeadline, type Proc } from "../harness.ts";

let run: Proc | undefined;
// SIGTERM first: the script then kills the registry and node it started.
afterEach(() => run?.stop());

test("fuzz: neither server crashes or grows without bound, real nodes all register and meet, and every attacker running meanwhile meets its limit", async () => {
  const seed = process.env.FUZZ_SEED ? ["--seed", process.env.FUZZ_SEED] : [];
  run = spawnScript("scripts/fuzz.ts", ["--iterations", "4000", "--nodes", "4", ...seed, "--json"], { label: "fuzz" });
  const code = await withDeadline(run.exited(), 55_000, "the fuzz run to end");
  // Its narrative is not JSON, so Proc files it under stderr; the progress lines are noise here.
  console.log(run.stderr.filter((l) => !l.endsWith(" frames")).map((l) => l.replace(/^stdout: /, "")).join("\n"));
  const r = (await run.log.waitFor("fuzz-result", 0, "its result line")) as any; // checked field by field below
  expect(r.problems).toEqual([]);
  expect(r.ok).toBe(true);
  expect(code).toBe(0);
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
  // Issue 11's attackers ran alongside, each answered by the limit meant for it (the script checks each; these are the telling ones).
  expect(Object.keys(r.attacks).sort()).toEqual([...ATTACK_KINDS].sort());
  expect(r.attacks["token-guess"].codes["rate-limited"]).toBeGreaterThan(0);
  expect(r.attacks["ping-flood"].codes["rate-limited"]).toBeGreaterThan(0);
  expect(r.attacks["peers-flood"].responses).toBeGreaterThan(0);
  expect(r.unsentBytes.peak).toBeLessThanOrEqual(r.unsentBytes.budget);
  expect(r.unsentBytes.budget).toBe(16 * 1024 * 1024);
}, 60_000);

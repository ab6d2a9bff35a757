/**
 * Fitting connection caps into the file-descriptor limit (limits.ts): the
 * pure computation, and reading the limit the way the registry does.
 */
import { describe, expect, test } from "bun:test";
import { fdMargin, fitCapsToFdLimit, parseFdLimit, readFdUsage } from "../limits.ts";

describe("fitCapsToFdLimit", () => {
  test("caps that fit are kept as asked", () => {
    const fit = fitCapsToFdLimit(1_048_576, 20, [
      { cap: 60_000, fdsEach: 1 },
      { cap: 256, fdsEach: 3 },
    ]);
    expect(fit).toEqual({ caps: [60_000, 256], lowered: false, reserved: 20 + fdMargin(1_048_576) });
  });

  test("caps that do not fit are scaled by one factor, and the result fits", () => {
    const demands = [
      { cap: 60_000, fdsEach: 1 },
      { cap: 256, fdsEach: 3 },
    ];
    const fit = fitCapsToFdLimit(20_000, 30, demands, 64);
    expect(fit.lowered).toBe(true);
    expect(fit.reserved).toBe(30 + 64 + 1_250);
    const [registry, http] = fit.caps as [number, number];
    const room = 20_000 - fit.reserved;
    // One factor for both, rounded down: the total stays within the room and wastes less than one connection each.
    expect(registry + 3 * http).toBeLessThanOrEqual(room);
    expect(registry + 1 + 3 * (http + 1)).toBeGreaterThan(room);
    expect(registry / 60_000).toBeCloseTo(http / 256, 2);
  });

  test("the boundary: exactly the room is kept, one descriptor less lowers", () => {
    const limit = 4_096;
    const reserved = 10 + fdMargin(limit);
    const room = limit - reserved;
    expect(fitCapsToFdLimit(limit, 10, [{ cap: room, fdsEach: 1 }]).lowered).toBe(false);
    const over = fitCapsToFdLimit(limit, 10, [{ cap: room + 1, fdsEach: 1 }]);
    expect(over).toEqual({ caps: [room], lowered: true, reserved });
  });

  test("no cap (0) is turned into the share that fits", () => {
    const fit = fitCapsToFdLimit(10_000, 0, [{ cap: 0, fdsEach: 1 }]);
    expect(fit.lowered).toBe(true);
    expect(fit.caps).toEqual([10_000 - fdMargin(10_000)]);
  });

  test("an unlimited limit keeps every cap, even none", () => {
    expect(fitCapsToFdLimit(Infinity, 50, [{ cap: 0, fdsEach: 1 }])).toEqual({ caps: [0], lowered: false, reserved: 50 });
  });

  test("a limit too small for anything still leaves one connection of each kind", () => {
    const fit = fitCapsToFdLimit(100, 90, [
      { cap: 1_000, fdsEach: 1 },
      { cap: 10, fdsEach: 3 },
    ]);
    expect(fit).toMatchObject({ caps: [1, 1], lowered: true });
  });

  test("the margin is a sixteenth of the limit, at least 128", () => {
    expect(fdMargin(1_024)).toBe(128);
    expect(fdMargin(20_000)).toBe(1_250);
    expect(fdMargin(1_048_576)).toBe(65_536);
  });
});

describe("reading the limit", () => {
  const limits = (open: string) =>
    [
      "Limit                     Soft Limit           Hard Limit           Units     ",
      "Max cpu time              unlimited            unlimited            seconds   ",
      `Max open files            ${open}                files     `,
      "Max locked memory         8388608              8388608              bytes     ",
    ].join("\n");

  test("the soft limit of /proc/PID/limits", () => {
    expect(parseFdLimit(limits("20000                1048576"))).toBe(20_000);
    expect(parseFdLimit(limits("unlimited            unlimited"))).toBe(Infinity);
    expect(parseFdLimit("Limit Soft Hard\nMax processes 10 10 processes\n")).toBeUndefined();
    expect(parseFdLimit(limits("lots                 lots"))).toBeUndefined();
  });

  test("this process: the limit ulimit -n reports, and the descriptors open now", async () => {
    const usage = readFdUsage();
    if (process.platform !== "linux") return expect(usage).toBeUndefined();
    const shell = Bun.spawnSync(["sh", "-c", "ulimit -n"]);
    // A child inherits this process's limit (Bun raised its soft limit to the hard one at start).
    expect(usage?.limit).toBe(Number(shell.stdout.toString().trim()));
    expect(usage!.open).toBeGreaterThan(2);
    expect(usage!.open).toBeLessThan(usage!.limit);
  });
});

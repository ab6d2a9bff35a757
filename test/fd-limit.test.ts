/**
 * Fitting connection caps into the file-descriptor limit (limits.ts): the
 * pure computation, reading the limit the way the registry does, and the
 * registry started under a small limit (prlimit), whose lowered caps hold.
 */
import { afterEach, describe, expect, test } from "bun:test";
import { fdMargin, fitCapsToFdLimit, parseFdLimit, readFdUsage } from "../limits.ts";
import { RawClient, disposeAll, spawnScript, type RegistryLine } from "../harness.ts";

let fixtures: AsyncDisposable[] = [];
afterEach(async () => {
  await disposeAll(fixtures.reverse());
  fixtures = [];
});

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

describe("the registry under a small limit", () => {
  test("caps that need more descriptors than the process has are lowered, with one warning, and hold", async () => {
    const registry = spawnScript<RegistryLine>("registry.ts", ["127.0.0.1", "0", "--json", "--http", "0", "--http-host", "127.0.0.1"], { label: "registry", prefix: [
      "prlimit",
      "--nofile=1024:1024",
      "--",
    ] });
    fixtures.push(registry);
    const warned = await registry.log.waitFor("fd-limit", 15_000, "the fd-limit warning");
    const { url } = await registry.log.waitFor("http-listening", 15_000);
    expect(warned.limit).toBe(1024);
    const lowered = warned.lowered;
    expect(lowered.map((l) => [l.flag, l.from])).toEqual([
      ["max-conns", 60_000],
      ["http-max-conns", 256],
    ]);
    const httpCap = lowered[1]!.to;
    expect(httpCap).toBeGreaterThan(0);
    expect(lowered[0]!.to + 3 * httpCap).toBeLessThanOrEqual(1024 - warned.reserved);
    expect(registry.log.named("fd-limit")).toHaveLength(1);

    // The lowered HTTP cap is the one enforced: that many idle connections, then a 503.
    const port = Number(new URL(url).port);
    const connect = async () => {
      const c = await RawClient.connect(port);
      fixtures.push(c);
      return c;
    };
    const held = await Promise.all(Array.from({ length: httpCap }, connect));
    expect(held.every((c) => !c.closed)).toBe(true);
    const over = await connect();
    await over.waitFor((m) => String(m.line).startsWith("HTTP/1.1 503 "), 5_000, "a 503 past the lowered cap");
  }, 30_000);
});

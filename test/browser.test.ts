/**
 * The live page in a real headless browser: Debian's Chromium driven by
 * playwright-core (no browser download). A registry process with --http and
 * node processes join; the page must list them and reach "complete", then show
 * a node leaving. Screenshots land in artifacts/browser/ on every run;
 * UPDATE_SCREENSHOT=1 also refreshes docs/status.png for the README.
 */
import { afterEach, expect, test } from "bun:test";
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium, type BrowserContext, type Page } from "playwright-core";
import { ROOT, disposeAll, spawnNode, spawnRegistry, type Proc } from "../harness.ts";

const CHROMIUM = "/usr/bin/chromium";
const ARGS = [
  "--no-sandbox",
  "--headless",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
];
const ARTIFACTS = join(ROOT, "artifacts", "browser");
const have = existsSync(CHROMIUM);
if (!have) console.warn(`browser test skipped: ${CHROMIUM} is missing (Debian: apt-get install chromium)`);

let procs: Proc[] = [];
let context: BrowserContext | undefined;
let profile: string | undefined;

afterEach(async () => {
  await context?.close().catch(() => {});
  context = undefined;
  if (profile) rmSync(profile, { recursive: true, force: true });
  profile = undefined;
  await disposeAll(procs);
  procs = [];
});

test.skipIf(!have)(
  "the page shows nodes joining, the mesh completing and a node leaving",
  async () => {
    const registry = await spawnRegistry(["--http", "0"]);
    procs.push(registry);
    const url = String((await registry.log.waitFor("http-listening", 10_000)).url);

    profile = mkdtempSync(join(tmpdir(), "status-page-chromium-"));
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: ARGS,
      viewport: { width: 1280, height: 820 },
      timeout: 30_000,
    });
    const page = context.pages()[0] ?? (await context.newPage());
    const problems: string[] = [];
    page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
    page.on("console", (m) => {
      if (m.type() === "error") problems.push(`console error: ${m.text()}`);
    });

    await page.goto(url);
    await page.waitForSelector('#conn[data-state="live"]', { timeout: 10_000 });
    await page.waitForSelector('#indicator[data-state="empty"]', { timeout: 10_000 });

    // Nodes join after the page is open: everything below arrives live.
    const names = ["alpha", "bravo", "charlie", "delta", "echo"];
    const nodes = [];
    for (const name of names) {
      const n = await spawnNode(registry.port, ["--name", name, "--listen", "127.0.0.1"]);
      procs.push(n);
      nodes.push(n);
    }

    await waitForPage(
      page,
      (n) => document.querySelectorAll("#nodes tbody tr[data-id]").length === n && document.querySelector("#indicator")?.getAttribute("data-state") === "complete",
      5,
      "5 nodes and a complete mesh",
    );
    const complete = await view(page);
    expect(complete.indicator).toContain("Mesh complete");
    expect(complete.indicatorSub).toContain("all 10 pairs of 5 nodes");
    expect(complete.rows.map((r) => r.id).sort()).toEqual(nodes.map((n) => n.id).sort());
    for (const [i, n] of nodes.entries()) {
      const row = complete.rows.find((r) => r.id === n.id);
      expect(row?.text).toContain(names[i]!);
      expect(row?.text).toContain(`127.0.0.1:${n.port}`);
    }
    expect(complete.cells).toEqual({ greeted: 20, waiting: 0, self: 5 });
    expect(complete.joins.sort()).toEqual(nodes.map((n) => n.id).sort());
    expect(complete.figures.nodes).toBe("5");
    mkdirSync(ARTIFACTS, { recursive: true });
    await page.screenshot({ path: join(ARTIFACTS, "status-complete.png"), fullPage: true });

    // A graceful stop: the node says leave, the page drops it and logs why.
    const leaving = nodes[2]!;
    leaving.signal("SIGTERM");
    expect(await leaving.exited()).toBe(0);
    await waitForPage(
      page,
      (id) => !document.querySelector(`#nodes tr[data-id="${id}"]`) && !!document.querySelector(`#log li[data-kind="leave"][data-id="${id}"]`),
      leaving.id,
      "the node to leave the page",
    );
    const after = await view(page);
    expect(after.rows.map((r) => r.id).sort()).toEqual(nodes.filter((n) => n !== leaving).map((n) => n.id).sort());
    expect(after.leaves).toEqual([leaving.id]);
    expect(after.leaveText).toContain("charlie");
    expect(after.leaveText).toContain("said goodbye");
    expect(after.indicator).toContain("Mesh complete");
    expect(after.cells).toEqual({ greeted: 12, waiting: 0, self: 4 });
    expect(after.figures.leaves).toBe("1");
    const shot = join(ARTIFACTS, "status.png");
    await page.screenshot({ path: shot, fullPage: true });
    if (process.env.UPDATE_SCREENSHOT === "1") copyFileSync(shot, join(ROOT, "docs", "status.png"));

    // No script error or blocked resource (a CSP mistake would show here).
    expect(problems).toEqual([]);

    // The registry going away is visible too, instead of a silently frozen page.
    registry.signal("SIGTERM");
    await registry.exited();
    await waitForPage(page, () => document.querySelector("#conn")?.getAttribute("data-state") !== "live", 0, "the page to notice the registry is gone");

    // A registry back on the same HTTP port: the page reconnects by itself and
    // shows the new registry's state (its nodes still dial the old TCP port).
    const httpPort = new URL(url).port;
    const again = await spawnRegistry(["--http", httpPort]);
    procs.push(again);
    await waitForPage(
      page,
      () => document.querySelector("#conn")?.getAttribute("data-state") === "live" && document.querySelector("#indicator")?.getAttribute("data-state") === "empty",
      0,
      "the page to reconnect to the restarted registry",
    );
    expect((await view(page)).rows).toEqual([]);
  },
  90_000,
);

// --- internal ----------------------------------------------------------------

async function waitForPage(page: Page, fn: (arg: string | number) => boolean, arg: string | number, what: string): Promise<void> {
  try {
    await page.waitForFunction(fn, arg, { timeout: 20_000 });
  } catch (e) {
    const shot = join(ARTIFACTS, "failure.png");
    mkdirSync(ARTIFACTS, { recursive: true });
    await page.screenshot({ path: shot, fullPage: true }).catch(() => {});
    throw new Error(`page never showed ${what} (screenshot: ${shot}): ${(e as Error).message}`);
  }
}

/** What a person sees on the page, read from the DOM. */
function view(page: Page) {
  return page.evaluate(() => {
    const text = (sel: string) => document.querySelector(sel)?.textContent?.trim() ?? "";
    const count = (state: string) => document.querySelectorAll(`#matrix td[data-state="${state}"]`).length;
    const ids = (kind: string) => Array.from(document.querySelectorAll(`#log li[data-kind="${kind}"]`), (li) => li.getAttribute("data-id") ?? "");
    return {
      indicator: text("#indicator-text"),
      indicatorSub: text("#indicator-sub"),
      rows: Array.from(document.querySelectorAll("#nodes tbody tr[data-id]"), (tr) => ({ id: tr.getAttribute("data-id") ?? "", text: tr.textContent ?? "" })),
      cells: { greeted: count("greeted"), waiting: count("waiting"), self: count("self") },
      joins: ids("join"),
      leaves: ids("leave"),
      leaveText: text('#log li[data-kind="leave"]'),
      figures: { nodes: text("#fig-nodes"), leaves: text("#fig-leaves") },
    };
  });
}

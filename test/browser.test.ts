/**
 * The live page in a real headless browser: Debian's Chromium driven by
 * playwright-core (no browser download). A registry process with --http and
 * node processes join; the page must list them and reach "complete", then show
 * a node leaving, keeping every other node's number. Then the matrix at 40
 * and 100 nodes: every column on screen, all of one width, nothing to scroll
 * sideways. Screenshots land in artifacts/browser/ on every run;
 * UPDATE_SCREENSHOT=1 also refreshes docs/status.png (the 40-node page) for
 * the README.
 */
import { afterEach, expect, test } from "bun:test";
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium, type BrowserContext, type Page } from "playwright-core";
import { startNode, type PeerNode } from "../client.ts";
import { startRegistry, type Registry } from "../registry.ts";
import { startStatusServer } from "../status.ts";
import { ROOT, disposeAll, spawnNode, spawnRegistry, waitUntil, type Proc } from "../harness.ts";

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

let procs: AsyncDisposable[] = [];
let context: BrowserContext | undefined;
let profile: string | undefined;

afterEach(async () => {
  await context?.close().catch(() => {});
  context = undefined;
  if (profile) rmSync(profile, { recursive: true, force: true });
  profile = undefined;
  // Nodes before their registry, so they leave instead of reconnecting.
  await disposeAll(procs.splice(0).reverse());
});

test.skipIf(!have)(
  "the page shows nodes joining, the mesh completing and a node leaving",
  async () => {
    const registry = await spawnRegistry(["--http", "0"]);
    procs.push(registry);
    const url = (await registry.log.waitFor("http-listening", 10_000)).url;

    const { page, problems } = await openPage();
    await page.goto(url);
    await page.waitForSelector('#conn[data-state="live"]', { timeout: 10_000 });
    await page.waitForSelector('#indicator[data-state="empty"]', { timeout: 10_000 });

    // Nodes join after the page is open: everything below arrives live.
    const names = ["alpha", "bravo", "charlie", "delta", "echo"];
    const nodes: (Proc & { id: string; port: number })[] = [];
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
    // Numbered in join order (the nodes joined one after the other).
    expect(complete.rows.map((r) => r.no)).toEqual(["1", "2", "3", "4", "5"]);
    expect(complete.rows.map((r) => r.id)).toEqual(nodes.map((n) => n.id));
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
    // The others keep their numbers: a gap where charlie was, in the list and the matrix.
    expect(after.rows.map((r) => r.no)).toEqual(["1", "2", "4", "5"]);
    expect(after.columns).toEqual(["1", "2", "4", "5"]);
    // A node joining later gets a new number, not the freed one.
    const late = await spawnNode(registry.port, ["--name", "foxtrot", "--listen", "127.0.0.1"]);
    procs.push(late);
    await waitForPage(page, (id) => !!document.querySelector(`#nodes tr[data-id="${id}"]`), late.id, "the late node to appear");
    const later = await view(page);
    expect(later.rows.map((r) => [r.no, r.id])).toEqual([...after.rows.map((r) => [r.no, r.id]), ["6", late.id]]);
    await page.screenshot({ path: join(ARTIFACTS, "status.png"), fullPage: true });

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

// 100 nodes is within the status server's default matrix limit (128): what
// is tested is how the page draws a mesh that size.
for (const size of [40, 100]) {
  test.skipIf(!have)(
    `at ${size} nodes the matrix fits the window: every column visible, all of one width, no sideways scrolling`,
    async () => {
      const { url, registry } = await meshWithPage(size);
      const { page, problems } = await openPage();
      await page.goto(url);
      await waitForPage(
        page,
        (n) => document.querySelectorAll("#matrix tbody tr").length === n && document.querySelector("#indicator")?.getAttribute("data-state") === "complete",
        size,
        `the matrix of ${size} nodes, complete`,
      );
      const fit = await matrixFit(page);
      // The whole page at 40; at 100 the matrix alone (a page that long takes seconds to capture).
      const shot = join(ARTIFACTS, `status-${size}.png`);
      mkdirSync(ARTIFACTS, { recursive: true });
      if (size === 40) await page.screenshot({ path: shot, fullPage: true });
      else await page.locator("section", { has: page.locator("#matrix") }).screenshot({ path: shot });
      expect({ size, ...fit }).toMatchObject({
        size,
        columns: size,
        rows: size,
        offscreen: [],
        pageOverflowPx: 0,
        matrixOverflowPx: 0,
        greeted: size * (size - 1),
      });
      // Fixed table layout may round column edges to device pixels: equal means within one pixel.
      expect(fit.widest - fit.narrowest).toBeLessThanOrEqual(1);
      expect(fit.narrowest).toBeGreaterThanOrEqual(5);
      // Column numbers are the nodes' numbers in join order.
      expect(fit.labels).toEqual(Array.from({ length: size }, (_, i) => String(i + 1)));
      expect(registry.stats().nodes).toBe(size);
      expect(problems).toEqual([]);
      if (size === 40) {
        // The README shows the top of this page: the summary and the whole matrix.
        const clip = { x: 0, y: 0, width: 1280, height: Math.ceil(fit.matrixBottom) + 24 };
        const top = join(ARTIFACTS, "status-40-top.png");
        await page.screenshot({ path: top, fullPage: true, clip });
        if (process.env.UPDATE_SCREENSHOT === "1") copyFileSync(top, join(ROOT, "docs", "status.png"));
      }
    },
    60_000,
  );
}

// --- internal ----------------------------------------------------------------

/** A browser page at the README's size; script errors and CSP refusals are collected. */
async function openPage(): Promise<{ page: Page; problems: string[] }> {
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
  return { page, problems };
}

/**
 * A registry with its status server and `size` nodes in this process (real
 * sockets on loopback; a process each would cost a gigabyte at 100), joined
 * one after the other so their numbers are known, and greeted in full.
 */
async function meshWithPage(size: number): Promise<{ url: string; registry: Registry }> {
  const registry = await startRegistry({ host: "127.0.0.1", port: 0 });
  procs.push(registry);
  const status = startStatusServer(registry, { host: "127.0.0.1", port: 0 });
  procs.push(status);
  for (let i = 1; i <= size; i++) {
    const node: PeerNode = await startNode({ registryHost: "127.0.0.1", registryPort: registry.port, listenHost: "127.0.0.1", name: `node-${i}` });
    procs.push(node);
  }
  const pairs = (size * (size - 1)) / 2;
  await waitUntil(() => registry.stats().pairsGreeted === pairs, 30_000, `${pairs} greeted pairs`);
  return { url: status.url, registry };
}

/** Where the matrix's columns are, read from the DOM after layout. */
function matrixFit(page: Page) {
  return page.evaluate(() => {
    const wrap = document.getElementById("matrix-wrap")!;
    const box = wrap.getBoundingClientRect();
    const heads = Array.from(document.querySelectorAll<HTMLElement>("#matrix thead th[scope=col]"));
    const rows = Array.from(document.querySelectorAll<HTMLTableRowElement>("#matrix tbody tr"));
    // A column is visible when its header and its cell in the last row lie inside the matrix's box and the window.
    const lastRow = Array.from(rows.at(-1)?.querySelectorAll("td") ?? []);
    const outside = (r: DOMRect) => r.width < 1 || r.left < box.left - 0.5 || r.right > box.right + 0.5 || r.right > window.innerWidth;
    const offscreen = heads.flatMap((th, i) => (outside(th.getBoundingClientRect()) || !lastRow[i] || outside(lastRow[i]!.getBoundingClientRect()) ? [th.textContent] : []));
    const widths = lastRow.map((td) => td.getBoundingClientRect().width);
    return {
      columns: heads.length,
      rows: rows.length,
      offscreen,
      pageOverflowPx: document.documentElement.scrollWidth - document.documentElement.clientWidth,
      matrixOverflowPx: wrap.scrollWidth - wrap.clientWidth,
      narrowest: Math.min(...widths),
      widest: Math.max(...widths),
      labels: heads.map((th) => th.textContent ?? ""),
      greeted: document.querySelectorAll('#matrix td[data-state="greeted"]').length,
      matrixBottom: wrap.closest("section")!.getBoundingClientRect().bottom + window.scrollY,
    };
  });
}

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
      rows: Array.from(document.querySelectorAll("#nodes tbody tr[data-id]"), (tr) => ({
        id: tr.getAttribute("data-id") ?? "",
        no: tr.querySelector("td.num")?.textContent ?? "",
        text: tr.textContent ?? "",
      })),
      columns: Array.from(document.querySelectorAll("#matrix thead th[scope=col]"), (th) => th.textContent ?? ""),
      cells: { greeted: count("greeted"), waiting: count("waiting"), self: count("self") },
      joins: ids("join"),
      leaves: ids("leave"),
      leaveText: text('#log li[data-kind="leave"]'),
      figures: { nodes: text("#fig-nodes"), leaves: text("#fig-leaves") },
    };
  });
}

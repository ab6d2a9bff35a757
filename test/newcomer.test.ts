/**
 * What a newcomer meets (issue 14), as real processes in their readable
 * (non-JSON) output: the registry's log stays short, a node that cannot reach
 * its registry says so once and can give up, errors are printed once, a
 * registry restart does not read as peers leaving and coming back, --help
 * shows the command users type, and `list` prints what /peers lists.
 */
import { afterEach, describe, expect, test } from "bun:test";
import { startNode, type PeerNode } from "../client.ts";
import { Fixtures, ROOT, exec, freePort, spawnNode, spawnRegistry, spawnScript, waitUntil, withDeadline, type Proc } from "../harness.ts";

const f = new Fixtures();
afterEach(() => f.cleanup());


/** The readable lines a process printed (stdout and stderr), as the harness keeps them. */
function lines(p: Proc): string[] {
  return p.stderr.map((l) => l.replace(/^stdout: /, ""));
}

/** A process in readable mode (no --json): its lines land in `stderr`, stdout ones prefixed. */
function readable(script: string, args: string[], env: Record<string, string> = {}): Proc {
  return f.track(spawnScript(script, args, { env: { NO_COLOR: "1", ...env } }));
}

describe("the registry's readable log", () => {
  test("20 nodes joining: one line each and one settled mesh line, no line per pair", async () => {
    const reg = readable("registry.ts", ["127.0.0.1", "0"]);
    await waitUntil(() => lines(reg).some((l) => l.includes("registry listening on")), 15_000, "the registry to listen");
    const port = Number(/listening on 127\.0\.0\.1:(\d+)/.exec(lines(reg).join("\n"))![1]);
    const nodes: PeerNode[] = [];
    for (let i = 0; i < 20; i++) nodes.push(await startNode({ registryHost: "127.0.0.1", registryPort: port, listenHost: "127.0.0.1", name: `n${i}` }));
    f.defer(() => Promise.all(nodes.map((n) => n.stop())));
    await waitUntil(() => lines(reg).some((l) => l.includes("mesh complete: 20 nodes, 190 pairs")), 20_000, "the settled mesh line");
    const out = lines(reg);
    expect(out.filter((l) => / joined at /.test(l)).length).toBe(20);
    expect(out.some((l) => l.includes("(n7)"))).toBe(true);
    expect(out.filter((l) => l.includes("greeted each other"))).toEqual([]);
    expect(out.length).toBeLessThanOrEqual(30);
    expect(out.filter((l) => l.includes("mesh incomplete"))).toEqual([]);
  }, 60_000);

  test("a mesh that does not complete is said to be, once, 10 s after the last join", async () => {
    // Beats of 20 s: the silent ghost below stays listed through the test.
    const reg = readable("registry.ts", ["127.0.0.1", "0", "--no-probe", "--heartbeat", "20000"]);
    await waitUntil(() => lines(reg).some((l) => l.includes("registry listening on")), 15_000, "the registry to listen");
    const port = Number(/listening on 127\.0\.0\.1:(\d+)/.exec(lines(reg).join("\n"))![1]);
    // A node listed at a port where nobody listens: the other's greeting fails, and it greets nobody.
    const ghost = await f.raw(port);
    await ghost.register("ghost", freePort());
    const node = await startNode({ registryHost: "127.0.0.1", registryPort: port, listenHost: "127.0.0.1", name: "real" });
    f.defer(() => node.stop());
    await waitUntil(() => lines(reg).some((l) => l.includes("mesh incomplete")), 20_000, "the incomplete mesh line");
    expect(lines(reg).filter((l) => l.includes("mesh incomplete"))).toEqual([
      expect.stringContaining("mesh incomplete: 0 of 1 pairs greeted among 2 nodes, 10 s after the last join or leave"),
    ]);
    expect(lines(reg).filter((l) => l.includes("mesh complete"))).toEqual([]);
  }, 60_000);
});

describe("a node that cannot reach its registry", () => {
  test("one warning naming the address and the likely cause, a reminder every 10 attempts; --give-up-after exits 1", async () => {
    const port = freePort();
    const node = readable("client.ts", ["127.0.0.1", String(port), "--reconnect-max", "40", "--give-up-after", "1500"]);
    expect(await withDeadline(node.exited(), 15_000, "the node to give up")).toBe(1);
    const out = lines(node);
    const warnings = out.filter((l) => l.includes("cannot reach the registry"));
    expect(warnings.length).toBe(1);
    expect(warnings[0]).toContain(`127.0.0.1:${port}`);
    expect(warnings[0]).toContain("is a registry running there?");
    const reminders = out.filter((l) => l.includes("still trying"));
    expect(reminders.every((l) => /\(attempt \d*0\)/.test(l))).toBe(true);
    const finals = out.filter((l) => l.startsWith("error:"));
    expect(finals).toEqual([expect.stringContaining("not registered within 1500ms")]);
    // Everything else: the listening line, the warning, the reminders, the final error.
    expect(out.length).toBe(1 + 1 + reminders.length + 1);
  });

  test("a refusal is printed once, not again as the lost session and the exit", async () => {
    const reg = f.track(await spawnRegistry(["--token", "right"]));
    const node = readable("client.ts", ["127.0.0.1", String(reg.port), "--token", "wrong"]);
    expect(await withDeadline(node.exited(), 15_000, "the refused node to exit")).toBe(1);
    expect(lines(node).filter((l) => l.includes("wrong token")).length).toBe(1);
  });
});

describe("a registry restart", () => {
  test("a peer present before and after is not reported as left and joined again", async () => {
    const first = f.track(await spawnRegistry());
    const port = first.port;
    const a = readable("client.ts", ["127.0.0.1", String(port), "--listen", "127.0.0.1", "--reconnect-max", "300"]);
    await waitUntil(() => lines(a).some((l) => l.includes("registered as")), 15_000, "a to register");
    const b = f.track(await spawnNode(port, ["--listen", "127.0.0.1", "--reconnect-max", "300"]));
    await waitUntil(() => lines(a).some((l) => l.includes(`greeting from ${b.id}`)), 15_000, "b's greeting at a");

    const before = lines(a).length;
    // b sleeps through the restart, so a is back first and sees a list without b: b is missing for a while.
    b.signal("SIGSTOP");
    await first.kill("SIGKILL");
    const second = f.track(spawnScript("registry.ts", ["127.0.0.1", String(port), "--json"]));
    await second.log.waitFor("listening", 15_000, "the registry back on its port");
    await second.log.waitFor("node-registered", 15_000, "a back");
    await waitUntil(() => lines(a).filter((l) => l.includes("registered as")).length === 2, 15_000, "a registered again");
    b.signal("SIGCONT");
    await second.log.waitForCount("node-registered", 2, 15_000, "b back");
    // a's own view, on request: once b is in it, nothing about b can still be waiting to be printed.
    await waitUntil(
      () => {
        a.signal("SIGUSR1");
        return lines(a).some((l) => l.includes("peers:") && l.includes(b.id));
      },
      15_000,
      "b back in a's view",
      200,
    );
    expect(lines(a).slice(before).filter((l) => l.includes(`peer ${b.id}`))).toEqual([]);
  }, 60_000);
});

describe("the command line", () => {
  test("--version prints the package's version, for each program", async () => {
    const { version } = (await Bun.file(`${ROOT}/package.json`).json()) as { version: string };
    for (const args of [["registry.ts"], ["client.ts"], ["client.ts", "list"], ["certs.ts"]]) {
      const out = await exec([process.execPath, ...args, "--version"], 15_000, undefined, ROOT);
      expect({ args, code: out.code, stdout: out.stdout.trim() }).toEqual({ args, code: 0, stdout: version });
    }
  });

  test("--help shows the command users type, what is required, the variables and examples, without colour codes", async () => {
    for (const [script, args, usage] of [
      ["client.ts", ["--help"], "Usage: bun client.ts <registry-host> <registry-port> [options]"],
      ["client.ts", ["list", "--help"], "Usage: bun client.ts list <registry-host> <registry-port> [options]"],
      ["registry.ts", ["--help"], "Usage: bun registry.ts [host] [port] [options]"],
    ] as const) {
      const p = spawnScript(script, [...args], { env: { FORCE_COLOR: "1" } });
      expect(await withDeadline(p.exited(), 15_000, `${script} ${args.join(" ")}`)).toBe(0);
      const text = lines(p).join("\n");
      expect(text).toStartWith(usage);
      expect(text).toContain("Examples:");
      expect(text).toMatch(/\[env [A-Z_]+/);
      expect(text).not.toContain("\u001b[");
      if (script === "client.ts") expect(text).toMatch(/<registry-host> +Registry host .*\(required\)/);
      // list's own options only: nothing about greeting, which it never does.
      if (args[0] === "list") expect(text).not.toContain("--greet-timeout");
    }
  });

  test("`list` prints the registry's nodes without registering; its JSON equals what /peers lists", async () => {
    const reg = f.track(await spawnRegistry(["--http", "0", "--http-host", "127.0.0.1"]));
    const nodes = await Promise.all([0, 1, 2].map((i) => spawnNode(reg.port, ["--listen", "127.0.0.1", "--name", `list-${i}`])));
    nodes.forEach((n) => f.track(n));
    const url = (await reg.log.waitFor("http-listening", 10_000)).url;
    const list = (...extra: string[]) => exec([process.execPath, "client.ts", "list", "127.0.0.1", String(reg.port), ...extra], 15_000, undefined, ROOT);
    const json = await list("--json");
    expect(json.code).toBe(0);
    const listed = JSON.parse(json.stdout) as { count: number; peers: { id: string; host: string; port: number; name?: string }[] };
    const peers = ((await (await fetch(`${url}peers`)).json()) as { peers: { id: string; host: string; port: number; name?: string }[] }).peers;
    const key = (p: { id: string; host: string; port: number; name?: string }) => `${p.id}@${p.host}:${p.port}/${p.name}`;
    expect(listed.peers.map(key).sort()).toEqual(peers.map(key).sort());
    expect(listed.count).toBe(3);

    const text = await list();
    expect(text.code).toBe(0);
    const out = text.stdout.trimEnd().split("\n");
    expect(out[0]).toMatch(/^id +name +address$/);
    expect(out.filter((l) => /list-\d/.test(l)).length).toBe(3);
    expect(out.at(-1)).toMatch(/^3 nodes \(boot /);
    // Nobody registered: the list is the three nodes, and no node left or joined.
    expect(reg.log.named("node-registered").length).toBe(3);
  });

  test("`list` warns on stderr, as a node does, when its token would travel in clear to another host", async () => {
    const list = (host: string, ...extra: string[]) =>
      exec([process.execPath, "client.ts", "list", host, String(freePort()), "--token", "t", ...extra], 15_000, { ...process.env, NO_COLOR: "1" }, ROOT);
    // 0.0.0.0 is no loopback address to the warning, yet Linux delivers a connection to it on this
    // host: the warning comes before the dial, which is refused here, and nothing leaves the machine.
    const remote = await list("0.0.0.0", "--json");
    expect(remote.code).toBe(1);
    expect(remote.stdout).toBe("");
    expect(remote.stderr).toContain("the token travels in clear to 0.0.0.0: connect with TLS (--tls, or --tls-ca FILE)");
    const local = await list("127.0.0.1");
    expect(local.code).toBe(1);
    expect(local.stderr).toContain("ECONNREFUSED");
    expect(local.stderr).not.toContain("travels in clear");
  });
});

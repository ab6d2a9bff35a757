/**
 * The roles over TLS: a TLS registry with TLS nodes, and mutual TLS for the
 * whole mesh, as processes started with the documented flags (--json output
 * and exit codes) and in-process where a test needs the registry's counters
 * or a node the flags would not let start. Every test makes its certificates
 * with certs.ts in a temporary directory (testCerts).
 */
import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { copyFileSync, mkdirSync, writeFileSync } from "node:fs";
import { X509Certificate } from "node:crypto";
import { join } from "node:path";
import { makeCerts } from "../certs.ts";
import { startNode, type NodeEvent, type PeerNode } from "../client.ts";
import { Greeter, Met } from "../greetings.ts";
import {
  EventLog,
  disposeAll,
  greetingsOf,
  meshProblems,
  spawnNode,
  spawnRegistry,
  spawnScript,
  testCerts,
  tlsAnswer,
  waitUntil,
  withDeadline,
  type KeyPair,
  type NodeProc,
  type Proc,
  type TestCerts,
} from "../harness.ts";
import { tcp, type Transport } from "../net.ts";
import { tls } from "../tls.ts";
import { startRegistry, type Registry, type RegistryEvent } from "../registry.ts";

const T = 60_000;
const WAIT = 20_000;
const IDS = ["node-0", "node-1", "node-2", "node-3", "node-4"];

let certs: TestCerts;
beforeAll(async () => {
  certs = await testCerts(IDS);
}, 30_000);
afterAll(() => certs?.[Symbol.asyncDispose]());

const fixtures: (AsyncDisposable | undefined)[] = [];
afterEach(async () => {
  await disposeAll(fixtures.splice(0));
});


/** A node process that is expected to be refused: resolves with its error event and exit code. */
async function refusedNode(port: number, args: string[]): Promise<{ error: Record<string, unknown>; code: number; stderr: string }> {
  const p = spawnScript("client.ts", ["127.0.0.1", String(port), "--json", "--listen", "127.0.0.1", ...args], { label: "refused node" });
  fixtures.push(p);
  const error = await p.log.waitFor("error", WAIT, "the node's error");
  const code = await withDeadline(p.exited(), WAIT, "the refused node to exit");
  return { error, code, stderr: p.stderr.join("\n") };
}

/** In-process registry on 127.0.0.1, disposed after the test. */
async function registryWith(transport: Transport): Promise<{ reg: Registry; log: EventLog }> {
  const log = new EventLog<RegistryEvent>();
  const reg = await startRegistry({ host: "127.0.0.1", port: 0, transport, onEvent: log.push });
  fixtures.push(reg);
  return { reg, log };
}

/** In-process node, disposed after the test; `waitForRegistration` as startNode has it. */
async function nodeWith(port: number, transport: Transport, o: { id?: string; advertise?: string; wait?: boolean } = {}): Promise<{ node: PeerNode; log: EventLog }> {
  const log = new EventLog();
  const node = await startNode({
    registryHost: "127.0.0.1",
    registryPort: port,
    listenHost: "127.0.0.1",
    transport,
    id: o.id,
    advertise: o.advertise,
    onEvent: (e: NodeEvent) => log.push(e),
    waitForRegistration: o.wait ?? true,
  });
  fixtures.push(node);
  return { node, log };
}

describe("TLS on the registry port", () => {
  test(
    "a TLS registry and TLS nodes form the full mesh; nodes reach it by address and by name",
    async () => {
      const registry = await spawnRegistry(certs.registryArgs(false));
      fixtures.push(registry);
      const nodes: NodeProc[] = [];
      for (const host of ["127.0.0.1", "localhost", "127.0.0.1"]) {
        const n = await spawnNode(registry.port, [...certs.nodeArgs(), "--listen", "127.0.0.1"], {}, host);
        fixtures.push(n);
        nodes.push(n);
      }
      await expectFullMesh(registry, nodes);
    },
    T,
  );

  test(
    "a node given the registry by name checks the certificate against that name, though it connects to the address the name resolves to",
    async () => {
      // A certificate for the name only: checked against the address, it would not match.
      const named = await makeCerts(join(certs.dir, `named-${Date.now()}`), { nodes: 0, names: ["localhost"], ips: [], days: 2 });
      const registry = await spawnRegistry(["--tls-cert", named.registry!.cert, "--tls-key", named.registry!.key]);
      fixtures.push(registry);
      const node = await spawnNode(registry.port, ["--tls-ca", named.ca, "--listen", "127.0.0.1"], {}, "localhost");
      fixtures.push(node);
      expect(node.log.named("registered").length).toBe(1);
      const byAddress = await refusedNode(registry.port, ["--tls-ca", named.ca]);
      expect(byAddress.error.code).toBe("bad-certificate");
      expect(String(byAddress.error.message)).toContain("not issued for the name dialed (see --tls-server-name)");
      const overridden = await spawnNode(registry.port, ["--tls-ca", named.ca, "--tls-server-name", "localhost", "--listen", "127.0.0.1"]);
      fixtures.push(overridden);
      expect(overridden.log.named("registered").length).toBe(1);
    },
    T,
  );

  test(
    "a plain-text node is refused with a clear message and exits 1; a node trusting another CA refuses the registry and exits 1",
    async () => {
      const registry = await spawnRegistry(certs.registryArgs(false));
      fixtures.push(registry);
      const plain = await refusedNode(registry.port, []);
      expect(plain.error).toMatchObject({ code: "tls-required", message: "this port speaks TLS: connect with TLS (a node: --tls, or --tls-ca FILE)" });
      expect(plain.code).toBe(1);
      expect(plain.stderr).toContain("tls-required: this port speaks TLS");
      const wary = await refusedNode(registry.port, ["--tls-ca", certs.stranger.ca]);
      expect(wary.error.code).toBe("bad-certificate");
      expect(String(wary.error.message)).toContain("the registry's certificate is not trusted: it is signed by a CA that is not trusted here");
      expect(wary.code).toBe(1);
      const refusal = await registry.log.waitFor("error", WAIT, "the registry's report of the plain-text node");
      expect(refusal).toMatchObject({ code: "tls-required" });
      expect(registry.log.named("node-registered")).toEqual([]);
    },
    T,
  );

  test("the registry counts both mismatches in /stats: plain text on its TLS port, TLS on a plain one", async () => {
    const secure = await registryWith(certs.registryTransport(false));
    const plain = await registryWith(tcp);
    await expect(nodeWith(secure.reg.port, tcp)).rejects.toThrow("tls-required: this port speaks TLS");
    await expect(nodeWith(plain.reg.port, certs.nodeTransport())).rejects.toThrow(/^tls-unsupported: .*it does not speak TLS \(it answered in plain text\)/);
    await waitUntil(() => plain.reg.stats().rejected["tls-unsupported"] === 1, 5_000, "the plain registry to count the TLS client");
    expect(secure.reg.stats().rejected).toEqual({ "tls-required": 1 });
    expect(plain.reg.stats().rejected).toEqual({ "tls-unsupported": 1 });
  });

  test("a node with a certificate, refused by a registry without a client CA, is told why by its own listener: the probe came in plain TCP", async () => {
    const { reg } = await registryWith(certs.registryTransport(false));
    const log = new EventLog<NodeEvent>();
    const refused = startNode({ registryHost: "127.0.0.1", registryPort: reg.port, listenHost: "127.0.0.1", transport: certs.nodeTransport("node-0"), onEvent: (e: NodeEvent) => log.push(e) });
    await expect(refused).rejects.toThrow(/^unreachable: no node answered as node-0/);
    // The listener's close and the registry's refusal race: the warning may come just after.
    const warning = await log.waitFor("warning", 5_000, "the listener's warning");
    expect(log.named("warning").length).toBe(1);
    expect(warning.message).toContain("reached this node's TLS listener: if that was the registry's probe, a mesh with node certificates needs the registry started with --tls-client-ca");
  });
});

describe("mutual TLS", () => {
  test(
    "a full mesh of 5 node processes, each with the id its certificate names",
    async () => {
      const registry = await spawnRegistry(certs.registryArgs(true));
      fixtures.push(registry);
      const nodes = await Promise.all(
        IDS.map(async (id) => {
          const n = await spawnNode(registry.port, [...certs.nodeArgs(id), "--listen", "127.0.0.1"]);
          fixtures.push(n);
          return n;
        }),
      );
      expect(nodes.map((n) => n.id).sort()).toEqual(IDS);
      await expectFullMesh(registry, nodes);
      expect(registry.log.named("node-registered").map((e) => e.id).sort()).toEqual(IDS);
    },
    T,
  );

  test("a node without a certificate, with another CA's, or with one for another id is refused, each with its code", async () => {
    const { reg, log } = await registryWith(certs.registryTransport(true));
    const refusals = await Promise.all([
      nodeWith(reg.port, tls({ ca: certs.mesh.ca })).catch((e: Error) => e.message),
      // A stranger's certificate is not the mesh's: the node itself runs without a mesh CA to get that far.
      nodeWith(reg.port, tls({ ca: certs.mesh.ca, ...certs.stranger.nodes[0]! })).catch((e: Error) => e.message),
      nodeWith(reg.port, certs.nodeTransport("node-1"), { id: "node-0" }).catch((e: Error) => e.message),
    ]);
    expect(refusals).toEqual([
      "certificate-required: this port requires a client certificate signed by the mesh CA",
      expect.stringMatching(/^bad-certificate: the client certificate is refused: it is signed by a CA that is not trusted here \(/),
      "identity-mismatch: this connection's certificate is for node node-1, not node-0",
    ]);
    await waitUntil(() => log.named("error").length === 3, 5_000, "the registry to report all three");
    expect(reg.stats().rejected).toEqual({ "certificate-required": 1, "bad-certificate": 1, "identity-mismatch": 1 });
    expect(reg.nodes()).toEqual([]);
  });

  test("the flags refuse an --id that is not the certificate's before anything is sent", async () => {
    const p = spawnScript("client.ts", ["127.0.0.1", "9", ...certs.nodeArgs("node-1"), "--id", "node-0"], { label: "node" });
    fixtures.push(p);
    expect(await withDeadline(p.exited(), WAIT, "the node to exit")).toBe(2);
    expect(p.stderr.join("\n")).toContain(`usage error: --id node-0 is not the node the certificate in ${certs.node("node-1").cert} is for (node-1)`);
  });

  test("a raw TLS client without a mesh certificate cannot open a greeting; a mesh certificate cannot greet as another id", async () => {
    const { reg } = await registryWith(certs.registryTransport(true));
    const { node, log } = await nodeWith(reg.port, certs.nodeTransport("node-0"));
    const hello = (id: string) => ({ type: "hello", v: 1, id, host: "127.0.0.1", port: 1 });
    const answers = await Promise.all([
      tlsAnswer(node.port, undefined, hello("node-1")),
      tlsAnswer(node.port, certs.stranger.nodes[1]!, hello("node-1")),
      tlsAnswer(node.port, certs.node("node-2"), hello("node-1")),
      tlsAnswer(node.port, certs.node("node-2"), hello("node-2")),
    ]);
    expect(answers.map((a) => a.code ?? a.type)).toEqual(["certificate-required", "bad-certificate", "identity-mismatch", "welcome"]);
    expect(answers[2]!.message).toBe("this connection's certificate is for node node-2, not node-1");
    // The refused ones were never read: the only hello the node took is node-2's own (kept aside: node-2 is not listed).
    expect(log.named("greeting")).toEqual([]);
  });

  test("a greeting whose TLS handshake never ends fails after its retries, and leaves nothing unhandled", async () => {
    // Accepts TCP and never answers: the dial outlives the greeting's deadline.
    const silent = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
    fixtures.push({ [Symbol.asyncDispose]: async () => silent.stop(true) });
    const log = new EventLog();
    const settings = { greetTimeoutMs: 200, greetConcurrency: 1, greetRetries: 1 };
    const listed = () => true;
    const greeter = new Greeter(settings, certs.nodeTransport("node-0"), { id: "node-0" }, () => ({ host: "127.0.0.1", port: 1 }), new Met(listed), listed, () => {}, log.push);
    fixtures.push({ [Symbol.asyncDispose]: async () => greeter.stop() });
    greeter.greet({ id: "node-1", host: "127.0.0.1", port: silent.port });
    const failed = await log.waitFor("greet-failed", 5_000);
    expect(failed).toMatchObject({ peer: "node-1", tries: 2 });
    expect(failed.reason).toMatch(/no TLS connection within|no welcome within/);
  });

  test("the probe works through TLS: the registry reaches the listener with its own certificate and checks the id it finds", async () => {
    const { reg, log } = await registryWith(certs.registryTransport(true));
    const { node: good } = await nodeWith(reg.port, certs.nodeTransport("node-0"));
    expect(reg.nodes().map((n) => [n.id, n.port])).toEqual([["node-0", good.port]]);
    // node-1 names node-0's listener as its own: the probe finds node-0's certificate there.
    const refusal = await nodeWith(reg.port, certs.nodeTransport("node-1"), { advertise: `:${good.port}` }).catch((e: Error) => e.message);
    expect(refusal).toBe(`unreachable: no node answered as node-1 at 127.0.0.1:${good.port}; if nodes must reach this node at another address, start it with --advertise host[:port]`);
    const report = await log.waitForWhere("error", (e) => e.code === "unreachable", 5_000);
    expect(report.detail).toContain("reached a certificate for node node-0, expected node node-1");
    expect(reg.nodes().map((n) => n.id)).toEqual(["node-0"]);
  });
});

describe("rotation on SIGHUP", () => {
  test(
    "registry and node read their files again: new connections get the new certificates, open sessions stay; broken files are refused and the old ones kept",
    async () => {
      const dir = join(certs.dir, `rotation-${Date.now()}`);
      const live = await liveFiles(dir);
      const registry = await spawnRegistry(["--tls-cert", live.registry.cert, "--tls-key", live.registry.key, "--tls-client-ca", certs.mesh.ca]);
      fixtures.push(registry);
      const n0 = await spawnNode(registry.port, ["--tls-ca", certs.mesh.ca, "--tls-cert", live.node0.cert, "--tls-key", live.node0.key, "--listen", "127.0.0.1"]);
      fixtures.push(n0);
      const n1 = await spawnNode(registry.port, [...certs.nodeArgs("node-1"), "--listen", "127.0.0.1"]);
      fixtures.push(n1);
      await registry.log.waitForWhere("mesh-complete", (e) => e.nodes === 2, WAIT, "mesh-complete with 2 nodes");
      const before = { registry: await servedSerial(registry.port, "localhost"), node: await servedSerial(n0.port, "node-0") };

      const renewed = await renew(dir);
      registry.signal("SIGHUP");
      n0.signal("SIGHUP");
      await registry.log.waitFor("tls-reloaded", WAIT, "the registry to reload");
      await n0.log.waitFor("tls-reloaded", WAIT, "node-0 to reload");
      expect(await servedSerial(registry.port, "localhost")).toBe(renewed.registry);
      expect(await servedSerial(n0.port, "node-0")).toBe(renewed.node0);
      expect(renewed.registry).not.toBe(before.registry);
      expect(renewed.node0).not.toBe(before.node);

      // A third node joins with both new certificates in play: registry session, probe of it, greetings to node-0.
      const n2 = await spawnNode(registry.port, [...certs.nodeArgs("node-2"), "--listen", "127.0.0.1"]);
      fixtures.push(n2);
      await registry.log.waitForWhere("mesh-complete", (e) => e.nodes === 3, WAIT, "mesh-complete with 3 nodes");

      writeFileSync(live.registry.cert, "-----BEGIN CERTIFICATE-----\ntruncated\n");
      registry.signal("SIGHUP");
      const failed = await registry.log.waitFor("tls-reload-failed", WAIT, "the registry to refuse the broken file");
      expect(failed.message).toContain(live.registry.cert);
      expect(await servedSerial(registry.port, "localhost")).toBe(renewed.registry);

      // The sessions opened before either reload never dropped.
      for (const n of [n0, n1]) expect([n.log.named("disconnected"), n.log.named("registered").length]).toEqual([[], 1]);
      expect(registry.log.named("node-left")).toEqual([]);
    },
    T,
  );
});

describe("HTTPS for the status server", () => {
  test(
    "a TLS registry serves its status page over HTTPS with its own certificate, to browsers without one; SIGHUP reloads it too",
    async () => {
      const dir = join(certs.dir, `https-${Date.now()}`);
      const live = await liveFiles(dir);
      const registry = await spawnRegistry(["--tls-cert", live.registry.cert, "--tls-key", live.registry.key, "--tls-client-ca", certs.mesh.ca, "--http", "0"]);
      fixtures.push(registry);
      const url = (await registry.log.waitFor("http-listening", WAIT)).url;
      expect(url).toMatch(/^https:\/\/127\.0\.0\.1:\d+\/$/);
      const ca = await Bun.file(certs.mesh.ca).text();
      const healthz = await fetch(`${url}healthz`, { tls: { ca } });
      expect([healthz.status, ((await healthz.json()) as { status: string }).status]).toEqual([200, "ok"]);
      await expect(fetch(url.replace("https:", "http:") + "healthz")).rejects.toThrow();
      const port = Number(new URL(url).port);
      const before = await servedSerial(port, "localhost");

      const renewed = await renew(dir);
      registry.signal("SIGHUP");
      const reloads = await registry.log.waitForCount("tls-reloaded", 2, WAIT, "both certificate sets to reload");
      expect(reloads.map((e) => e.scope ?? "registry").sort()).toEqual(["registry", "status server"]);
      expect(await servedSerial(port, "localhost")).toBe(renewed.registry);
      expect(renewed.registry).not.toBe(before);
      expect((await fetch(`${url}healthz`, { tls: { ca } })).status).toBe(200);
    },
    T,
  );

  test(
    "with --http-tls-client-ca the status server, like the mesh's ports, serves only clients with a certificate that CA signed",
    async () => {
      const registry = await spawnRegistry([...certs.registryArgs(true), "--http", "0", "--http-host", "127.0.0.1", "--http-tls-client-ca", certs.mesh.ca]);
      fixtures.push(registry);
      const url = `${(await registry.log.waitFor("http-listening", WAIT)).url}healthz`;
      const ca = await Bun.file(certs.mesh.ca).text();
      const as = (pair: KeyPair | undefined) => fetch(url, { tls: { ca, ...(pair ? { cert: Bun.file(pair.cert), key: Bun.file(pair.key) } : {}) } }).then((r) => r.status, (e: Error) => e.message);
      expect(await as(certs.node("node-0"))).toBe(200);
      // No HTTP answer for the others: the connection carries the refusal's one JSON line, and closes.
      expect(await as(undefined)).toMatch(/Malformed_HTTP_Response/);
      expect(await as(certs.stranger.nodes.find((n) => n.id === "node-0"))).toMatch(/Malformed_HTTP_Response/);
    },
    T,
  );

  test("the status server's TLS flags without --http, or a client CA without HTTPS, are usage errors", async () => {
    for (const [args, says] of [
      [["--http-tls-cert", certs.mesh.registry!.cert], "usage error: --http-tls-cert, --http-tls-key and --http-tls-client-ca need --http"],
      [["--http-tls-client-ca", certs.mesh.ca], "usage error: --http-tls-cert, --http-tls-key and --http-tls-client-ca need --http"],
      [["--http", "0", "--http-tls-client-ca", certs.mesh.ca], "usage error: --http-tls-client-ca needs HTTPS on the status server"],
    ] as const) {
      const p = spawnScript("registry.ts", ["127.0.0.1", "0", ...args], { label: "registry" });
      fixtures.push(p);
      expect(await withDeadline(p.exited(), WAIT, "the registry to exit")).toBe(2);
      expect(p.stderr.join("\n")).toContain(says);
    }
  });
});

// --- internal ----------------------------------------------------------------

/** Every pair of `nodes` met exactly once, both ends agree, and nobody reported an error, a failed greeting or a warning. */
async function expectFullMesh(registry: Proc, nodes: NodeProc[]): Promise<void> {
  const n = nodes.length;
  await registry.log.waitForWhere("mesh-complete", (e) => e.nodes === n, WAIT, `mesh-complete with ${n} nodes`);
  const met = (x: NodeProc) => x.log.named("greeted").length + x.log.named("greeting").length;
  await waitUntil(() => nodes.every((x) => met(x) === n - 1), WAIT, "every node to meet every other");
  const { greeted, received } = greetingsOf(nodes);
  expect(meshProblems(nodes.map((x) => x.id), greeted, received)).toEqual([]);
  expect(registry.log.named("error")).toEqual([]);
  for (const x of nodes) expect([...x.log.named("error"), ...x.log.named("greet-failed"), ...x.log.named("warning")]).toEqual([]);
}

/** Copies of the mesh's CA, registry and node-0 files into `dir`, which a test then replaces: the files the processes run with. */
async function liveFiles(dir: string): Promise<{ registry: KeyPair; node0: KeyPair }> {
  mkdirSync(dir, { recursive: true });
  const copy = (from: KeyPair, name: string): KeyPair => {
    const to = { cert: join(dir, `${name}.pem`), key: join(dir, `${name}.key`) };
    copyFileSync(from.cert, to.cert);
    copyFileSync(from.key, to.key);
    return to;
  };
  copy({ cert: certs.mesh.ca, key: certs.mesh.caKey }, "ca");
  return { registry: copy(certs.mesh.registry!, "registry"), node0: copy(certs.node("node-0"), "node-0") };
}

/** Renews the registry's and node-0's certificates in place with certs.ts (same CA), as `bun run certs` would; their new serials. */
async function renew(dir: string): Promise<{ registry: string; node0: string }> {
  const set = await makeCerts(dir, { ids: ["node-0"], days: 2 });
  const serial = async (path: string) => new X509Certificate(await Bun.file(path).text()).serialNumber;
  return { registry: await serial(set.registry!.cert), node0: await serial(set.nodes[0]!.cert) };
}

/** The serial number of the certificate served on `port` now (a fresh connection, node-2's certificate presented). */
async function servedSerial(port: number, serverName: string): Promise<string> {
  const got = Promise.withResolvers<string>();
  const pair = certs.node("node-2");
  const s = await Bun.connect({
    hostname: "127.0.0.1",
    port,
    tls: { ca: Bun.file(certs.mesh.ca), cert: Bun.file(pair.cert), key: Bun.file(pair.key), serverName, rejectUnauthorized: false },
    socket: { handshake: (s) => got.resolve(s.getPeerX509Certificate().serialNumber), data() {}, close: () => got.resolve("(closed)") },
  });
  try {
    return await withDeadline(got.promise, 5_000, `the certificate on port ${port}`);
  } finally {
    s.terminate();
  }
}

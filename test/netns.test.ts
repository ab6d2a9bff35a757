/**
 * Registry and nodes on separate network stacks: every host is a network
 * namespace on a private test bridge (test/netns.ts), and the real scripts
 * run inside them. What loopback tests cannot show: the address the registry
 * hands out is the one other hosts can reach, over IPv4 and IPv6; a host
 * that falls silent (no FIN) is evicted by the heartbeat; the dial-back probe
 * refuses an address nobody can reach; mutual TLS with certificates for the
 * hosts' own addresses.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { makeCerts } from "../certs.ts";
import { formatAddress } from "../net.ts";
import { RedisServer, greetingsOf, meshProblems, redisUnavailable, waitUntil, withDeadline, type NodeLine, type NodeProc as HarnessNodeProc, type Proc, type RegistryLine, type RegistryProc } from "../harness.ts";
import { SUBNET4, SUBNET6, UNUSED4, createNetwork, inNamespace, netnsUnavailable, removeOwn, type Host } from "./netns.ts";

const unavailable = await netnsUnavailable();
if (unavailable) console.log(`SKIP netns: ${unavailable}`);
else if (redisUnavailable) console.log(`SKIP redis: ${redisUnavailable}`);

const TEST_MS = 40_000;
const WAIT_MS = 15_000;

afterAll(async () => {
  if (!unavailable) await removeOwn();
});

describe.skipIf(unavailable !== null)("across hosts (network namespaces)", () => {
  // On `::` the registry sees IPv4 nodes as ::ffff:a.b.c.d; what it hands out must still be the plain IPv4 address.
  test.each(["0.0.0.0", "::"])("full mesh over IPv4: registry on %s hands out each host's own address", async (bind) => {
    await using net = await createNetwork(["r", "a", "b", "c"]);
    await meshAcrossHosts(net.host("r"), [net.host("a"), net.host("b"), net.host("c")], 4, bind);
  }, TEST_MS);

  test("full mesh over IPv6: registry on :: hands out each host's IPv6 address", async () => {
    await using net = await createNetwork(["r", "a", "b", "c"]);
    await meshAcrossHosts(net.host("r"), [net.host("a"), net.host("b"), net.host("c")], 6);
  }, TEST_MS);

  test("a host cut off without a FIN is evicted by the heartbeat; the others get peer-left timeout", async () => {
    await using net = await createNetwork(["r", "a", "b", "c"]);
    const [a, b, c] = [net.host("a"), net.host("b"), net.host("c")];
    const reg = await registryOn(net.host("r"), "0.0.0.0", ["--heartbeat", "200", "--heartbeat-misses", "3"]);
    const nodes = await Promise.all([a, b, c].map((h) => nodeOn(h, net.host("r").ipv4, reg.port)));
    await reg.log.waitForWhere("mesh-complete", (e) => e.nodes === 3, WAIT_MS, "mesh-complete with 3 nodes");
    const [na, nb, nc] = nodes as [NodeProc, NodeProc, NodeProc];

    await c.cutOff();

    const left = await reg.log.waitForWhere("node-left", (e) => e.id === nc.id, WAIT_MS, `registry to drop ${nc.id}`);
    expect(left.reason).toBe("timeout");
    for (const n of [na, nb]) {
      const e = await n.log.waitForWhere("peer-left", (x) => x.peer === nc.id, WAIT_MS, `peer-left ${nc.id} on ${n.host.name}`);
      expect(e.reason).toBe("timeout");
    }
    // Silence, not a crash: the cut-off node still runs, and the survivors stay listed.
    expect(nc.proc.exitCode).toBeNull();
    expect(reg.log.named("node-left").map((e) => e.id)).toEqual([nc.id]);
    expect([...na.log.named("peer-left"), ...nb.log.named("peer-left")].map((e) => e.peer)).toEqual([nc.id, nc.id]);
  }, TEST_MS);

  test("mutual TLS across hosts: the registry's certificate names its addresses, every node's its id; a token is warned about only without TLS", async () => {
    await using net = await createNetwork(["r", "a", "b", "c"]);
    const dir = mkdtempSync(join(tmpdir(), "netns-certs-"));
    try {
      const ids = ["alpha", "bravo", "charlie"];
      // The hosts' addresses come from netns.ts: the registry host is always .1.
      const set = await makeCerts(dir, { ids, names: ["registry.test"], ips: [`${SUBNET4}.1`, `${SUBNET6}1`], days: 2 });
      const r = net.host("r");
      const tlsArgs = ["--tls-cert", set.registry!.cert, "--tls-key", set.registry!.key, "--tls-client-ca", set.ca];
      const reg = await registryOn(r, "::", tlsArgs, { REGISTRY_TOKEN: "s3cret" });
      const hosts = [net.host("a"), net.host("b"), net.host("c")];
      // Over IPv4 and IPv6 alike: each checks the registry's certificate against the address it dialed.
      const nodes = await Promise.all(
        hosts.map((h, i) => {
          const pair = set.nodes[i]!;
          return nodeOn(h, i === 2 ? r.ipv6 : r.ipv4, reg.port, ["--tls-ca", set.ca, "--tls-cert", pair.cert, "--tls-key", pair.key], { REGISTRY_TOKEN: "s3cret" });
        }),
      );
      expect(nodes.map((n) => n.id)).toEqual(ids);
      await reg.log.waitForWhere("mesh-complete", (e) => e.nodes === 3, WAIT_MS, "mesh-complete with 3 nodes");
      const count = (event: NodeLine["event"]) => nodes.reduce((sum, n) => sum + n.log.named(event).length, 0);
      await waitUntil(() => count("greeted") >= 3 && count("greeting") >= 3, WAIT_MS, "3 greeted and greeting events");
      const { greeted, received } = greetingsOf(nodes);
      expect(meshProblems(ids, greeted, received)).toEqual([]);
      expect(reg.log.named("node-registered").map((e) => [e.id, e.host]).sort()).toEqual(hosts.map((h, i) => [ids[i]!, i === 2 ? h.ipv6 : h.ipv4]).sort());
      const all: Proc<RegistryLine | NodeLine>[] = [reg, ...nodes];
      for (const p of all) expect([...p.log.named("error"), ...p.log.named("warning"), ...p.log.named("greet-failed")]).toEqual([]);

      // The same token without TLS, across the link: both ends say so once, at start.
      const plain = await registryOn(r, "::", [], { REGISTRY_TOKEN: "s3cret" });
      const exposed = await nodeOn(hosts[0]!, r.ipv4, plain.port, [], { REGISTRY_TOKEN: "s3cret" });
      const both: Proc<RegistryLine | NodeLine>[] = [plain, exposed];
      for (const p of both) {
        expect(p.log.named("warning").map((e) => e.message)).toEqual([expect.stringMatching(/^the token travels in clear /)]);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, TEST_MS);

  test("the dial-back probe refuses an advertised address nobody has; without --allow-advertise it is not allowed", async () => {
    await using net = await createNetwork(["r", "a", "b"]);
    const [r, a, b] = [net.host("r"), net.host("a"), net.host("b")];
    for (const h of net.hosts) expect([h.ipv4, h.ipv6]).not.toContain(UNUSED4);
    const lenient = await registryOn(r, "0.0.0.0", ["--allow-advertise"]);
    const strict = await registryOn(r, "0.0.0.0");

    const ghost = a.spawn("client.ts", [r.ipv4, String(lenient.port), "--json", "--advertise", UNUSED4, "--give-up-after", "4000"], {}, "ghost@a");
    const refused = a.spawn("client.ts", [r.ipv4, String(strict.port), "--json", "--advertise", UNUSED4], {}, "refused@a");
    // Control: the probe passes when the advertised address is real, so the refusal above is about reachability.
    const honest = await nodeOn(b, r.ipv4, lenient.port, ["--advertise", b.ipv4]);

    // Nobody is there: silence (unavailable, retried until the ghost gives up) or, once the
    // neighbour table knows, "no route to host" (unreachable, final): the same text either way.
    const first = await ghost.log.waitFor("error", WAIT_MS, "the ghost node's error");
    expect(first.message).toContain(`${UNUSED4}:`);
    expect(first.message).toContain("--advertise");
    expect(await withDeadline(ghost.exited(), WAIT_MS, "the ghost node to give up")).toBe(1);
    const ghostCodes = new Set(ghost.log.named("error").map((e) => e.code));
    expect([...ghostCodes].every((c) => c === "unavailable" || c === "unreachable")).toBe(true);

    const notAllowed = await refused.log.waitFor("error", WAIT_MS, "the refused node's error");
    expect(notAllowed.code).toBe("address-not-allowed");
    expect(notAllowed.message).toContain(UNUSED4);
    expect(await withDeadline(refused.exited(), WAIT_MS, "the refused node to exit")).not.toBe(0);

    // The registries' own reports come on other pipes than the nodes': wait for them rather than assume order.
    await lenient.log.waitForWhere("node-registered", (e) => e.id === honest.id, WAIT_MS, "the honest node's registration");
    await lenient.log.waitFor("error", WAIT_MS, "the lenient registry's error");
    await strict.log.waitFor("error", WAIT_MS, "the strict registry's error");
    expect(lenient.log.named("node-registered").map((e) => [e.id, e.host])).toEqual([[honest.id, b.ipv4]]);
    expect(lenient.log.named("error").every((e) => e.code === "unavailable" || e.code === "unreachable")).toBe(true);
    expect(strict.log.named("node-registered")).toEqual([]);
    expect(strict.log.named("error").map((e) => e.code)).toEqual(["address-not-allowed"]);
  }, TEST_MS);
});

describe.skipIf(unavailable !== null || redisUnavailable !== null)("several registries across hosts (network namespaces)", () => {
  test("registries on two hosts, the store on a third, nodes on three more: a full mesh; a registry killed, its nodes fail over across hosts", async () => {
    await using net = await createNetwork(["s", "r1", "r2", "a", "b", "c"]);
    const [s, r1, r2] = [net.host("s"), net.host("r1"), net.host("r2")];
    await using store = await RedisServer.start({ host: s.ipv4, prefix: inNamespace(s.ns) });
    const regs = [await registryOn(r1, "0.0.0.0", ["--store", store.url]), await registryOn(r2, "0.0.0.0", ["--store", store.url])];
    const hosts = [net.host("a"), net.host("b"), net.host("c")];
    const nodes = await Promise.all(hosts.map((h) => nodeOn(h, r1.ipv4, regs[0]!.port, ["--registry", `${r2.ipv4}:${regs[1]!.port}`])));
    const ids = nodes.map((n) => n.id).sort();
    const count = (event: NodeLine["event"]) => nodes.reduce((sum, n) => sum + n.log.named(event).length, 0);
    await waitUntil(() => count("greeted") >= 3 && count("greeting") >= 3, WAIT_MS, "3 greeted and greeting events").catch((e: Error) => {
      // A store the registries cannot reach shows only as a split mesh: say what each process last reported.
      throw new Error(`${e.message}; ${[...regs, ...nodes].map((p) => `${p.label}: ${JSON.stringify(p.log.events.slice(-4))}`).join("; ")}`);
    });
    const { greeted, received } = greetingsOf(nodes);
    expect(meshProblems(ids, greeted, received)).toEqual([]);
    // Both registries list all three at their own hosts' addresses, wherever each registered.
    for (const reg of regs) {
      await waitUntil(() => [...listedBy(reg).keys()].sort().join() === ids.join(), WAIT_MS, `${reg.label} to list all three`);
      expect([...listedBy(reg)].sort()).toEqual(nodes.map((n) => [n.id, n.host.ipv4] as [string, string]).sort());
    }

    const on = (n: NodeProc) => String(n.log.named("registered").at(-1)!.registry);
    const moving = nodes.filter((n) => on(n) === `${r1.ipv4}:${regs[0]!.port}`);
    const before = new Map(moving.map((n) => [n, n.log.named("registered").length]));
    await regs[0]!.kill();
    for (const n of moving) {
      await n.log.waitForCount("registered", before.get(n)! + 1, WAIT_MS, `${n.host.name}'s node to register with r2`);
      expect(on(n)).toBe(`${r2.ipv4}:${regs[1]!.port}`);
    }
    await waitUntil(() => [...listedBy(regs[1]!).keys()].sort().join() === ids.join(), WAIT_MS, "r2 to list all three again");
    for (const n of nodes) expect(n.log.named("error")).toEqual([]);
    // Nobody greeted anybody twice across the failover.
    expect(meshProblems(ids, greetingsOf(nodes).greeted, greetingsOf(nodes).received)).toEqual([]);
  }, TEST_MS);
});

/** A registry's list as its events tell it (every registry reports every change of a shared list): id -> host. */
function listedBy(reg: RegistryProc): Map<string, string> {
  const list = new Map<string, string>();
  for (const e of reg.log.events) {
    if (e.event === "node-registered") list.set(e.id, e.host);
    else if (e.event === "node-left") list.delete(e.id);
  }
  return list;
}

// --- internal ----------------------------------------------------------------

type NodeProc = HarnessNodeProc & { host: Host };

/** Registry on `host`, nodes on `nodeHosts` given only the registry's address; checks mesh and addresses. */
async function meshAcrossHosts(host: Host, nodeHosts: Host[], family: 4 | 6, bind = "::"): Promise<void> {
  const addr = (h: Host) => (family === 4 ? h.ipv4 : h.ipv6);
  const reg = await registryOn(host, bind);
  const nodes = await Promise.all(nodeHosts.map((h) => nodeOn(h, addr(host), reg.port)));
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const pairs = (nodes.length * (nodes.length - 1)) / 2;

  await reg.log.waitForWhere("mesh-complete", (e) => e.nodes === nodes.length, WAIT_MS, `mesh-complete with ${nodes.length} nodes`);
  // Both ends report a greeting, each on its own stdout; wait for all of them.
  const count = (event: NodeLine["event"]) => nodes.reduce((sum, n) => sum + n.log.named(event).length, 0);
  await waitUntil(() => count("greeted") >= pairs && count("greeting") >= pairs, WAIT_MS, `${pairs} greeted and greeting events`);

  const { greeted, received } = greetingsOf(nodes);
  expect(meshProblems(nodes.map((n) => n.id), greeted, received)).toEqual([]);

  // The registry lists each node under the address it connected from, which is its host's own.
  const registered = reg.log.named("node-registered");
  expect(registered.map((e) => [e.id, e.host, e.source, e.port]).sort()).toEqual(
    nodes.map((n) => [n.id, addr(n.host), addr(n.host), n.port]).sort(),
  );
  for (const n of nodes) {
    const self = formatAddress(addr(n.host), n.port);
    expect(n.log.named("registered").map((e) => e.address)).toEqual([self]);
    // Whom it greeted, it reached at that node's own host address; who greeted it said its own.
    for (const e of n.log.named("greeted")) {
      const peer = byId.get(e.peer)!;
      expect(e.address).toBe(formatAddress(addr(peer.host), peer.port));
    }
    for (const e of n.log.named("greeting")) {
      const peer = byId.get(e.peer)!;
      expect(e.address).toBe(formatAddress(addr(peer.host), peer.port));
    }
    expect(n.log.named("error")).toEqual([]);
    expect(n.log.named("greet-failed")).toEqual([]);
  }
  expect(reg.log.named("error")).toEqual([]);
}

async function registryOn(host: Host, bind: string, extra: string[] = [], env: Record<string, string> = {}): Promise<RegistryProc> {
  const p = host.spawn<RegistryLine>("registry.ts", [bind, "0", "--json", ...extra], env, `registry@${host.name}`);
  const e = await p.log.waitFor("listening", WAIT_MS, `registry on ${host.name} to listen`).catch((err) => {
    throw new Error(`${(err as Error).message}; stderr: ${p.stderr.join("\n")}`);
  });
  return Object.assign(p, { port: e.port });
}

async function nodeOn(host: Host, registryHost: string, registryPort: number, extra: string[] = [], env: Record<string, string> = {}): Promise<NodeProc> {
  const p = host.spawn<NodeLine>("client.ts", [registryHost, String(registryPort), "--json", "--name", host.name, ...extra], env, `node@${host.name}`);
  try {
    const l = await p.log.waitFor("listening", WAIT_MS, `node on ${host.name} to listen`);
    await p.log.waitFor("registered", WAIT_MS, `node on ${host.name} to register`);
    return Object.assign(p, { id: l.id, port: l.port, host });
  } catch (err) {
    const events = p.log.events.map((e) => JSON.stringify(e)).join("\n");
    throw new Error(`${(err as Error).message}; events: ${events}; stderr: ${p.stderr.join("\n")}`);
  }
}

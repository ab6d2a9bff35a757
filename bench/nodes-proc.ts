/**
 * In-process nodes (startNode) in one process, for the mesh, departure and
 * recovery measurements. Prints the events the orchestrator asks for as JSON
 * lines with a wall-clock time and the index of the node that saw them.
 *
 * Commands on stdin:
 *   {"cmd":"start","n":N,"registryPort":P,"events":["peer-left",...]} -> nodes started one after another
 *   {"cmd":"mesh","n":N,"registryPort":P,"timeoutMs":T,"certs":DIR} -> start N nodes one after another, time the full mesh;
 *     with `certs` (a `bun run certs` directory with node-0 ... node-<N-1>), node i runs in mutual TLS as node-i
 *   {"cmd":"stop"} -> kill every node (no goodbye)
 */
import { join } from "node:path";
import { startNode, type PeerNode } from "../client.ts";
import { type Transport } from "../net.ts";
import { tls } from "../tls.ts";
import { emit, serveCommands, wallMs, type Msg } from "./lib.ts";

const nodes: PeerNode[] = [];

serveCommands(async (cmd) => {
  switch (cmd.cmd) {
    case "start":
      return start(cmd);
    case "mesh":
      return mesh(cmd);
    case "stop": {
      for (const n of nodes) n.kill();
      const count = nodes.length;
      nodes.length = 0;
      return { stopped: count };
    }
    default:
      throw new Error(`unknown command ${String(cmd.cmd)}`);
  }
});
emit({ event: "ready", pid: process.pid });

async function start(cmd: Msg): Promise<Msg> {
  const n = Number(cmd.n);
  const wanted = new Set((cmd.events as string[] | undefined) ?? []);
  const started = performance.now();
  for (let i = 0; i < n; i++) {
    const idx = nodes.length;
    const node = await startNode({
      registryHost: "127.0.0.1",
      registryPort: Number(cmd.registryPort),
      listenHost: "127.0.0.1",
      onEvent: (e) => {
        if (wanted.has(e.event)) emit({ ...e, node: idx, t: wallMs() });
      },
    });
    nodes.push(node);
  }
  return { ms: performance.now() - started, ids: nodes.map((x) => x.id) };
}

async function mesh(cmd: Msg): Promise<Msg> {
  const n = Number(cmd.n);
  const pairs = (n * (n - 1)) / 2;
  const timeoutMs = Number(cmd.timeoutMs ?? 60_000);
  let greeted = 0;
  let failed = 0;
  const complete = Promise.withResolvers<void>();
  const onEvent = (e: { event: string }) => {
    if (e.event === "greeted" && ++greeted === pairs) complete.resolve();
    else if (e.event === "greet-failed") failed++;
  };
  const t0 = performance.now();
  const dir = cmd.certs === undefined ? undefined : String(cmd.certs);
  const transport = (i: number): Transport | undefined =>
    dir === undefined ? undefined : tls({ ca: join(dir, "ca.pem"), meshCa: join(dir, "ca.pem"), cert: join(dir, `node-${i}.pem`), key: join(dir, `node-${i}.key`) });
  for (let i = 0; i < n; i++) {
    nodes.push(await startNode({ registryHost: "127.0.0.1", registryPort: Number(cmd.registryPort), listenHost: "127.0.0.1", transport: transport(i), onEvent }));
  }
  const joinedMs = performance.now() - t0;
  if (pairs === 0) complete.resolve();
  const timer = setTimeout(() => complete.resolve(), timeoutMs);
  await complete.promise;
  clearTimeout(timer);
  const meshMs = performance.now() - t0;
  // Every node's own view of whom it met: both ends of each pair must agree.
  let met = 0;
  for (const node of nodes) met += node.met().length;
  for (const node of nodes) node.kill();
  nodes.length = 0;
  return { n, pairs, greeted, failed, met, complete: greeted >= pairs, joinedMs, meshMs, greetingsPerSec: greeted / (meshMs / 1000) };
}

/**
 * Hosts made of Linux network namespaces, for tests that need separate
 * network stacks: one "switch" namespace holds a bridge, every host is a
 * namespace with a veth whose other end is a port of that bridge.
 *
 * The bridge lives in a namespace of its own, not in the root one, because a
 * Docker engine on the machine sets the root FORWARD policy to DROP and makes
 * bridged frames pass iptables: a root bridge would silently drop our traffic.
 * Nothing here touches the root namespace's links, firewall or sysctls.
 *
 * Only the addresses below are used, and only inside the namespaces created
 * here. Names carry the test process id, so concurrent runs never collide and
 * leftovers of a crashed run can be told apart from a live one.
 */
import { existsSync, readFileSync } from "node:fs";
import { exec, spawnScript, type JsonEvent, type Proc } from "../harness.ts";

/** Name prefix of everything this process creates; `crn<pid>-`. */
export const PREFIX = `crn${process.pid}-`;

/** The private test subnets; hosts get `.<n>` / `<n>` appended. */
export const SUBNET4 = "10.213.77";
export const SUBNET6 = "fd00:213:77::";

/** An address inside the test subnets that no host is ever given. */
export const UNUSED4 = `${SUBNET4}.99`;
export const UNUSED6 = `${SUBNET6}99`;

export interface Host {
  /** Short name given at creation ("r", "a", ...). */
  readonly name: string;
  /** The namespace: pass to `ip netns exec`. */
  readonly ns: string;
  readonly ipv4: string;
  readonly ipv6: string;
  /** Starts `bun <script> ...args` inside this host, stdout/stderr piped; the network kills it on dispose. */
  spawn<E extends { event: string } = JsonEvent>(script: string, args: string[], env?: Record<string, string>, label?: string): Proc<E>;
  /** Takes the host's only link down from inside it: its peers see silence, no FIN or RST. */
  cutOff(): Promise<void>;
}

export interface TestNetwork extends AsyncDisposable {
  readonly hosts: readonly Host[];
  host(name: string): Host;
}

/**
 * Why this machine cannot build namespace hosts, or null if it can. Tries the
 * real thing (a namespace with a bridge and a veth in it) and removes it again.
 */
export async function netnsUnavailable(): Promise<string | null> {
  if (process.platform !== "linux") return `not Linux (${process.platform})`;
  if (process.getuid?.() !== 0) return "not root (creating network namespaces needs CAP_SYS_ADMIN and CAP_NET_ADMIN)";
  if (!ipBinary()) return "no `ip` binary (iproute2) on PATH";
  const probe = `${PREFIX}probe`;
  try {
    await ip(["netns", "add", probe]);
  } catch (e) {
    return `\`ip netns add\` failed: ${(e as Error).message}`;
  }
  try {
    await ip(["-n", probe, "link", "add", "sw0", "type", "bridge"]);
    await ip(["-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"]);
    return null;
  } catch (e) {
    return `cannot create a bridge or veth in a namespace: ${(e as Error).message}`;
  } finally {
    await ip(["netns", "del", probe]).catch(() => {});
  }
}

/**
 * Builds a switch and one host per name, each with `SUBNET4.<n>` and
 * `SUBNET6<n>` (n = 1, 11, 12, ...: the first host is 1, the rest from 11).
 * Dispose it (`await using`) to kill what runs in it and delete it all.
 */
export async function createNetwork(names: string[]): Promise<TestNetwork> {
  await removeStale();
  const id = `${PREFIX}${++networks}`;
  const sw = `${id}-sw`;
  const created: string[] = [];
  const procs = new Set<Proc>();
  const hosts: Host[] = [];

  const dispose = async () => {
    await Promise.allSettled(Array.from(procs, (p) => p[Symbol.asyncDispose]()));
    // Deleting a namespace deletes the veth ends in it, and with them their peers.
    await Promise.allSettled(created.map((ns) => ip(["netns", "del", ns])));
  };

  try {
    await ip(["netns", "add", sw]);
    created.push(sw);
    // No multicast snooping: without an MLD querier on the segment it could hold back IPv6 neighbour discovery.
    await ip(["-n", sw, "link", "add", "sw0", "type", "bridge", "mcast_snooping", "0"]);
    await ip(["-n", sw, "link", "set", "sw0", "up"]);
    for (const [i, name] of names.entries()) {
      if (!/^[a-z0-9]{1,8}$/.test(name)) throw new Error(`host name must be 1-8 of a-z 0-9, got "${name}"`);
      const ns = `${id}-${name}`;
      const n = i === 0 ? 1 : 10 + i;
      const port = `p-${name}`;
      await ip(["netns", "add", ns]);
      created.push(ns);
      // Both veth ends are created inside namespaces, so no name ever appears in the root namespace.
      await ip(["-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns]);
      await ip(["-n", sw, "link", "set", port, "master", "sw0", "up"]);
      await ip(["-n", ns, "link", "set", "lo", "up"]);
      await ip(["-n", ns, "addr", "add", `${SUBNET4}.${n}/24`, "dev", "eth0"]);
      // nodad: the address is usable at once instead of after duplicate-address detection.
      await ip(["-n", ns, "-6", "addr", "add", `${SUBNET6}${n}/64`, "dev", "eth0", "nodad"]);
      await ip(["-n", ns, "link", "set", "eth0", "up"]);
      hosts.push({
        name,
        ns,
        ipv4: `${SUBNET4}.${n}`,
        ipv6: `${SUBNET6}${n}`,
        spawn<E extends { event: string } = JsonEvent>(script: string, args: string[], env: Record<string, string> = {}, label = `${script}@${name}`) {
          const p = spawnInNamespace<E>(ns, script, args, env, label);
          procs.add(p);
          return p;
        },
        async cutOff() {
          await ip(["-n", ns, "link", "set", "eth0", "down"]);
        },
      });
    }
  } catch (e) {
    await dispose();
    throw e;
  }

  return {
    hosts,
    host(name) {
      const h = hosts.find((x) => x.name === name);
      if (!h) throw new Error(`no host "${name}" in this network`);
      return h;
    },
    [Symbol.asyncDispose]: dispose,
  };
}

/** `bun <script> ...args` inside namespace `ns`; `ip netns exec` execs, so the pid is bun's own. */
export function spawnInNamespace<E extends { event: string } = JsonEvent>(ns: string, script: string, args: string[], env: Record<string, string> = {}, label = script): Proc<E> {
  return spawnScript<E>(script, args, { env, label, prefix: inNamespace(ns) });
}

/** The command prefix that runs a program inside namespace `ns` (it execs: the pid is the program's). */
export function inNamespace(ns: string): string[] {
  return [ipBinary() ?? "ip", "netns", "exec", ns];
}

/** Deletes every namespace this process created (afterAll safety net). */
export async function removeOwn(): Promise<void> {
  const own = (await listNamespaces()).filter((ns) => ns.startsWith(PREFIX));
  await Promise.allSettled(own.map((ns) => ip(["netns", "del", ns])));
}

/**
 * Removes namespaces of earlier runs whose process is gone (a crashed or
 * killed run), and the processes that run leaves behind in them. Namespaces
 * of a live run are left alone.
 */
export async function removeStale(): Promise<string[]> {
  const stale = (await listNamespaces()).filter((ns) => {
    const m = /^crn(\d+)-/.exec(ns);
    return m && Number(m[1]) !== process.pid && !isLiveBun(Number(m[1]));
  });
  for (const ns of stale) {
    const pids = await ip(["netns", "pids", ns]).catch(() => "");
    for (const pid of pids.split(/\s+/).filter(Boolean)) {
      try {
        process.kill(Number(pid), "SIGKILL");
      } catch {
        // already gone
      }
    }
    await ip(["netns", "del", ns]).catch(() => {});
  }
  return stale;
}

/** Runs `ip ...args` with a deadline; resolves with stdout, rejects with stderr. */
export async function ip(args: string[], timeoutMs = 10_000): Promise<string> {
  const r = await exec([ipBinary() ?? "ip", ...args], timeoutMs);
  if (r.code !== 0) throw new Error(`ip ${args.join(" ")} exited ${r.code}: ${r.stderr.trim() || r.stdout.trim()}`);
  return r.stdout;
}

// --- internal ----------------------------------------------------------------

let networks = 0;

function ipBinary(): string | null {
  return Bun.which("ip") ?? ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"].find((p) => existsSync(p)) ?? null;
}

async function listNamespaces(): Promise<string[]> {
  // Lines look like "name (id: 3)" or just "name".
  const out = await ip(["netns", "list"]);
  return out
    .split("\n")
    .map((l) => l.trim().split(/\s+/)[0] ?? "")
    .filter(Boolean);
}

/** True if `pid` is a running bun process: a run still using its namespaces. */
function isLiveBun(pid: number): boolean {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").includes("bun");
  } catch {
    return false;
  }
}

#!/usr/bin/env bun
/**
 * The container check (`bun run test:docker`): builds the image, runs a
 * registry and three nodes on a Docker network this run creates, and checks
 * from the nodes' --json output that they formed a full mesh at the
 * addresses Docker gave them; then the image's HEALTHCHECK for both roles
 * (the registry's through /healthz; a frozen node turns unhealthy), a
 * graceful `docker stop`, the entrypoint's role handling and its --help and
 * --version without a role, a registry and nodes speaking IPv6 only (when
 * the engine allows an IPv6 network), and compose.yaml with `--scale
 * client=5` and a token (when `docker compose` or `docker-compose` exists),
 * readable logs unless LOG_JSON=1, and compose.ha.yaml (two registries on a
 * Redis store, nodes given both: a full mesh, every registry listing every
 * node, and the nodes of a registry killed with -9 failing over; when a
 * `redis:7` image is present, since no test pulls one).
 * compose.tls.yaml: a mesh in mutual TLS whose certificates (made here by
 * certs.ts) are mounted as secrets.
 *
 * Without a usable engine (`docker info` fails, or the oven/bun base image is
 * missing) it prints one line `SKIP docker: <reason>` and exits 0; with
 * --require (or DOCKER_TEST_REQUIRE=1) that is a failure, exit 1. Otherwise
 * it ends with `docker: N passed, N failed[, N skipped]`, exit 0 only if
 * nothing failed. Containers and networks carry a label with this run's pid
 * and are removed in `finally`; leftovers of a run that was killed are
 * removed by the next run. Waits are for log lines or states under
 * deadlines, never for time.
 */
import { defineCommand, runMain } from "citty";
import { chownSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { makeCerts } from "../certs.ts";
import { checkFlags, intArg, runCli, UsageError } from "../cli.ts";
import { ROOT, Proc, exec, greetingsOf, meshProblems, waitUntil, withDeadline, type JsonEvent, type NodeLine } from "../harness.ts";
import { Abort, CheckRun, tail, type Exec } from "./check-run.ts";

const LABEL = "contact-registry-test.pid";

export const command = defineCommand({
  meta: { name: "docker-test", description: "Build the image and check a registry + nodes mesh in Docker (skips without an engine)." },
  args: {
    image: { type: "string", description: "Tag to build and test", default: "contact-registry:test" },
    nodes: { type: "string", description: "Node containers in the mesh check", default: "3" },
    timeout: { type: "string", description: "Give up after this many seconds, build included", default: "300" },
    require: { type: "boolean", description: "A missing engine or base image is a failure, not a skip [env DOCKER_TEST_REQUIRE=1]" },
    ipv6: { type: "boolean", description: "Also check an IPv6 network when the engine allows one; --no-ipv6 to leave it out", default: true },
  },
  async run({ args, rawArgs }) {
    await runCli(async () => {
      checkFlags(rawArgs, command.args as Record<string, { type?: string }>);
      const nodes = intArg("nodes", args.nodes, 2);
      if (nodes > 20) throw new UsageError("--nodes: at most 20 (this is a correctness check, not a benchmark)");
      const code = await main({
        image: String(args.image),
        nodes,
        timeoutMs: intArg("timeout", args.timeout, 10) * 1000,
        require: Boolean(args.require) || process.env.DOCKER_TEST_REQUIRE === "1",
        ipv6: args.ipv6 !== false,
      });
      process.exit(code);
    });
  },
});

export interface DockerTestOptions {
  image: string;
  nodes: number;
  timeoutMs: number;
  require: boolean;
  ipv6: boolean;
}

/** Runs every check; returns the exit code. */
export async function main(o: DockerTestOptions): Promise<number> {
  const started = performance.now();
  const docker = Bun.which("docker") ?? "/usr/bin/docker";
  const baseImages = baseImagesOf(await Bun.file(join(ROOT, "Dockerfile")).text());
  const unusable = await engineProblem(docker, baseImages);
  if (unusable) {
    process.stdout.write(`SKIP docker: ${unusable}\n`);
    return o.require ? 1 : 0;
  }

  const run = new Run(docker, o, baseImages.at(-1)!);
  const onSignal = () => {
    // Cleanup first, so an interrupted run leaves no containers behind.
    void run.cleanup().finally(() => process.exit(130));
  };
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  try {
    await withDeadline(run.all(), o.timeoutMs, "the docker checks").catch((e: Error) => run.fail("overall deadline", e.message));
  } finally {
    await run.cleanup();
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  }
  const secs = ((performance.now() - started) / 1000).toFixed(1);
  process.stdout.write(`took ${secs}s\n`);
  process.stdout.write(run.summary("docker"));
  return run.failed ? 1 : 0;
}

// --- internal ----------------------------------------------------------------

class Run extends CheckRun {
  private readonly tag = `crtest-${process.pid}-${crypto.randomUUID().slice(0, 6)}`;
  private readonly containers = new Set<string>();
  private readonly networks = new Set<string>();
  private readonly followers = new Set<Proc>();
  /** `docker run` / `network create` still running: cleanup waits for them, or what they create would outlive it. */
  private readonly creating = new Set<Promise<unknown>>();
  private stopping = false;
  /** compose projects to take down: the command prefix and its environment. */
  private readonly composeProjects = new Map<string, { base: string[]; env: Record<string, string | undefined> }>();

  constructor(
    private readonly docker: string,
    private readonly o: DockerTestOptions,
    /** The runtime stage's base, to tell what the image adds to it. */
    private readonly runtimeBase: string,
  ) {
    super();
  }

  async all(): Promise<void> {
    await this.removeLeftovers();
    await this.runAll(async () => {
      await this.build();
      await this.entrypoint();
      await this.mesh();
      if (this.o.ipv6) await this.ipv6();
      await this.compose();
      await this.composeHa();
      await this.composeTls();
    });
  }

  private async build(): Promise<void> {
    await this.check(
      "image builds",
      async () => {
        const t = performance.now();
        const r = await this.exec(["build", "-t", this.o.image, ROOT], 280_000);
        if (r.code !== 0) throw new Error(`docker build exited ${r.code}:\n${tail(r.stdout + r.stderr, 30)}`);
        const size = Number((await this.execOk(["image", "inspect", "-f", "{{.Size}}", this.o.image])).trim());
        const base = Number((await this.execOk(["image", "inspect", "-f", "{{.Size}}", this.runtimeBase])).trim());
        process.stdout.write(`image ${this.o.image}: ${human(size)} (${size} bytes; ${human(size - base)} over its base ${this.runtimeBase})\n`);
        return `${((performance.now() - t) / 1000).toFixed(1)}s`;
      },
      true,
    );
    await this.check("runtime stage runs as a non-root user, with a HEALTHCHECK and no EXPOSE", async () => {
      const cfg = JSON.parse(await this.execOk(["image", "inspect", "-f", "{{json .Config}}", this.o.image])) as {
        User?: string;
        Healthcheck?: { Test?: string[] };
        ExposedPorts?: Record<string, unknown>;
      };
      if (!cfg.User || cfg.User === "root" || cfg.User === "0") throw new Error(`image user is "${cfg.User ?? ""}"`);
      const test = cfg.Healthcheck?.Test?.join(" ") ?? "";
      if (!test.includes("healthcheck.ts")) throw new Error(`no healthcheck.ts HEALTHCHECK, got "${test}"`);
      // Every container of the image would show it, nodes included, which listen on ports the OS picks.
      const exposed = Object.keys(cfg.ExposedPorts ?? {});
      if (exposed.length) throw new Error(`the image exposes ${exposed.join(", ")}`);
      return `user ${cfg.User}`;
    });
  }

  /** The role dispatch: --help for each role, --help and --version without one, usage on an unknown role. */
  private async entrypoint(): Promise<void> {
    const runOnce = (args: string[]) => this.exec(["run", "--rm", "--label", `${LABEL}=${process.pid}`, this.o.image, ...args], 30_000);
    const [reg, cli, bad, help, version] = await Promise.all([
      runOnce(["registry", "--help"]),
      runOnce(["client", "--help"]),
      runOnce(["nonsense"]),
      runOnce(["--help"]),
      runOnce(["--version"]),
    ]);
    const { version: packageVersion } = (await Bun.file(join(ROOT, "package.json")).json()) as { version: string };
    await this.check("`registry --help` prints the registry's usage, exit 0", async () => {
      if (reg.code !== 0 || !/^Usage: bun registry.ts/.test(reg.stdout)) throw new Error(`exit ${reg.code}: ${tail(reg.stdout + reg.stderr, 5)}`);
    });
    await this.check("`client --help` prints the node's usage, exit 0", async () => {
      if (cli.code !== 0 || !/^Usage: bun client.ts/.test(cli.stdout)) throw new Error(`exit ${cli.code}: ${tail(cli.stdout + cli.stderr, 5)}`);
    });
    await this.check("an unknown role says so, exit 2", async () => {
      if (bad.code !== 2 || !bad.stderr.includes('unknown role "nonsense"')) throw new Error(`exit ${bad.code}: ${tail(bad.stdout + bad.stderr, 5)}`);
    });
    await this.check("`--help` without a role lists the roles, exit 0", async () => {
      if (help.code !== 0 || !/^\s+registry \[host\]/m.test(help.stdout) || !/^\s+client <registry-host>/m.test(help.stdout)) {
        throw new Error(`exit ${help.code}: ${tail(help.stdout + help.stderr, 5)}`);
      }
    });
    await this.check("`--version` without a role prints the package's version, exit 0", async () => {
      const want = new RegExp(`^contact-registry ${packageVersion.replaceAll(".", "\\.")} \\(bun \\d+\\.\\d+\\.\\d+\\)$`);
      if (version.code !== 0 || !want.test(version.stdout.trim())) throw new Error(`exit ${version.code}: ${tail(version.stdout + version.stderr, 5)}`);
      return version.stdout.trim();
    });
  }

  /** Registry + N nodes on a fresh IPv4 network: mesh, addresses, health, graceful stop. */
  private async mesh(): Promise<void> {
    const net = await this.network(`${this.tag}-net`, []);
    const registry = `${this.tag}-registry`;
    // With the status server on, the HEALTHCHECK below goes through /healthz
    // (and the image is shown to carry what status.ts needs).
    const reg = await this.start(registry, net, ["registry", "--json"], ["-e", "REGISTRY_HTTP_PORT=8081"]);
    await this.check("registry container listens, status server included", async () => {
      const e = await reg.log.waitFor("listening", 30_000, "the registry's listening event").catch((e: Error) => {
        throw new Error(`${e.message}; its output: ${lastEvents(reg)}`);
      });
      await reg.log.waitFor("http-listening", 15_000, "the status server").catch((e: Error) => {
        throw new Error(`${e.message}; its output: ${lastEvents(reg)}`);
      });
      return `port ${e.port}`;
    }, true);

    const names = Array.from({ length: this.o.nodes }, (_, i) => `${this.tag}-node${i + 1}`);
    const nodes = await Promise.all(names.map((n) => this.start<NodeLine>(n, net, ["client", registry, "8080", "--json"])));
    const ids = new Map<Proc, string>();
    await this.check(`${names.length} node containers register`, async () => {
      await Promise.all(
        nodes.map(async (p) => {
          const l = await p.log.waitFor("listening", 30_000, `${p.label} to listen`);
          ids.set(p, String(l.id));
          await p.log.waitFor("registered", 30_000, `${p.label} to register`).catch((e: Error) => {
            throw new Error(`${e.message}; its output: ${lastEvents(p)}`);
          });
        }),
      );
    }, true);

    await this.check("each node is listed at its own container address", async () => {
      const wrong: string[] = [];
      for (const p of nodes) {
        const ip = (await this.execOk(["inspect", "-f", `{{(index .NetworkSettings.Networks "${net}").IPAddress}}`, p.label])).trim();
        const reg = p.log.named("registered")[0]!;
        const address = String(reg.address);
        if (!address.startsWith(`${ip}:`)) wrong.push(`${p.label} registered as ${address}, container address ${ip}`);
      }
      if (wrong.length) throw new Error(wrong.join("; "));
    });

    const pairs = (names.length * (names.length - 1)) / 2;
    await this.check(`full mesh: each of the ${pairs} pairs exactly one greeted and one greeting`, () => fullMesh(nodes));

    await this.check("the registry reports the mesh complete", async () => {
      const e = await reg.log.waitForWhere("mesh-complete", (e) => e.nodes === names.length, 15_000, "mesh-complete over all nodes");
      return `${e.pairs} pairs`;
    });

    await this.check("HEALTHCHECK: registry and a node become healthy", async () => {
      const [r, n] = await Promise.all([this.healthy(registry), this.healthy(names[0]!)]);
      if (!r.includes("/healthz 200")) throw new Error(`the registry's check did not use /healthz: "${r}"`);
      return `registry "${r}", node "${n}"`;
    });

    const last = nodes.at(-1)!;
    const lastId = ids.get(last)!;
    await this.check("`docker stop` on a node: it leaves cleanly, the others see it go", async () => {
      const r = await this.exec(["stop", "-t", "10", last.label], 30_000);
      if (r.code !== 0) throw new Error(`docker stop exited ${r.code}: ${r.stderr.trim()}`);
      const exit = (await this.execOk(["inspect", "-f", "{{.State.ExitCode}}", last.label])).trim();
      if (exit !== "0") throw new Error(`node exited ${exit}; its output: ${lastEvents(last)}`);
      await Promise.all(
        nodes
          .filter((p) => p !== last)
          .map((p) =>
            p.log.waitForWhere("peer-left", (e) => e.peer === lastId, 15_000, `${p.label} to see ${lastId} leave`).then((e) => {
              if (e.reason !== "leave") throw new Error(`${p.label} saw it leave with reason ${e.reason}, expected leave`);
            }),
          ),
      );
    });

    await this.frozen(names[0]!);
  }

  /**
   * A stopped (SIGSTOP) node still completes TCP handshakes in the kernel: its
   * health check must ask the process, and fail. Last, since the node then
   * stops answering its peers too.
   */
  private async frozen(node: string): Promise<void> {
    const last = await this.healthy(node);
    if (!last.includes("probe-ok")) {
      // The check fell back to a TCP connect: the scripts do not record their ports yet.
      return this.skip("HEALTHCHECK: a frozen node turns unhealthy", `the check does not ask the node yet: "${last}"`);
    }
    await this.check("HEALTHCHECK: a frozen node turns unhealthy", async () => {
      await this.execOk(["kill", "-s", "STOP", node]);
      const output = await this.unhealthy(node);
      await this.execOk(["kill", "-s", "CONT", node]);
      return output;
    });
  }

  /** A registry and two nodes on an IPv6 network, the nodes given the registry's IPv6 address. */
  private async ipv6(): Promise<void> {
    // A random ULA /64 of our own: no other network on this engine has it.
    const hex = () => Math.floor(Math.random() * 0x10000).toString(16);
    const subnet = `fd${hex().padStart(2, "0").slice(0, 2)}:${hex()}:${hex()}::/64`;
    const net = `${this.tag}-v6`;
    this.networks.add(net);
    const r = await this.creates(["network", "create", "--internal", "--label", `${LABEL}=${process.pid}`, "--ipv6", "--subnet", subnet, net], 30_000);
    if (r.code !== 0) return this.skip("IPv6 network", `this engine cannot create one: ${r.stderr.trim()}`);
    const registry = `${this.tag}-registry6`;
    const reg = await this.start(registry, net, ["registry", "--json"]);
    await this.check("IPv6: registry listens on an IPv6 network", async () => {
      await reg.log.waitFor("listening", 30_000, "the IPv6 registry's listening event");
    }, true);
    const v6 = (await this.execOk(["inspect", "-f", `{{(index .NetworkSettings.Networks "${net}").GlobalIPv6Address}}`, registry])).trim();
    if (!v6) return this.fail("IPv6: registry address", `container ${registry} got no IPv6 address on ${net}`);
    const nodes = await Promise.all(["a", "b"].map((s) => this.start<NodeLine>(`${this.tag}-node6${s}`, net, ["client", v6, "8080", "--json"])));
    await this.check(`IPv6: nodes register over IPv6 (registry at [${v6}]) and greet each other`, async () => {
      for (const p of nodes) {
        const e = await p.log.waitFor("registered", 30_000, `${p.label} to register`).catch((e: Error) => {
          throw new Error(`${e.message}; its output: ${lastEvents(p)}`);
        });
        if (!String(e.address).startsWith("[")) throw new Error(`${p.label} registered as ${e.address}, not an IPv6 address`);
      }
      await waitUntil(
        () => nodes.some((p) => p.log.named("greeted").length) && nodes.some((p) => p.log.named("greeting").length),
        30_000,
        "the greeting between the IPv6 nodes",
      );
      return String(nodes[1]!.log.named("registered")[0]!.address);
    });
    await this.check("IPv6: the registry without a status server becomes healthy", () => this.healthy(registry));
  }

  /** compose.yaml as the README runs it: a registry and `--scale client=5`, the token by interpolation. */
  private async compose(): Promise<void> {
    const cmd = await composeCommand(this.docker);
    if (!cmd) return this.skip("compose", "neither `docker compose` nor `docker-compose` is installed");
    const project = `${this.tag}-compose`;
    const token = crypto.randomUUID();
    const base = [...cmd, "-p", project, "-f", join(ROOT, "compose.yaml")];
    await this.check("compose: readable logs unless LOG_JSON=1", async () => {
      const { LOG_JSON: _, ...inherited } = process.env;
      const config = async (env: Record<string, string | undefined>) => {
        const r = await exec([...base, "config"], 30_000, { ...inherited, ...env });
        if (r.code !== 0) throw new Error(`config exited ${r.code}: ${tail(r.stderr, 5)}`);
        return [...r.stdout.matchAll(/^\s*LOG_JSON:\s*(.*)$/gm)].map((m) => m[1]!.replace(/^['"]|['"]$/g, ""));
      };
      const [plain, json] = await Promise.all([config({}), config({ LOG_JSON: "1" })]);
      if (plain.length !== 2 || plain.some((v) => v !== "")) throw new Error(`LOG_JSON by default: ${JSON.stringify(plain)}, expected empty for both services`);
      if (json.length !== 2 || json.some((v) => v !== "1")) throw new Error(`LOG_JSON with LOG_JSON=1: ${JSON.stringify(json)}`);
    });
    // REGISTRY_TOKEN set here wins over a developer's .env next to compose.yaml; the mesh check reads JSON.
    const env = { ...process.env, CONTACT_REGISTRY_IMAGE: this.o.image, REGISTRY_TOKEN: token, LOG_JSON: "1" };
    const scale = 5;
    const up = await this.check(`compose (${cmd.join(" ")}): up --scale client=${scale}`, () => this.composeUp(project, base, env, ["--scale", `client=${scale}`]));
    if (!up) return;
    const [registries, clients] = await Promise.all([this.composeNames(project, "registry"), this.composeNames(project, "client")]);
    await this.check(`compose: ${scale} clients form a full mesh`, async () => {
      if (registries.length !== 1 || clients.length !== scale) throw new Error(`found ${registries.length} registry and ${clients.length} client containers`);
      await fullMesh(clients.map((c) => this.follow<NodeLine>(c)));
    });
    await this.check("compose: the token reaches the registry, and a node without it is refused", async () => {
      const registry = registries[0]!;
      const envs = await this.execOk(["inspect", "-f", "{{range .Config.Env}}{{println .}}{{end}}", registry]);
      if (!envs.includes(`REGISTRY_TOKEN=${token}`)) throw new Error("the registry container has no REGISTRY_TOKEN from the interpolation");
      const net = (await this.execOk(["inspect", "-f", "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}", registry])).trim().split(" ")[0]!;
      const r = await this.creates(["run", "--rm", "--label", `${LABEL}=${process.pid}`, "--network", net, this.o.image, "client", "registry", "8080", "--json"], 30_000);
      if (r.code === 0 || !r.stdout.includes('"code":"unauthorized"')) throw new Error(`a node without the token: exit ${r.code}, ${tail(r.stdout + r.stderr, 4)}`);
    });
  }

  /**
   * compose.tls.yaml as its header runs it: certificates from certs.ts in a
   * directory of this run, the keys given to uid 1000 (file secrets keep
   * their owner and mode), a registry and three nodes in mutual TLS.
   */
  private async composeTls(): Promise<void> {
    const cmd = await composeCommand(this.docker);
    if (!cmd) return this.skip("compose.tls.yaml", "neither `docker compose` nor `docker-compose` is installed");
    if (process.getuid?.() !== 0) return this.skip("compose.tls.yaml", "giving the keys to uid 1000 (the image's user) needs root");
    const dir = mkdtempSync(join(tmpdir(), `${this.tag}-certs-`));
    try {
      const ids = ["node-0", "node-1", "node-2"];
      const set = await makeCerts(dir, { ids, names: ["registry"], ips: [], days: 2 });
      for (const key of [set.registry!.key, ...set.nodes.map((n) => n.key)]) chownSync(key, 1000, -1);
      const project = `${this.tag}-tls`;
      const base = [...cmd, "-p", project, "-f", join(ROOT, "compose.tls.yaml")];
      const env = { ...process.env, CONTACT_REGISTRY_IMAGE: this.o.image, CERTS_DIR: dir, LOG_JSON: "1" };
      const up = await this.check("compose.tls.yaml: up, certificates as secrets", () => this.composeUp(project, base, env, []));
      if (!up) return;
      const nodes = (await Promise.all(ids.map((id) => this.composeContainers(project, id)))).flat();
      await this.check("compose.tls.yaml: three nodes form a full mesh in mutual TLS, each with its certificate's id", async () => {
        const followed = nodes.map((c) => this.follow<NodeLine>(c));
        await fullMesh(followed);
        const named = followed.map((p) => String(p.log.named("listening")[0]?.id)).sort();
        if (named.join() !== ids.join()) throw new Error(`the nodes took the ids ${named.join(", ")}`);
      });
      await this.check("compose.tls.yaml: the HEALTHCHECK speaks TLS with the role's own certificate: registry and node healthy", async () => {
        const registry = (await this.composeContainers(project, "registry"))[0]!;
        const out: string[] = [];
        for (const c of [registry, nodes[0]!]) {
          const r = await this.exec(["exec", c, "bun", "/app/scripts/healthcheck.ts"], 30_000);
          if (r.code !== 0) throw new Error(`${c}: exit ${r.code}: ${tail(r.stdout + r.stderr, 3)}`);
          out.push(r.stdout.trim());
        }
        return out.join("; ");
      });
      await this.check("compose.tls.yaml: a container without a certificate of the mesh is refused at the handshake", async () => {
        const registry = (await this.composeContainers(project, "registry"))[0]!;
        const net = (await this.execOk(["inspect", "-f", "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}", registry])).trim().split(" ")[0]!;
        const r = await this.creates(
          ["run", "--rm", "--label", `${LABEL}=${process.pid}`, "--network", net, "-v", `${set.ca}:/ca.pem:ro`, this.o.image, "client", "registry", "8443", "--json", "--tls-ca", "/ca.pem"],
          30_000,
        );
        if (r.code === 0 || !r.stdout.includes('"code":"certificate-required"')) throw new Error(`exit ${r.code}, ${tail(r.stdout + r.stderr, 4)}`);
      });
    } finally {
      // Taken down here, not at the end of the run: its secrets are files in this directory.
      await this.composeDown(`${this.tag}-tls`);
      rmSync(dir, { recursive: true, force: true });
    }
  }

  /** `up -d --no-build` of a compose project, taken down by cleanup (or composeDown) whatever happens. */
  private async composeUp(project: string, base: string[], env: Record<string, string | undefined>, extra: string[]): Promise<void> {
    if (this.stopping) throw new Abort("stopping");
    this.composeProjects.set(project, { base, env });
    const p = exec([...base, "up", "-d", "--no-build", ...extra], 120_000, env);
    this.creating.add(p);
    const r = await p.finally(() => this.creating.delete(p));
    if (r.code !== 0) throw new Error(`exited ${r.code}: ${tail(r.stderr + r.stdout, 10)}`);
  }

  private async composeDown(project: string): Promise<void> {
    const p = this.composeProjects.get(project);
    if (!p) return;
    this.composeProjects.delete(project);
    await exec([...p.base, "down", "--remove-orphans", "-t", "5"], 60_000, p.env);
  }

  /** Names of a compose project's containers of one service. */
  private async composeContainers(project: string, service: string): Promise<string[]> {
    const out = await this.execOk(["ps", "-a", "--filter", `label=com.docker.compose.project=${project}`, "--filter", `label=com.docker.compose.service=${service}`, "--format", "{{.Names}}"]);
    return out.split("\n").map((l) => l.trim()).filter(Boolean);
  }

  /** compose.ha.yaml: a store, two registries, 4 nodes given both; then one registry is killed with -9. */
  private async composeHa(): Promise<void> {
    const cmd = await composeCommand(this.docker);
    if (!cmd) return this.skip("compose (several registries)", "neither `docker compose` nor `docker-compose` is installed");
    if ((await this.exec(["image", "inspect", "redis:7"], 30_000)).code !== 0) {
      return this.skip("compose (several registries)", "no redis:7 image on this engine (a test pulls nothing; docker pull redis:7, or a local stand-in)");
    }
    const project = `${this.tag}-ha`;
    const base = [...cmd, "-p", project, "-f", join(ROOT, "compose.ha.yaml")];
    const env = { ...process.env, CONTACT_REGISTRY_IMAGE: this.o.image, REGISTRY_TOKEN: crypto.randomUUID(), LOG_JSON: "1" };
    const scale = 4;
    if (this.stopping) throw new Abort("stopping");
    this.composeProjects.set(project, { base, env });
    const up = await this.check(`compose.ha.yaml: up --scale client=${scale}`, async () => {
      const p = exec([...base, "up", "-d", "--no-build", "--scale", `client=${scale}`], 120_000, env);
      this.creating.add(p);
      const r = await p.finally(() => this.creating.delete(p));
      if (r.code !== 0) throw new Error(`exited ${r.code}: ${tail(r.stderr + r.stdout, 10)}`);
    });
    if (!up) return;
    const names = (service: string) => this.composeNames(project, service);
    const [[r1], [r2], clientNames] = await Promise.all([names("registry1"), names("registry2"), names("client")]);
    const clients = clientNames.map((c) => this.follow<NodeLine>(c));
    let ids: string[] = [];
    await this.check(`compose.ha.yaml: ${scale} clients over two registries form a full mesh, and both list all`, async () => {
      if (!r1 || !r2 || clients.length !== scale) throw new Error(`found registries ${r1}, ${r2} and ${clients.length} clients`);
      await fullMesh(clients);
      ids = clients.map((c) => String(c.log.named("listening")[0]!.id)).sort();
      for (const r of [r1, r2]) await this.listsExactly(r, ids);
    });
    await this.check("compose.ha.yaml: kill -9 of a registry, its nodes register with the other, which lists all", async () => {
      const ip = (await this.execOk(["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", r1!])).trim();
      const on = (c: Proc) => String(c.log.named("registered").at(-1)?.registry);
      const moving = clients.filter((c) => on(c) === `${ip}:8080`);
      const before = new Map(moving.map((c) => [c, c.log.named("registered").length]));
      await this.execOk(["kill", "-s", "KILL", r1!]);
      for (const c of moving) {
        await c.log.waitForWhere("registered", (e) => c.log.named("registered").length > before.get(c)!, 30_000, `${c.label} to register again`);
        if (on(c) === `${ip}:8080`) throw new Error(`${c.label} registered with the killed registry again`);
      }
      await this.listsExactly(r2!, ids);
    });
  }

  /** Containers of a compose project's service. */
  private async composeNames(project: string, service: string): Promise<string[]> {
    const filters = ["--filter", `label=com.docker.compose.project=${project}`, "--filter", `label=com.docker.compose.service=${service}`];
    const out = await this.execOk(["ps", "-a", ...filters, "--format", "{{.Names}}"]);
    return out.split("\n").map((l) => l.trim()).filter(Boolean);
  }

  /** Waits until a registry container's /peers (status server on 8081) lists exactly `ids`. */
  private async listsExactly(container: string, ids: string[]): Promise<void> {
    const read = 'const r = await fetch("http://127.0.0.1:8081/peers"); console.log((await r.json()).peers.map((p) => p.id).sort().join())';
    let last = "";
    await waitUntil(
      async () => {
        const r = await this.exec(["exec", container, "bun", "-e", read], 30_000);
        last = r.code === 0 ? r.stdout.trim() : `exit ${r.code}: ${r.stderr.trim()}`;
        return last === ids.join();
      },
      30_000,
      `${container} to list the ${ids.length} nodes`,
      500,
    ).catch((e: Error) => {
      throw new Error(`${e.message} (lists: ${last})`);
    });
  }

  /** Starts a labelled container and follows its log; the follower parses --json lines. */
  private async start<E extends { event: string } = JsonEvent>(name: string, net: string, args: string[], runFlags: string[] = []): Promise<Proc<E>> {
    if (this.stopping) throw new Abort("stopping");
    this.containers.add(name);
    const r = await this.creates(
      ["run", "-d", "--name", name, "--network", net, "--label", `${LABEL}=${process.pid}`,
        // The image's own check, run every second instead of every 15 s so the test need not wait long.
        "--health-interval", "1s", "--health-start-period", "30s", ...runFlags, this.o.image, ...args],
      60_000,
    );
    if (r.code !== 0) throw new Error(`docker run ${name} exited ${r.code}: ${r.stderr.trim()}`);
    return this.follow<E>(name);
  }

  /** Follows a container's output; --json lines become events, of the kind `E` the caller knows the container prints. */
  private follow<E extends { event: string } = JsonEvent>(name: string): Proc<E> {
    const follower = new Proc<E>(Bun.spawn([this.docker, "logs", "-f", name], { stdin: "ignore", stdout: "pipe", stderr: "pipe" }), name);
    this.followers.add(follower);
    return follower;
  }

  private async network(name: string, extra: string[]): Promise<string> {
    this.networks.add(name);
    // --internal: the containers talk only to each other, never to anything beyond this engine.
    const r = await this.creates(["network", "create", "--internal", "--label", `${LABEL}=${process.pid}`, ...extra, name], 30_000);
    if (r.code !== 0) throw new Error(`docker network create ${name} exited ${r.code}: ${r.stderr.trim()}`);
    return name;
  }

  /** Polls the health state until unhealthy; returns the failing check's output. */
  private async unhealthy(container: string): Promise<string> {
    let output = "";
    await waitUntil(
      async () => {
        const h = JSON.parse(await this.execOk(["inspect", "-f", "{{json .State.Health}}", container])) as { Status: string; Log?: { Output: string }[] } | null;
        output = h?.Log?.at(-1)?.Output.trim() ?? "";
        return h?.Status === "unhealthy";
      },
      30_000,
      `${container} to become unhealthy`,
      250,
    ).catch((e: Error) => {
      throw new Error(`${e.message} (last check: ${output || "none yet"})`);
    });
    return output;
  }

  /** Polls the health state (Docker has it only as state) until healthy, failing fast on unhealthy. */
  private async healthy(container: string): Promise<string> {
    let state = "";
    let output = "";
    await waitUntil(
      async () => {
        const h = JSON.parse(await this.execOk(["inspect", "-f", "{{json .State.Health}}", container])) as {
          Status: string;
          Log?: { Output: string }[];
        } | null;
        state = h?.Status ?? "none";
        output = h?.Log?.at(-1)?.Output.trim() ?? "";
        if (state === "unhealthy") throw new Error(`${container} is unhealthy: ${output}`);
        return state === "healthy";
      },
      30_000,
      `${container} to become healthy`,
      250,
    ).catch((e: Error) => {
      throw new Error(`${e.message} (state ${state}, last check: ${output || "none yet"})`);
    });
    return output;
  }

  /**
   * Removes what an earlier, killed run left (its pid is gone); never another
   * live run's. Our containers and networks carry the pid as a label; compose
   * ones carry it in their project name (`crtest-<pid>-...`).
   */
  private async removeLeftovers(): Promise<void> {
    const PROJECT = "com.docker.compose.project";
    const list = async (kind: "container" | "network", label: string) => {
      const r = kind === "container"
        ? await this.exec(["ps", "-a", "--filter", `label=${label}`, "--format", `{{.Names}} {{.Label "${label}"}}`], 30_000)
        : await this.exec(["network", "ls", "--filter", `label=${label}`, "--format", `{{.Name}} {{.Label "${label}"}}`], 30_000);
      return r.stdout.split("\n").map((l) => l.trim().split(" ")).filter((f): f is [string, string] => Boolean(f[0] && f[1]));
    };
    const dead = (value: string, fromProject: boolean) => {
      const pid = fromProject ? /^crtest-(\d+)-/.exec(value)?.[1] : value;
      return pid !== undefined && !alive(Number(pid));
    };
    const stale = async (kind: "container" | "network") => [
      ...(await list(kind, LABEL)).filter(([, pid]) => dead(pid, false)).map(([name]) => name),
      ...(await list(kind, PROJECT)).filter(([, project]) => dead(project, true)).map(([name]) => name),
    ];
    const containers = await stale("container");
    if (containers.length) await this.exec(["rm", "-f", ...containers], 60_000);
    const networks = await stale("network");
    if (networks.length) await this.exec(["network", "rm", ...networks], 60_000);
    if (containers.length || networks.length) process.stdout.write(`removed leftovers of an earlier run: ${[...containers, ...networks].join(" ")}\n`);
  }

  /** Removes this run's containers and networks; safe to call twice. */
  async cleanup(): Promise<void> {
    this.stopping = true;
    await Promise.allSettled([...this.creating]);
    const containers = [...this.containers];
    this.containers.clear();
    if (containers.length) {
      const r = await this.exec(["rm", "-f", ...containers], 60_000);
      if (r.code !== 0 && !/No such container/.test(r.stderr)) process.stdout.write(`cleanup: docker rm: ${r.stderr.trim()}\n`);
    }
    await Promise.allSettled(
      Array.from(this.composeProjects.values(), ({ base, env }) => exec([...base, "down", "--remove-orphans", "-t", "5"], 60_000, env)),
    );
    this.composeProjects.clear();
    await Promise.allSettled([...this.followers].map((f) => f[Symbol.asyncDispose]()));
    this.followers.clear();
    const networks = [...this.networks];
    this.networks.clear();
    if (networks.length) {
      const r = await this.exec(["network", "rm", ...networks], 60_000);
      if (r.code !== 0 && !/not found/.test(r.stderr)) process.stdout.write(`cleanup: docker network rm: ${r.stderr.trim()}\n`);
    }
  }

  /** A docker command that creates something; tracked until it returns. */
  private creates(args: string[], timeoutMs: number): Promise<Exec> {
    if (this.stopping) return Promise.reject(new Abort("stopping"));
    const p = this.exec(args, timeoutMs);
    this.creating.add(p);
    return p.finally(() => this.creating.delete(p));
  }

  exec(args: string[], timeoutMs: number): Promise<Exec> {
    return exec([this.docker, ...args], timeoutMs);
  }

  async execOk(args: string[], timeoutMs = 30_000): Promise<string> {
    const r = await this.exec(args, timeoutMs);
    if (r.code !== 0) throw new Error(`docker ${args.slice(0, 3).join(" ")} exited ${r.code}: ${r.stderr.trim()}`);
    return r.stdout;
  }
}

/**
 * Waits for every pair of nodes to have greeted, then checks each pair has
 * exactly one `greeted` and one `greeting`, told by both of its ends.
 */
async function fullMesh(nodes: Proc<NodeLine>[]): Promise<void> {
  const ids = await Promise.all(nodes.map(async (p) => String((await p.log.waitFor("listening", 30_000, `${p.label} to listen`)).id)));
  const pairs = (nodes.length * (nodes.length - 1)) / 2;
  const count = (event: NodeLine["event"]) => nodes.reduce((n, p) => n + p.log.named(event).length, 0);
  await waitUntil(() => count("greeted") >= pairs && count("greeting") >= pairs, 30_000, `${pairs} greeted and greeting events`).catch(
    (e: Error) => {
      throw new Error(`${e.message} (have ${count("greeted")} greeted, ${count("greeting")} greeting)`);
    },
  );
  const { greeted, received } = greetingsOf(nodes.map((p, i) => ({ id: ids[i]!, log: p.log })));
  const problems = meshProblems(ids, greeted, received);
  const failed = nodes.flatMap((p) => p.log.named("greet-failed").map((e) => `${p.label}: ${e.reason}`));
  if (failed.length) problems.push(`greet-failed: ${failed.join("; ")}`);
  if (problems.length) throw new Error(problems.join("; "));
}

/** Why Docker cannot be used here, or undefined if it can. */
async function engineProblem(docker: string, bases: string[]): Promise<string | undefined> {
  if (!Bun.which(docker) && !(await Bun.file(docker).exists())) return "no docker command on PATH";
  const info = await exec([docker, "info", "--format", "{{.ServerVersion}}"], 20_000);
  if (info.code !== 0) return `docker info failed (no engine running?): ${firstLine(info.stderr || info.stdout)}`;
  for (const base of bases) {
    const r = await exec([docker, "image", "inspect", "--format", "{{.Id}}", base], 20_000);
    if (r.code !== 0) return `base image ${base} is missing (no registry to pull from; ../shared/tools/docker-engine.sh makes a local one)`;
  }
  return undefined;
}

/** `docker compose` (v2 plugin) if it answers, else `docker-compose` (v1), else none. */
async function composeCommand(docker: string): Promise<string[] | undefined> {
  if ((await exec([docker, "compose", "version"], 20_000)).code === 0) return [docker, "compose"];
  const v1 = Bun.which("docker-compose");
  if (v1 && (await exec([v1, "version"], 20_000)).code === 0) return [v1];
  return undefined;
}

/** The `FROM` images of the Dockerfile, with its ARG defaults filled in. */
function baseImagesOf(dockerfile: string): string[] {
  const args = new Map<string, string>();
  const out: string[] = [];
  for (const line of dockerfile.split("\n")) {
    const arg = /^\s*ARG\s+(\w+)=(\S+)/i.exec(line);
    if (arg) args.set(arg[1]!, arg[2]!);
    const from = /^\s*FROM\s+(\S+)/i.exec(line);
    if (from) out.push(from[1]!.replace(/\$\{(\w+)\}|\$(\w+)/g, (_, a, b) => args.get(a ?? b) ?? ""));
  }
  return [...new Set(out)];
}

function alive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as { code?: string }).code === "EPERM";
  }
}

function lastEvents(p: Proc): string {
  const events = p.log.events.slice(-4).map((e: JsonEvent) => JSON.stringify(e));
  return [...events, ...p.stderr.slice(-4)].join(" | ") || "(nothing)";
}

function human(bytes: number): string {
  const units = ["B", "kB", "MB", "GB"];
  let n = bytes;
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) {
    n /= 1000;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function firstLine(text: string): string {
  return text.trim().split("\n")[0] ?? "";
}

if (import.meta.main) await runMain(command);

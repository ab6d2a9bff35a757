#!/usr/bin/env bun
/**
 * The installed command, as a user gets it (`bun scripts/pack-test.ts`, run
 * by CI): `npm pack`, `npm install <tarball>` in a new directory, then through
 * the installed `contact-registry` bin (npx for the commands that end by
 * themselves, node_modules/.bin for the ones it signals): --version (and which Bun it found),
 * --help of each role, a registry (with its status server, so status.html must
 * be in the package) and a node on loopback that register and then stop
 * gracefully on SIGINT and SIGTERM sent to the launchers, `list` against that registry
 * once client.ts has it, and the message when no Bun can be found.
 *
 * Prints one line per check (`ok`, `FAIL`, `skip`) and ends with
 * `pack: N passed, N failed[, N skipped]`; exit 0 only if nothing failed.
 * Without node or npm it prints `SKIP pack: <why>` and exits 0. npm installs
 * with --prefer-offline: after `npm ci` its cache holds every package. Every
 * process it starts is stopped and the directory removed in `finally`.
 */
import { mkdtempSync, readFileSync, renameSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { ROOT, Proc, exec, withDeadline, type JsonEvent } from "../harness.ts";
import { CheckRun, tail, type Exec } from "./check-run.ts";

const STEP_MS = 60_000;

/** Runs every check; returns the exit code. */
export async function main(): Promise<number> {
  const node = Bun.which("node");
  const npm = Bun.which("npm");
  if (!node || !npm) {
    process.stdout.write(`SKIP pack: ${node ? "npm" : "node"} is not on PATH\n`);
    return 0;
  }
  const run = new Run(node, npm);
  try {
    await run.all();
  } finally {
    await run.cleanup();
  }
  process.stdout.write(run.summary("pack"));
  return run.failed ? 1 : 0;
}

// --- internal ----------------------------------------------------------------

class Run extends CheckRun {
  private readonly dir = mkdtempSync(join(tmpdir(), "contact-registry-pack-"));
  private readonly project = join(this.dir, "project");
  private readonly procs = new Set<Proc>();
  /** npm's environment without the project's own node_modules/.bin (its Bun): only what the tarball installed can be found. */
  private readonly env: Record<string, string | undefined>;

  constructor(
    private readonly node: string,
    private readonly npm: string,
  ) {
    super();
    const own = join(ROOT, "node_modules", ".bin");
    const path = (process.env.PATH ?? "").split(":").filter((d) => d && d !== own);
    this.env = { ...process.env, PATH: path.join(":"), NO_COLOR: "1" };
  }

  all(): Promise<void> {
    return this.runAll(async () => {
      await this.install();
      await this.commands();
      await this.mesh();
      await this.noBun();
    });
  }

  private async install(): Promise<void> {
    let tarball = "";
    await this.check("npm pack", async () => {
      const r = await this.exec([this.npm, "pack", "--silent", "--pack-destination", this.dir], ROOT);
      if (r.code !== 0) throw new Error(`exited ${r.code}: ${tail(r.stderr)}`);
      tarball = join(this.dir, r.stdout.trim().split("\n").at(-1)!);
      return tarball.slice(this.dir.length + 1);
    }, true);
    await this.check("npm install <tarball> in a new directory", async () => {
      await Bun.write(join(this.project, "package.json"), JSON.stringify({ name: "pack-check", private: true }));
      const r = await this.exec([this.npm, "install", "--no-audit", "--no-fund", "--prefer-offline", tarball], this.project);
      if (r.code !== 0) throw new Error(`exited ${r.code}: ${tail(r.stderr)}`);
    }, true);
  }

  private async commands(): Promise<void> {
    const { version } = (await Bun.file(join(ROOT, "package.json")).json()) as { version: string };
    const installedBun = join(this.project, "node_modules", "bun", "bin", "bun.exe");
    const [v, reg, cli, none, bad] = await Promise.all([
      this.npx(["--version"]),
      this.npx(["registry", "--help"]),
      this.npx(["client", "--help"]),
      this.npx([]),
      this.npx(["nonsense"]),
    ]);
    await this.check("`contact-registry --version` names the version and the Bun installed with it", async () => {
      const want = `contact-registry ${version} (bun ${Bun.version} at ${installedBun})`;
      if (v.code !== 0 || v.stdout.trim() !== want) throw new Error(`exit ${v.code}: "${v.stdout.trim()}" ${tail(v.stderr)}; expected "${want}"`);
    });
    await this.check("`contact-registry registry --help` prints the registry's usage, exit 0", async () => {
      if (reg.code !== 0 || !/^Usage: bun registry.ts/.test(reg.stdout)) throw new Error(`exit ${reg.code}: ${tail(reg.stdout + reg.stderr)}`);
    });
    await this.check("`contact-registry client --help` prints the node's usage, exit 0", async () => {
      if (cli.code !== 0 || !/^Usage: bun client.ts/.test(cli.stdout)) throw new Error(`exit ${cli.code}: ${tail(cli.stdout + cli.stderr)}`);
    });
    await this.check("no role prints the roles, exit 2; an unknown one says so, exit 2", async () => {
      if (none.code !== 2 || !none.stderr.includes("contact-registry registry [host] [port]")) throw new Error(`no role: exit ${none.code}: ${tail(none.stderr)}`);
      if (bad.code !== 2 || !bad.stderr.includes('unknown role "nonsense"')) throw new Error(`unknown role: exit ${bad.code}: ${tail(bad.stderr)}`);
    });
  }

  /** A registry and a node through the installed bin; SIGTERM to the launchers must reach the scripts once. */
  private async mesh(): Promise<void> {
    const registry = this.start("registry", ["registry", "127.0.0.1", "0", "--json", "--http", "0", "--http-host", "127.0.0.1"]);
    let port = 0;
    await this.check("the installed registry listens, status page included", async () => {
      port = Number((await waitFor(registry, "listening", "the registry to listen")).port);
      const url = String((await waitFor(registry, "http-listening", "the status server")).url);
      const page = await fetch(url, { signal: AbortSignal.timeout(STEP_MS) });
      if (!page.ok || !(await page.text()).includes("Greeted pairs")) throw new Error(`GET ${url}: ${page.status}`);
      return `port ${port}`;
    }, true);
    const node = this.start("node", ["client", "127.0.0.1", String(port), "--json", "--listen", "127.0.0.1", "--name", "packed"]);
    let id = "";
    await this.check("the installed node registers with it", async () => {
      id = String((await waitFor(node, "listening", "the node to listen")).id);
      await waitFor(node, "registered", "the node to register");
      await waitFor(registry, (e) => e.event === "node-registered" && e.id === id, "the registry to list it");
    }, true);
    await this.list(port, id);
    await this.check("SIGINT (Ctrl-C) to the node's launcher, SIGTERM to the registry's: the node says leave, both exit 0", async () => {
      node.signal("SIGINT");
      const nodeExit = await withDeadline(node.exited(), STEP_MS, "the node to exit");
      const left = await waitFor(registry, (e) => e.event === "node-left" && e.id === id, "the registry to see it leave");
      registry.signal("SIGTERM");
      const registryExit = await withDeadline(registry.exited(), STEP_MS, "the registry to exit");
      if (nodeExit !== 0 || registryExit !== 0 || left.reason !== "leave") {
        throw new Error(`node exit ${nodeExit}, registry exit ${registryExit}, left with reason ${left.reason}; ${[...node.stderr, ...registry.stderr].join(" | ")}`);
      }
    });
  }

  /** `list` is dispatched to client.ts's `list` command. */
  private async list(port: number, id: string): Promise<void> {
    await this.check("`contact-registry list` shows the registered node", async () => {
      const r = await this.npx(["list", "127.0.0.1", String(port), "--json"]);
      if (r.code !== 0 || !r.stdout.includes(id)) throw new Error(`exit ${r.code}: ${tail(r.stdout + r.stderr)}`);
    });
  }

  /** Without the dependency and with nothing on PATH, the launcher must say what is missing. */
  private async noBun(): Promise<void> {
    await this.check("without any Bun, the launcher says so, exit 1", async () => {
      const bunDir = join(this.project, "node_modules", "bun");
      renameSync(bunDir, `${bunDir}.off`);
      const launcher = join(this.project, "node_modules", "contact-registry", "bin", "contact-registry.js");
      const r = await this.exec([this.node, launcher, "registry", "--help"], this.project, { ...this.env, PATH: "" });
      if (r.code !== 1 || !r.stderr.includes("contact-registry runs on Bun, and none was found")) throw new Error(`exit ${r.code}: ${tail(r.stdout + r.stderr)}`);
    });
  }

  /**
   * The installed bin itself (npx would add npm and a shell between us and
   * the launcher's signals), with an environment of PATH alone, so that a
   * developer's REGISTRY_* or NODE_* settings cannot change what it starts.
   */
  private start(label: string, args: string[]): Proc {
    const child = Bun.spawn([join(this.project, "node_modules", ".bin", "contact-registry"), ...args], {
      cwd: this.project,
      env: { PATH: this.env.PATH, NO_COLOR: "1" },
      stdin: "ignore",
      stdout: "pipe",
      stderr: "pipe",
    });
    const p = new Proc(child, label);
    this.procs.add(p);
    return p;
  }

  private get npx_(): string {
    return join(dirname(this.npm), "npx");
  }

  private npx(args: string[]): Promise<Exec> {
    return this.exec([this.npx_, "--no-install", "contact-registry", ...args], this.project);
  }

  private exec(cmd: string[], cwd: string, env = this.env): Promise<Exec> {
    return exec(cmd, STEP_MS, env, cwd);
  }

  /**
   * Stops what still runs and removes the directory. The launcher's child has
   * a process group of its own, so killing the launcher would leave it
   * running: it is killed by pid first.
   */
  async cleanup(): Promise<void> {
    for (const p of this.procs) {
      if (p.proc.exitCode !== null || p.proc.signalCode !== null) continue;
      for (const pid of childrenOf(p.pid)) {
        try {
          process.kill(pid, "SIGKILL");
        } catch {
          // gone meanwhile
        }
      }
    }
    await Promise.allSettled([...this.procs].map((p) => p[Symbol.asyncDispose]()));
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** An event of a started process, or a failure as soon as the process ends without it (with what it said). */
async function waitFor(p: Proc, pred: string | ((e: JsonEvent) => boolean), what: string): Promise<JsonEvent> {
  const ended = p.exited().then((code) => {
    throw new Error(`${p.label} exited ${code} before ${what}: ${p.stderr.slice(-6).join(" | ")}`);
  });
  ended.catch(() => {}); // the process ends later anyway, once the event has come
  return Promise.race([p.log.waitFor(pred, STEP_MS, what), ended]);
}

/** Direct children of a process (Linux). */
function childrenOf(pid: number): number[] {
  try {
    return readFileSync(`/proc/${pid}/task/${pid}/children`, "utf8").trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

if (import.meta.main) {
  if (process.argv.length > 2) {
    process.stderr.write("usage error: pack-test takes no arguments\n");
    process.exit(2);
  }
  process.exit(await main());
}

#!/usr/bin/env node
// @ts-check
/**
 * The installed command (`npx contact-registry registry localhost 8080`):
 * the first argument picks the role, the rest goes to that role's script,
 * which runs on Bun. This file runs on Node (what npm and npx start a bin
 * with) or on Bun, finds a Bun, and runs the script in it as a child.
 *
 * Which Bun, in order:
 *  1. the one running this file (`bunx --bun contact-registry ...`);
 *  2. the package's optional dependency `bun` (npm installs it with the
 *     package unless told --omit=optional, or it has no build for this
 *     platform, or --ignore-scripts left its placeholder in place);
 *  3. `bun` on PATH;
 * else it says so and exits 1.
 */
import { spawn, spawnSync } from "node:child_process";
import { accessSync, constants, readFileSync, statSync } from "node:fs";
import { createRequire } from "node:module";
import { delimiter, dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
/** @type {Record<string, [script: string, ...args: string[]]>} role -> the script and the arguments it starts with */
const ROLES = {
  registry: ["registry.ts"],
  client: ["client.ts"],
  // The read-only listing is a subcommand of the node's script.
  list: ["client.ts", "list"],
};
const { version } = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8"));

const USAGE = `contact-registry ${version}: the first argument is the role.

  contact-registry registry [host] [port] [flags]        run the contact registry
  contact-registry client <registry-host> <port> [flags] run a peer node
  contact-registry list <registry-host> <port> [flags]   print the registry's nodes
  contact-registry <role> --help                         every flag and environment variable of a role
  contact-registry --version                             this package's version, and which Bun runs it

Examples:
  npx contact-registry registry localhost 8080
  npx contact-registry client localhost 8080 --name alpha

The roles run on Bun: the one running this command, else the package's
optional dependency \`bun\`, else \`bun\` on PATH.
`;

const [role, ...rest] = process.argv.slice(2);
if (role === "-h" || role === "--help" || role === "help") {
  process.stdout.write(USAGE);
  process.exit(0);
}
if (role === undefined) {
  process.stderr.write(USAGE);
  process.exit(2);
}
const bun = findBun();
if (role === "-v" || role === "--version" || role === "version") {
  // Which Bun, too: the one thing here that differs from machine to machine.
  const bunVersion = bun ? `bun ${spawnSync(bun, ["--version"], { encoding: "utf8" }).stdout.trim()} at ${bun}` : "no bun found";
  process.stdout.write(`contact-registry ${version} (${bunVersion})\n`);
  process.exit(0);
}
const target = Object.hasOwn(ROLES, role) ? ROLES[role] : undefined;
if (!target) {
  process.stderr.write(`error: unknown role "${role}": the first argument must be one of ${Object.keys(ROLES).join(", ")}\nrun with --help for usage\n`);
  process.exit(2);
}
if (!bun) {
  process.stderr.write(
    "error: contact-registry runs on Bun, and none was found: not as this package's optional\n" +
      "dependency `bun` (left out by --omit=optional or --ignore-scripts, or no build for this\n" +
      "platform), nor as `bun` on PATH. Install Bun (https://bun.com/docs/installation, or\n" +
      "`npm install --global bun`) and run this again.\n",
  );
  process.exit(1);
}
const [script, ...first] = target;
run(bun, [join(ROOT, script), ...first, ...rest]);

/** @returns {string | undefined} */
function findBun() {
  if (process.versions.bun) return process.execPath;
  try {
    const own = join(dirname(createRequire(import.meta.url).resolve("bun/package.json")), "bin", "bun.exe");
    if (isBun(own)) return own;
  } catch {
    // not installed
  }
  for (const dir of (process.env.PATH ?? "").split(delimiter)) {
    const candidate = join(dir, process.platform === "win32" ? "bun.exe" : "bun");
    if (dir && isBun(candidate)) return candidate;
  }
  return undefined;
}

/**
 * An executable that is Bun itself. The npm package ships a placeholder
 * script of a few hundred bytes in its place until its postinstall puts the
 * binary there (which is tens of megabytes): size tells them apart without
 * running either.
 * @param {string} file
 */
function isBun(file) {
  try {
    accessSync(file, constants.X_OK);
    return statSync(file).size > 1_000_000;
  } catch {
    return false;
  }
}

/**
 * Runs the role as a child and ends as it ends. The child gets a process
 * group of its own, so a signal reaches it once, from here: a Ctrl-C that
 * also reached it from the terminal would be a second SIGINT, which ends a
 * node before it has said `leave`.
 * @param {string} bun
 * @param {string[]} args
 */
function run(bun, args) {
  const child = spawn(bun, args, { stdio: "inherit", detached: true });
  /** @type {NodeJS.Signals[]} */
  const forwarded = ["SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1"];
  for (const signal of forwarded) process.on(signal, () => child.kill(signal));
  child.on("error", (e) => {
    process.stderr.write(`error: cannot start ${bun}: ${e.message}\n`);
    process.exit(1);
  });
  child.on("exit", (code, signal) => {
    if (signal) {
      // End the way the child ended, so a caller sees the same signal.
      for (const s of forwarded) process.removeAllListeners(s);
      process.kill(process.pid, signal);
      return;
    }
    process.exit(code ?? 1);
  });
}

/**
 * Command-line plumbing shared by the two programs: settings from flag, then
 * environment variable, then default; the printer that turns a role's events
 * into readable or JSON lines; usage errors, and how a program starts, stops
 * on a signal and exits.
 */
import type { ArgsDef, ParsedArgs } from "citty";
import { createConsola } from "consola";
import { TlsConfigError, tls, type TlsEvent, type TlsOptions, type TlsTransport } from "./tls.ts";
import { appendFileSync } from "node:fs";
import pkg from "./package.json" with { type: "json" };

/** The version `--version` prints: the package's, wherever it is installed (npm, the image). */
export const VERSION: string = pkg.version;

/** How loud a readable line is: debug lines show only with CONSOLA_LEVEL=4 or more. */
export type Level = "warn" | "success" | "info" | "debug";

/** Anything a role emits: a name and fields. */
export type AnyEvent = { event: string };

/** An event as it travels as JSON, loosely typed (tests and tools read other processes' output). */
export type EventRecord = AnyEvent & Record<string, unknown>;

/** Events both programs report: a warning once at start, a reload of the certificate files on SIGHUP. */
export type CommonEvent = { event: "warning"; message: string } | TlsEvent;

/** The readable line for a CommonEvent. */
export function describeCommon(e: CommonEvent): string {
  switch (e.event) {
    case "warning":
      return `warning: ${e.message}`;
    case "tls-reloaded":
      return `${e.scope ? `${e.scope} ` : ""}certificates reloaded${e.subject ? ` (${e.subject}` : ""}${e.notAfter ? `, valid until ${e.notAfter})` : e.subject ? ")" : ""}; new connections use them`;
    case "tls-reload-failed":
      return `${e.scope ? `${e.scope} ` : ""}certificates not reloaded, the previous ones stay in use: ${e.message}`;
  }
}

/** True for the CommonEvents printed as warnings. */
export function isWarning(e: CommonEvent | AnyEvent): boolean {
  return e.event === "warning" || e.event === "tls-reload-failed";
}

/**
 * Turns a role's events into output: with `json`, one JSON object per line on
 * stdout (`event`, `time`, fields); otherwise readable consola lines from
 * `describe`, warnings (`level` "warn") on stderr.
 */
export function createPrinter<E extends AnyEvent>(
  tag: string,
  json: boolean,
  describe: (e: E) => string,
  level: (e: E) => Level,
): (e: E) => void {
  if (json) {
    return (e) => {
      const { event, ...rest } = e;
      process.stdout.write(JSON.stringify({ event, time: new Date().toISOString(), ...rest }) + "\n");
    };
  }
  const log = createLog(tag);
  return (e) => log(level(e), describe(e));
}

/** Readable lines at a level: consola's, level set by CONSOLA_LEVEL (3, info, by default); warnings go to stderr. */
export function createLog(tag: string): (level: Level, text: string) => void {
  const log = createConsola({ level: process.env.CONSOLA_LEVEL ? Number(process.env.CONSOLA_LEVEL) : 3 }).withTag(tag);
  return (level, text) => log[level](text);
}

/**
 * Reads a command's settings the same way for both programs: unknown flags
 * are refused, then each setting comes from its flag, else its environment
 * variable, else the caller's default.
 */
export function readSettings<A extends ArgsDef>(args: ParsedArgs<A>, rawArgs: string[], defs: A) {
  checkFlags(rawArgs, defs as Record<string, { type?: string }>);
  return settingsFrom(args as Partial<Record<Extract<keyof A, string>, unknown>>);
}

/** The flag wins, then its environment variable, then the caller's default. */
export function settingsFrom<K extends string>(args: Partial<Record<K, unknown>>) {
  // Empty means unset: compose writes `VAR=` for "not given".
  const env = (name: string) => process.env[name] || undefined;
  const text = (key: K, envName: string): string | undefined => {
    const v = args[key];
    return v === undefined || v === "" ? env(envName) : String(v);
  };
  return {
    text,
    /** A whole number within [min, max], or a usage error naming the flag. */
    int: (key: K, envName: string, min = 0, max?: number): number | undefined => {
      const v = text(key, envName);
      return v === undefined ? undefined : intArg(key, v, min, max);
    },
    /** A switch: `--flag` / `--no-flag` if given, else its variable (1 or 0), else the default. */
    on: (key: K, envName: string, fallback = false): boolean => {
      const v = args[key];
      if (typeof v === "boolean") return v;
      const e = env(envName);
      return e === "1" ? true : e === "0" ? false : fallback;
    },
  };
}

/** A citty argument value as a non-negative integer, or a usage error. */
export function intArg(name: string, value: unknown, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  const text = String(value ?? "").trim();
  if (!/^\d+$/.test(text) || Number(text) < min || Number(text) > max || !Number.isSafeInteger(Number(text))) {
    const range = max === Number.MAX_SAFE_INTEGER ? `>= ${min}` : `from ${min} to ${max}`;
    throw new UsageError(`--${name} must be an integer ${range}, got "${String(value)}"`);
  }
  return Number(text);
}

/**
 * citty ignores flags it does not know; a mistyped `--tokn` silently dropping
 * the token is worse than refusing to start, so unknown flags are usage errors.
 */
export function checkFlags(rawArgs: string[], known: Record<string, { type?: string }>): void {
  for (const arg of rawArgs) {
    if (arg === "--") break;
    if (!arg.startsWith("-") || /^-\d/.test(arg)) continue;
    const name = arg.replace(/^--?/, "").split("=")[0]!;
    const def = known[name] ?? (name.startsWith("no-") ? known[name.slice(3)] : undefined);
    if (!def || def.type === "positional") throw new UsageError(`unknown option ${arg.split("=")[0]}`);
  }
}

/** A bad command line: the scripts print it and exit 2. */
export class UsageError extends Error {
  override name = "UsageError";
}

/** Runs a script's start function; a UsageError exits 2 with its message, anything else exits 1. */
export async function runCli(fn: () => Promise<void>): Promise<void> {
  try {
    await fn();
  } catch (e) {
    const usage = e instanceof UsageError;
    process.stderr.write(`${usage ? "usage error" : "error"}: ${(e as Error).message}\n`);
    if (usage) process.stderr.write("run with --help for usage\n");
    process.exit(usage ? 2 : 1);
  }
}

/** SIGTERM and SIGINT (docker stop, Ctrl-C) stop the program cleanly, then it exits 0. */
export function stopOnSignals(stop: () => Promise<void>): void {
  const shutdown = async () => {
    await stop();
    process.exit(0);
  };
  process.once("SIGTERM", shutdown);
  process.once("SIGINT", shutdown);
}

/** SIGHUP runs `reload` (the programs read their certificates again) instead of ending the program. */
export function reloadOnHangup(reload: () => void): void {
  process.on("SIGHUP", reload);
}

/** A TLS transport from the command line's files: an unusable file is a usage error that says which and why. */
export function tlsFromFlags(options: TlsOptions): TlsTransport {
  try {
    return tls(options);
  } catch (e) {
    if (e instanceof TlsConfigError) throw new UsageError(`TLS: ${e.message}`);
    throw e;
  }
}

/** Every value of a flag given more than once (`--f a --f=b`): citty keeps only the last. */
export function repeatedFlag(rawArgs: string[], name: string): string[] {
  const out: string[] = [];
  for (let i = 0; i < rawArgs.length; i++) {
    const arg = rawArgs[i]!;
    if (arg === "--") break;
    if (arg === `--${name}` && i + 1 < rawArgs.length) out.push(rawArgs[++i]!);
    else if (arg.startsWith(`--${name}=`)) out.push(arg.slice(name.length + 3));
  }
  return out;
}

/**
 * With a ports file (the Docker image sets PORTS_FILE for its HEALTHCHECK),
 * each `listening` and `http-listening` event is also appended to that file,
 * one JSON line with the role added: where this process can be asked whether
 * it is alive, the port the OS picked included.
 */
export function portsRecorder(file: string | undefined, role: string): (e: AnyEvent) => void {
  if (!file) return () => {};
  return (e) => {
    if (e.event !== "listening" && e.event !== "http-listening") return;
    try {
      appendFileSync(file, JSON.stringify({ role, ...e }) + "\n");
    } catch (err) {
      // The role works without it; only its health check will say it cannot find it.
      process.stderr.write(`warning: cannot write the ports file ${file}: ${(err as Error).message}\n`);
    }
  };
}

/** What --help says beyond the flags: the command lines users type, and examples. */
export interface Help {
  usage: string[];
  description: string;
  /** Positional arguments that must be given (by flag or environment variable). */
  required: string[];
  examples: string[];
  /** Anything else worth a paragraph (subcommands, notes). */
  more?: string;
}

/**
 * Renders --help: the command as users type it (`bun client.ts ...`),
 * required arguments marked, every flag with its environment variable and
 * default (from its description), and examples. Plain text, no colour codes:
 * it is read in terminals, logs and pipes alike.
 */
export function renderHelp(help: Help, args: ArgsDef): string {
  const rows = Object.entries(args).map(([name, def]) => {
    const positional = def.type === "positional";
    const required = positional && help.required.includes(name);
    const flag = positional ? (required ? `<${name}>` : `[${name}]`) : def.type === "boolean" ? `--${name}` : `--${name} <${def.valueHint ?? "value"}>`;
    return { positional, flag, text: `${def.description ?? ""}${required ? " (required)" : ""}` };
  });
  const width = Math.max(...rows.map((r) => r.flag.length)) + 2;
  const list = (positional: boolean) =>
    rows
      .filter((r) => r.positional === positional)
      .map((r) => `  ${r.flag.padEnd(width)}${r.text}`)
      .join("\n");
  return [
    `Usage: ${help.usage.join("\n       ")}`,
    "",
    help.description,
    "",
    "Arguments:",
    list(true),
    "",
    "Options (each also read from the environment variable named in brackets; a flag wins over its variable):",
    list(false),
    `  ${"--help".padEnd(width)}Show this help`,
    `  ${"--version".padEnd(width)}Show the version`,
    ...(help.more ? ["", help.more] : []),
    "",
    "Examples:",
    ...help.examples.map((e) => `  ${e}`),
    "",
  ].join("\n");
}

#!/usr/bin/env bun
/**
 * A peer node ("C"): listens on a port the OS picks, registers that port with
 * the registry, greets every node the registry lists, and answers the
 * greetings of nodes that join later. Its registration lasts as long as its
 * registry session; it reconnects and registers again if that session drops.
 * `bun client.ts <registry-host> <registry-port>`; see README.md.
 *
 * Its parts: registration.ts keeps the node listed and its view current;
 * greetings.ts holds the greeter and the listener; liveness.ts the heartbeat
 * and the backoff. Here they are wired together; the command line comes last.
 */
import { defineCommand, runMain, type ArgsDef } from "citty";
import { UsageError, VERSION, createLog, createPrinter, describeCommon, isWarning, portsRecorder, readSettings, reloadOnHangup, renderHelp, repeatedFlag, runCli, stopOnSignals, tlsFromFlags, type CommonEvent, type Help, type Level } from "./cli.ts";
import { Greeter, Listener, Met, type GreetingEvent, type Identity } from "./greetings.ts";
import { systemClock, type Clock } from "./liveness.ts";
import { formatAddress, isLoopbackHost, lineHandlers, parseHostPort, parsePort, tcp, type Conn, type Transport } from "./net.ts";
import { DEFAULTS, FromRegistry, MAX_TIMER_MS, PROTOCOL_VERSION, decode, randomId, type Peer } from "./protocol.ts";
import { NODE_URI_PREFIX, type TlsTransport } from "./tls.ts";

export interface NodeOptions {
  registryHost: string;
  registryPort: number;
  /**
   * More registries sharing one list (a store): the node registers with one
   * of them, picked at random, and fails over to the next when its session is
   * lost. A name that resolves to several addresses counts as several.
   */
  registries?: { host: string; port: number }[];
  /** Address to listen on for greetings; `::` (all, falling back to 0.0.0.0) by default. */
  listenHost?: string;
  /** Listening port; 0 (default) lets the OS pick. */
  port?: number;
  /** `host[:port]` to register instead of what the registry sees (NAT, port mapping). */
  advertise?: string;
  /** Stable identity; by default the id the transport's certificate names, else random per process. */
  id?: string;
  name?: string;
  token?: string;
  greetTimeoutMs?: number;
  greetConcurrency?: number;
  greetRetries?: number;
  connectTimeoutMs?: number;
  /** Deadline for the registry's answer to `register`; past it the node dials again. */
  registerTimeoutMs?: number;
  reconnectBaseMs?: number;
  reconnectMaxMs?: number;
  maxLineBytes?: number;
  maxReplyBytes?: number;
  inboundTimeoutMs?: number;
  maxInboundConns?: number;
  /** Open inbound greeting connections from one source address. */
  maxInboundPerAddress?: number;
  onEvent?: (e: NodeEvent) => void;
  /** Resolve startNode only after the first registration (default true). */
  waitForRegistration?: boolean;
  /** Stop, failing, if not registered within this time of starting (default: keep trying). */
  giveUpAfterMs?: number;
  /** Where sockets are opened (default plain TCP; `tls(...)` for TLS to the registry, and with a mesh CA mutual TLS everywhere). */
  transport?: Transport;
  /** Drives the heartbeat (default: the system's monotonic clock). */
  clock?: Clock;
}

export type NodeEvent =
  | { event: "listening"; id: string; name?: string; host: string; port: number }
  | SessionEvent
  | GreetingEvent
  | { event: "stopped" }
  /** `warning` once at start (a token sent in clear to a remote registry); on SIGHUP (CLI only) `tls-reloaded` or `tls-reload-failed`. */
  | CommonEvent
  /** On SIGUSR1 (CLI only): the node's current view. */
  | { event: "view"; registered: boolean; peers: string[] };

import { RegistrationError, RegistrySession, type SessionEvent } from "./registration.ts";
export { GaveUpError, RegistrationError, type SessionEvent } from "./registration.ts";

export interface PeerNode {
  readonly id: string;
  /** Port this node listens on. */
  readonly port: number;
  /** True while the registry session is registered. */
  readonly registered: boolean;
  /** This node's view of the other live nodes. */
  peers(): Peer[];
  /** Ids of the peers this node has exchanged a greeting with, either way. */
  met(): string[];
  /** Resolves when the node has stopped; rejects if it stopped on a fatal registry error. */
  readonly done: Promise<void>;
  /** Says `leave` to the registry, stops listening, and resolves once closed. */
  stop(): Promise<void>;
  /** Stops without saying goodbye (tests of crash handling). */
  kill(): void;
  [Symbol.asyncDispose](): Promise<void>;
}

/** Starts a node; by default resolves once it is registered. */
export async function startNode(options: NodeOptions): Promise<PeerNode> {
  const s = settingsOf(options);
  const transport = options.transport ?? tcp;
  const emit = options.onEvent ?? (() => {});
  const me: Identity = { id: options.id ?? transport.identity?.node ?? randomId(), name: options.name || undefined };
  const clear = tokenInClear(s.token, transport, s.registries);
  if (clear) emit(clear);
  const view = new Map<string, Peer>();
  const listed = (id: string) => view.has(id);
  const met = new Met(listed);
  const listener = new Listener(s, transport, me, met, (id) => view.get(id), emit);
  emit({ event: "listening", id: me.id, name: me.name, host: s.listenHost, port: listener.port });
  const done = Promise.withResolvers<void>();
  done.promise.catch(() => {}); // observed through `done` by whoever cares
  const greetAll = (peers: Peer[]) => {
    for (const p of peers) greeter.greet(p);
  };
  const session = new RegistrySession(s, transport, options.clock ?? systemClock, me, listener.port, view, met, greetAll, (p) => listener.onListed(p), emit, (error) => {
    void halt().then(() => done.reject(error));
  });
  const greeter = new Greeter(s, transport, me, () => session.listedAs(), met, listed, (id) => session.receipt([id]), emit);
  const halt = () => {
    greeter.stop();
    listener.stop();
    return session.stop(false);
  };

  const node: PeerNode = {
    id: me.id,
    port: listener.port,
    get registered() {
      return session.registered;
    },
    peers: () => Array.from(view.values()),
    met: () => met.list(),
    done: done.promise,
    async stop() {
      greeter.stop();
      listener.stop();
      await session.stop(true);
      emit({ event: "stopped" });
      done.resolve();
    },
    kill() {
      void halt();
      done.resolve();
    },
    [Symbol.asyncDispose]() {
      return this.stop();
    },
  };

  session.start();
  if (options.waitForRegistration !== false) {
    try {
      await session.firstRegistration;
    } catch (e) {
      await halt();
      throw e;
    }
  }
  return node;
}

// --- internal ----------------------------------------------------------------

/**
 * The warning due when `token` would cross a network unencrypted: no TLS, and
 * a registry not on this host. Shared by the node and `list`, which send the
 * same token the same way.
 */
function tokenInClear(token: string | undefined, transport: Transport, registries: { host: string }[]): { event: "warning"; message: string } | undefined {
  const remote = registries.find((r) => !isLoopbackHost(r.host));
  if (!token || transport.encrypted || !remote) return undefined;
  return { event: "warning", message: `the token travels in clear to ${remote.host}: connect with TLS (--tls, or --tls-ca FILE)` };
}

/** Every setting, defaults filled in: what the listener, the greeter and the registration need. */
function settingsOf(options: NodeOptions) {
  return {
    registries: [{ host: options.registryHost, port: options.registryPort }, ...(options.registries ?? [])],
    listenHost: options.listenHost ?? "::",
    port: options.port ?? 0,
    advertise: options.advertise ? parseHostPort(options.advertise) : {},
    token: options.token,
    greetTimeoutMs: options.greetTimeoutMs ?? DEFAULTS.greetTimeoutMs,
    greetConcurrency: options.greetConcurrency ?? DEFAULTS.greetConcurrency,
    greetRetries: options.greetRetries ?? DEFAULTS.greetRetries,
    connectTimeoutMs: options.connectTimeoutMs ?? DEFAULTS.connectTimeoutMs,
    // Twice the registry's own deadline for `register`, so a registry busy probing is not abandoned early.
    registerTimeoutMs: options.registerTimeoutMs ?? 2 * DEFAULTS.registerTimeoutMs,
    reconnectBaseMs: options.reconnectBaseMs ?? DEFAULTS.reconnectBaseMs,
    reconnectMaxMs: options.reconnectMaxMs ?? DEFAULTS.reconnectMaxMs,
    maxLineBytes: options.maxLineBytes ?? DEFAULTS.maxLineBytes,
    maxReplyBytes: options.maxReplyBytes ?? DEFAULTS.maxReplyBytes,
    inboundTimeoutMs: options.inboundTimeoutMs ?? DEFAULTS.inboundTimeoutMs,
    maxInboundConns: options.maxInboundConns ?? DEFAULTS.maxInboundConns,
    maxInboundPerAddress: options.maxInboundPerAddress ?? DEFAULTS.maxInboundPerAddress,
    giveUpAfterMs: options.giveUpAfterMs,
  };
}

// --- command line ------------------------------------------------------------

function describe(e: NodeEvent): string {
  const who = (p: string, n: string | undefined) => `${p}${n ? ` (${n})` : ""}`;
  switch (e.event) {
    case "listening":
      return `node ${who(e.id, e.name)} listening on port ${e.port}`;
    case "registered":
      return `registered as ${e.address}${e.again ? " again" : ""} with registry ${e.registry}; given ${e.peers} peer${e.peers === 1 ? "" : "s"}`;
    case "greeted":
      return `greeted ${who(e.peer, e.name)} at ${e.address}`;
    case "greeting":
      return `greeting from ${who(e.peer, e.name)} at ${e.address}`;
    case "peer-joined":
      return `peer ${who(e.peer, e.name)} joined at ${e.address}`;
    case "peer-left":
      return `peer ${e.peer} left (${e.reason})`;
    case "greet-failed":
      return `could not greet ${e.peer} at ${e.address} after ${e.tries} tries: ${e.reason}`;
    case "disconnected":
      return `registry session lost: ${e.reason}`;
    case "reconnecting":
      return `reconnecting to the registry in ${e.inMs}ms`;
    case "resync":
      return `missed membership updates (expected seq ${e.expected}, got ${e.got}); resyncing`;
    case "error":
      return `${e.code}: ${e.message}`;
    case "stopped":
      return "node stopped";
    case "view":
      return `${e.registered ? "registered" : "not registered"}; peers: ${e.peers.join(", ") || "none"}`;
    default:
      return describeCommon(e);
  }
}

function level(e: NodeEvent): Level {
  if (e.event === "error" || e.event === "greet-failed" || isWarning(e)) return "warn";
  return e.event === "listening" || e.event === "registered" ? "success" : "info";
}

/** Failed attempts to reach the registry between two reminders in the readable log. */
const REMIND_EVERY = 10;

/** How long a peer missing after a registry restart may take to be back before the readable log calls it gone. */
const RESTART_GRACE_MS = 10_000;

/**
 * The readable log of a node (JSON output keeps every event). While the
 * registry cannot be reached it says so once, naming the address and the
 * likely cause, then reminds every REMIND_EVERY attempts; a refusal is printed
 * once, not again as the lost session and the exit; a peer absent from the
 * list only while the registry restarts is not reported as left and back.
 */
class ReadableLog {
  private readonly log = createLog("node");
  private failing = 0;
  /** The last registry error printed: the disconnection and the exit that follow it say nothing new. */
  lastError = "";
  private readonly held = new Map<string, Timer>();

  /** `where`: "the registry at host:port", or the registries, when several are given. */
  constructor(private readonly where: string) {}

  readonly print = (e: NodeEvent): void => {
    switch (e.event) {
      case "registered":
        this.failing = 0;
        break;
      case "error":
        this.lastError = `${e.code}: ${e.message}`;
        break;
      case "disconnected":
        return this.disconnected(e.reason, e.registered);
      case "reconnecting":
        if (this.failing > 1 && e.attempt % REMIND_EVERY === 0) this.log("info", `still trying to reach ${this.where} (attempt ${e.attempt})`);
        return;
      case "peer-left":
        if (e.reason !== "restart" && e.reason !== "sync") break;
        return void this.held.set(
          e.peer,
          setTimeout(() => {
            this.held.delete(e.peer);
            this.log("info", describe(e));
          }, RESTART_GRACE_MS).unref(),
        );
      case "peer-joined": {
        const timer = this.held.get(e.peer);
        if (!timer) break;
        clearTimeout(timer);
        this.held.delete(e.peer);
        return; // it was only away while the list was rebuilt
      }
    }
    this.log(level(e), describe(e));
  };

  private disconnected(reason: string, registered: boolean): void {
    if (reason === this.lastError) return;
    if (registered) {
      this.failing = 1;
      return this.log("warn", `registry session lost: ${reason}; reconnecting`);
    }
    if (this.failing++ > 0) return;
    this.log("warn", `cannot reach ${this.where}: ${reason}${hint(reason)}; retrying`);
  }
}

/** The likely cause of a failure to reach the registry, for people. */
function hint(reason: string): string {
  if (/ECONNREFUSED/.test(reason)) return " (is a registry running there?)";
  if (/ENOTFOUND|cannot resolve/.test(reason)) return " (is the name right?)";
  if (/ETIMEDOUT|timeout/.test(reason)) return " (is it reachable from here? a firewall?)";
  return "";
}

const flags = {
  "registry-host": { type: "positional", required: false, description: "Registry host [env REGISTRY_HOST]" },
  "registry-port": { type: "positional", required: false, description: "Registry port [env REGISTRY_PORT]" },
  registry: {
    type: "string",
    description: "Another registry sharing the list, host:port; repeat it for more. The node picks one at random and fails over to the next [env REGISTRY_ADDRS=h1:p1,h2:p2]",
  },
  json: { type: "boolean", description: "One JSON event per line on stdout [env LOG_JSON=1]" },
  listen: { type: "string", valueHint: "address", description: "Address to listen on for greetings [env NODE_LISTEN, default ::, all interfaces]" },
  port: { type: "string", valueHint: "port", description: "Port to listen on [env NODE_PORT, default 0: the OS picks]" },
  advertise: { type: "string", valueHint: "host[:port]", description: "host[:port] to register instead of the address the registry sees [env NODE_ADVERTISE]" },
  name: { type: "string", valueHint: "text", description: "Human-readable name shown to peers [env NODE_NAME]" },
  id: { type: "string", valueHint: "id", description: "Stable node id [env NODE_ID, default random]" },
  token: { type: "string", valueHint: "secret", description: "Shared secret the registry requires [env REGISTRY_TOKEN]" },
  "greet-timeout": { type: "string", valueHint: "ms", description: `Per-greeting deadline in ms [env NODE_GREET_TIMEOUT_MS, default ${DEFAULTS.greetTimeoutMs}]` },
  "greet-concurrency": { type: "string", valueHint: "n", description: `Greetings in flight at once [env NODE_GREET_CONCURRENCY, default ${DEFAULTS.greetConcurrency}]` },
  "greet-retries": { type: "string", valueHint: "n", description: `Extra attempts per greeting [env NODE_GREET_RETRIES, default ${DEFAULTS.greetRetries}]` },
  "reconnect-max": { type: "string", valueHint: "ms", description: `Cap of the reconnect backoff in ms [env NODE_RECONNECT_MAX_MS, default ${DEFAULTS.reconnectMaxMs}]` },
  "register-timeout": { type: "string", valueHint: "ms", description: `Deadline for the registry's answer to register, ms [env NODE_REGISTER_TIMEOUT_MS, default ${2 * DEFAULTS.registerTimeoutMs}]` },
  "max-reply": { type: "string", valueHint: "bytes", description: `Longest line accepted from the registry, bytes [env NODE_MAX_REPLY_BYTES, default ${DEFAULTS.maxReplyBytes}]` },
  "max-line": { type: "string", valueHint: "bytes", description: `Longest line the greeting listener accepts, bytes [env NODE_MAX_LINE, default ${DEFAULTS.maxLineBytes}]` },
  "inbound-timeout": { type: "string", valueHint: "ms", description: `Lifetime of an inbound greeting connection, ms [env NODE_INBOUND_TIMEOUT_MS, default ${DEFAULTS.inboundTimeoutMs}]` },
  "max-inbound": { type: "string", valueHint: "n", description: `Open inbound greeting connections at most [env NODE_MAX_INBOUND, default ${DEFAULTS.maxInboundConns}]` },
  "give-up-after": { type: "string", valueHint: "ms", description: "Exit 1 if not registered within this time of starting [env NODE_GIVE_UP_AFTER_MS, default: keep trying]" },
  "ports-file": { type: "string", valueHint: "file", description: "Append what it listens on to this file, one JSON line (the Docker HEALTHCHECK reads it) [env PORTS_FILE]" },
  "max-inbound-per-ip": { type: "string", valueHint: "n", description: `Open inbound greeting connections from one source address [env NODE_MAX_INBOUND_PER_IP, default ${DEFAULTS.maxInboundPerAddress}]` },
  tls: { type: "boolean", description: "Connect to the registry with TLS, trusting the system's CAs [env NODE_TLS=1]" },
  "tls-ca": { type: "string", valueHint: "file", description: "CA certificate (PEM) the registry's certificate, and with --tls-cert every node's, must be signed by; implies --tls [env NODE_TLS_CA]" },
  "tls-server-name": { type: "string", valueHint: "name", description: "Name the registry's certificate must carry, when connecting by address or another name [env NODE_TLS_SERVER_NAME, default the registry host]" },
  "tls-cert": { type: "string", valueHint: "file", description: "This node's certificate (PEM): mutual TLS with the registry and every node; the node's id is the one it names [env NODE_TLS_CERT]" },
  "tls-key": { type: "string", valueHint: "file", description: "The key of --tls-cert (PEM) [env NODE_TLS_KEY]" },
} satisfies ArgsDef;

/**
 * The transport the TLS flags ask for: none (plain TCP), TLS to the registry,
 * or with a certificate mutual TLS across the mesh, where the node's id is
 * the one its certificate names.
 */
function nodeTransport(
  f: { tls: boolean; ca?: string; serverName?: string; cert?: string; key?: string },
  id: string | undefined,
  handshakeTimeoutMs: number,
): TlsTransport | undefined {
  if (!f.tls && f.ca === undefined) {
    const stray = f.cert !== undefined ? "--tls-cert" : f.key !== undefined ? "--tls-key" : f.serverName !== undefined ? "--tls-server-name" : undefined;
    if (stray) throw new UsageError(`${stray} needs --tls-ca (or --tls): without them the node does not use TLS`);
    return undefined;
  }
  if ((f.cert !== undefined || f.key !== undefined) && f.ca === undefined) {
    throw new UsageError("--tls-cert and --tls-key need --tls-ca: the CA that signed the other nodes' certificates");
  }
  const transport = tlsFromFlags({ ca: f.ca, meshCa: f.cert === undefined ? undefined : f.ca, cert: f.cert, key: f.key, serverName: f.serverName, handshakeTimeoutMs });
  const named = transport.identity?.node;
  if (f.cert !== undefined && named === undefined) {
    throw new UsageError(`the certificate in ${f.cert} names no node: a node's certificate carries the URI ${NODE_URI_PREFIX}<id> in its subjectAltName (bun run certs makes them)`);
  }
  if (f.cert !== undefined && id !== undefined && id !== named) {
    throw new UsageError(`--id ${id} is not the node the certificate in ${f.cert} is for (${named}): leave --id out, or give that node's certificate`);
  }
  return transport;
}

type TlsKey = "tls-ca" | "tls-server-name" | "tls-cert" | "tls-key";

/** The TLS settings of the command line (a node's, and `list`'s), flag first, then variable. */
function tlsFlags(flag: (key: TlsKey, env: string) => string | undefined, on: (key: "tls", env: string) => boolean) {
  return {
    tls: on("tls", "NODE_TLS"),
    ca: flag("tls-ca", "NODE_TLS_CA"),
    serverName: flag("tls-server-name", "NODE_TLS_SERVER_NAME"),
    cert: flag("tls-cert", "NODE_TLS_CERT"),
    key: flag("tls-key", "NODE_TLS_KEY"),
  };
}

const help = {
  usage: [
    "bun client.ts <registry-host> <registry-port> [options]",
    "bun client.ts <registry-host> <registry-port> --registry <host:port> [--registry <host:port> ...] [options]",
    "bun client.ts list <registry-host> <registry-port> [--json] [--token <secret>] [--tls | --tls-ca <file> ...]",
  ],
  description: "Peer node: listens on a port the OS picks, registers with the registry, greets every other node and answers their greetings.",
  required: ["registry-host", "registry-port"],
  more: "Commands:\n  list   print the registry's nodes (without registering), then exit; --json for JSON",
  examples: [
    "bun client.ts localhost 8080",
    "bun client.ts registry.example 8080 --name edge-1 --json",
    "bun client.ts 10.0.0.1 8080 --advertise 203.0.113.7:7001     # behind NAT: the address others must use",
    "bun client.ts 10.0.0.1 8080 --registry 10.0.0.2:8080         # several registries sharing a store",
    "bun client.ts list localhost 8080",
  ],
};

/** The registry's address from the two positionals (or their variables), or a usage error. */
function registryArg(flag: (key: "registry-host" | "registry-port", env: string) => string | undefined, command = "bun client.ts") {
  const host = flag("registry-host", "REGISTRY_HOST");
  const portText = flag("registry-port", "REGISTRY_PORT");
  if (!host) throw new UsageError(`missing the registry address: ${command} <registry-host> <registry-port>`);
  if (portText === undefined) throw new UsageError(`missing the registry port: ${command} <registry-host> <registry-port>`);
  const port = parsePort(portText, false);
  if (port === undefined) throw new UsageError(`registry port must be a number from 1 to 65535, got "${portText}"`);
  return { host, port };
}

/**
 * The registries a node is given: the positional host and port (or
 * REGISTRY_HOST and REGISTRY_PORT), then every --registry (or else
 * REGISTRY_ADDRS). At least one; the positional pair may be left out when
 * the others are given.
 */
function registriesFrom(flag: (key: "registry-host" | "registry-port", env: string) => string | undefined, rawArgs: string[]): { host: string; port: number }[] {
  const more = repeatedFlag(rawArgs, "registry");
  const extra = more.length ? more : (process.env.REGISTRY_ADDRS ?? "").split(",").filter((x) => x.trim());
  const given = flag("registry-host", "REGISTRY_HOST") !== undefined || flag("registry-port", "REGISTRY_PORT") !== undefined;
  const out = given || !extra.length ? [registryArg(flag)] : [];
  for (const text of extra) {
    let a: { host?: string; port?: number };
    try {
      a = parseHostPort(text);
    } catch (e) {
      throw new UsageError(`--registry: ${(e as Error).message}`);
    }
    if (!a.host || a.port === undefined) throw new UsageError(`--registry must be host:port, got "${text}"`);
    out.push({ host: a.host, port: a.port });
  }
  return out;
}

export const command = defineCommand({
  meta: { name: "client", version: VERSION, description: help.description },
  args: flags,
  async run({ args, rawArgs }) {
    await runCli(async () => {
      const { text: flag, int: num, on } = readSettings(args, rawArgs, flags);
      const [first, ...registries] = registriesFrom(flag, rawArgs);
      const listenPortText = flag("port", "NODE_PORT");
      const port = listenPortText === undefined ? 0 : parsePort(listenPortText);
      if (port === undefined) throw new UsageError(`--port must be a number from 0 to 65535, got "${listenPortText}"`);
      const advertise = flag("advertise", "NODE_ADVERTISE");
      if (advertise !== undefined) {
        try {
          parseHostPort(advertise);
        } catch (e) {
          throw new UsageError(`--advertise: ${(e as Error).message}`);
        }
      }
      const json = on("json", "LOG_JSON");
      const addresses = [first!, ...registries].map((r) => formatAddress(r.host, r.port));
      const readable = json ? undefined : new ReadableLog(`${addresses.length > 1 ? "the registries at" : "the registry at"} ${addresses.join(", ")}`);
      const show = readable?.print ?? createPrinter("node", true, describe, level);
      const record = portsRecorder(flag("ports-file", "PORTS_FILE"), "node");
      const print = (e: NodeEvent) => {
        record(e);
        show(e);
      };
      const inboundTimeoutMs = num("inbound-timeout", "NODE_INBOUND_TIMEOUT_MS", 1, MAX_TIMER_MS);
      const id = flag("id", "NODE_ID");
      const transport = nodeTransport(tlsFlags(flag, on), id, Math.min(DEFAULTS.handshakeTimeoutMs, inboundTimeoutMs ?? DEFAULTS.inboundTimeoutMs));
      const node = await startNode({
        registryHost: first!.host,
        registryPort: first!.port,
        registries,
        listenHost: flag("listen", "NODE_LISTEN"),
        port,
        advertise,
        name: flag("name", "NODE_NAME"),
        id,
        token: flag("token", "REGISTRY_TOKEN"),
        greetTimeoutMs: num("greet-timeout", "NODE_GREET_TIMEOUT_MS", 1, MAX_TIMER_MS),
        greetConcurrency: num("greet-concurrency", "NODE_GREET_CONCURRENCY", 1),
        greetRetries: num("greet-retries", "NODE_GREET_RETRIES"),
        reconnectMaxMs: num("reconnect-max", "NODE_RECONNECT_MAX_MS", 1, MAX_TIMER_MS),
        maxLineBytes: num("max-line", "NODE_MAX_LINE", 64),
        inboundTimeoutMs,
        maxInboundConns: num("max-inbound", "NODE_MAX_INBOUND", 1),
        maxInboundPerAddress: num("max-inbound-per-ip", "NODE_MAX_INBOUND_PER_IP", 1),
        registerTimeoutMs: num("register-timeout", "NODE_REGISTER_TIMEOUT_MS", 1, MAX_TIMER_MS),
        maxReplyBytes: num("max-reply", "NODE_MAX_REPLY_BYTES", 1024),
        giveUpAfterMs: num("give-up-after", "NODE_GIVE_UP_AFTER_MS", 1),
        transport,
        onEvent: print,
        // Signals must stop the node even while its registry is still out of reach;
        // a refused first registration still ends the process through `done`.
        waitForRegistration: false,
      });
      stopOnSignals(() => node.stop());
      if (transport) reloadOnHangup(() => print(transport.reload()));
      // Lets a harness (scripts/chaos.ts) read this node's view without replaying its whole history.
      process.on("SIGUSR1", () => print({ event: "view", registered: node.registered, peers: node.peers().map((p) => p.id) }));
      await node.done.catch((e: unknown) => {
        // Already said, as the registry's error: exit 1 without saying it again.
        if (readable && e instanceof RegistrationError && e.message === readable.lastError) process.exit(1);
        throw e;
      });
    });
  },
});

const listFlags = {
  "registry-host": flags["registry-host"],
  "registry-port": flags["registry-port"],
  json: { type: "boolean", description: "The list as one JSON object on stdout [env LOG_JSON=1]" },
  token: flags.token,
  tls: flags.tls,
  "tls-ca": flags["tls-ca"],
  "tls-server-name": flags["tls-server-name"],
  "tls-cert": flags["tls-cert"],
  "tls-key": flags["tls-key"],
} satisfies ArgsDef;

const listHelp = {
  usage: ["bun client.ts list <registry-host> <registry-port> [options]"],
  description: "Prints the registry's nodes (id, name, address) without registering, then exits.",
  required: ["registry-host", "registry-port"],
  examples: ["bun client.ts list localhost 8080", "bun client.ts list registry.example 8443 --tls --json"],
};

/** `bun client.ts list HOST PORT`: the registry's nodes, read with the protocol's `list` request. */
export const listCommand = defineCommand({
  meta: { name: "list", version: VERSION, description: "Print the registry's nodes without registering, then exit." },
  args: listFlags,
  async run({ args, rawArgs }) {
    await runCli(async () => {
      const { text: flag, on } = readSettings(args, rawArgs, listFlags);
      const registry = registryArg(flag, "bun client.ts list");
      const transport = nodeTransport(tlsFlags(flag, on), undefined, DEFAULTS.handshakeTimeoutMs);
      const token = flag("token", "REGISTRY_TOKEN");
      const clear = tokenInClear(token, transport ?? tcp, [registry]);
      // On stderr whatever the format: stdout carries only the list, which scripts parse.
      if (clear) createLog("list")("warn", describeCommon(clear));
      const list = await listNodes(registry.host, registry.port, { token, transport });
      if (on("json", "LOG_JSON")) return void process.stdout.write(JSON.stringify({ ...list, count: list.peers.length }) + "\n");
      process.stdout.write(table(["id", "name", "address"], list.peers.map((p) => [p.id, p.name ?? "", formatAddress(p.host, p.port)])));
      process.stdout.write(`${list.peers.length} node${list.peers.length === 1 ? "" : "s"} (boot ${list.boot}, seq ${list.seq})\n`);
    });
  },
});

/** The registry's list, through its `list` request; rejects with the registry's error or a connection failure. */
export async function listNodes(
  host: string,
  port: number,
  o: { token?: string; timeoutMs?: number; transport?: Transport } = {},
): Promise<{ boot: string; seq: number; peers: Peer[] }> {
  const timeoutMs = o.timeoutMs ?? 5_000;
  const answer = Promise.withResolvers<{ boot: string; seq: number; peers: Peer[] }>();
  const handlers = lineHandlers<undefined>({
    maxLineBytes: DEFAULTS.maxReplyBytes,
    state: () => undefined,
    line(_conn, line) {
      const r = decode(FromRegistry, line);
      if (!r.ok) return answer.reject(new Error(`from registry: ${r.message}`));
      if (r.msg.type === "snapshot") return answer.resolve({ boot: r.msg.boot, seq: r.msg.seq, peers: r.msg.peers });
      if (r.msg.type === "error") return answer.reject(new RegistrationError(r.msg.code, r.msg.message));
      answer.reject(new Error(`unexpected answer from the registry: ${r.msg.type}`));
    },
    close: () => answer.reject(new Error("the registry closed the connection without an answer")),
  });
  // Settled by the deadline or a close before (or without) being awaited: a TLS dial can outlast the deadline.
  answer.promise.catch(() => {});
  const timer = setTimeout(() => answer.reject(new Error(`no answer from ${formatAddress(host, port)} within ${timeoutMs}ms`)), timeoutMs);
  let conn: Conn<undefined>;
  try {
    conn = await (o.transport ?? tcp).dial(host, port, handlers, timeoutMs);
  } catch (e) {
    clearTimeout(timer);
    throw e;
  }
  try {
    conn.send({ type: "list", v: PROTOCOL_VERSION, ...(o.token ? { token: o.token } : {}) });
    return await answer.promise;
  } finally {
    clearTimeout(timer);
    conn.destroy();
  }
}

/** Columns padded to their widest cell. */
function table(head: string[], rows: string[][]): string {
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  return [head, ...rows].map((r) => r.map((cell, i) => cell.padEnd(widths[i]!)).join("  ").trimEnd() + "\n").join("");
}

if (import.meta.main) {
  const [first, ...rest] = process.argv.slice(2);
  const usage = (h: Help, args: ArgsDef) => async () => void process.stdout.write(renderHelp(h, args));
  if (first === "list") await runMain(listCommand, { rawArgs: rest, showUsage: usage(listHelp, listFlags) });
  else await runMain(command, { showUsage: usage(help, flags) });
}

/**
 * RedisMembership: one list shared by several registries through Redis (>= 7)
 * or Valkey (>= 7.2); docs/STORE.md is the design. Each registry reads a local
 * mirror (a MemoryMembership) synchronously. Every change is one Lua script in
 * the store: it checks and updates the shared list, takes the next global seq
 * and appends the change to a log, a stream whose entry ids follow the seq.
 * Every registry applies that log to its mirror in order, so all of them
 * announce the same changes under the same numbers. Leases tell the survivors
 * which registry died; a lost store leaves each registry serving alone until
 * it reconciles. Bun's built-in RedisClient: no dependency.
 */
import { RedisClient, type RedisOptions } from "bun";
import * as v from "valibot";
import { Joined, LeaveReason, randomId } from "./protocol.ts";
import {
  Member,
  MemoryMembership,
  addressOf,
  type Change,
  type JoinResult,
  type Membership,
  type MeshState,
  type StoreState,
} from "./membership.ts";

export interface StoreOptions {
  /** This registry's id: names its lease, and must be the `registry` of every member it joins. */
  registryId: string;
  /** Used when the URL carries none (the CLI reads REGISTRY_STORE_PASSWORD). */
  password?: string;
  /** Prefix of every key, so that several lists can share one database. */
  prefix?: string;
  /** Lease refresh and dead-registry sweep interval. */
  heartbeatMs?: number;
  /** A registry silent this long is dead: survivors remove its entries. */
  leaseMs?: number;
  /** Deadline of one store command; a miss counts as a lost store. */
  opTimeoutMs?: number;
  connectTimeoutMs?: number;
  /** Reconnect backoff: full jitter between 0 and min(max, base * 2^attempt). */
  retryBaseMs?: number;
  retryMaxMs?: number;
  /** Log entries kept; a mirror further behind reloads the whole list. */
  logLength?: number;
  /** For rediss:// (a private CA, a client certificate). */
  tls?: Bun.TLSOptions;
  now?: () => number;
}

export const STORE_DEFAULTS = {
  prefix: "registry:",
  heartbeatMs: 1_000,
  leaseMs: 3_000,
  opTimeoutMs: 1_000,
  connectTimeoutMs: 1_000,
  retryBaseMs: 100,
  retryMaxMs: 1_000,
  logLength: 10_000,
} as const;

/** A store URL or option that cannot work; the message says what was expected. */
export class StoreConfigError extends Error {
  override name = "StoreConfigError";
}

/**
 * Checks a store URL (`redis://[user:password@]host[:port][/db]`, or
 * `rediss://` for TLS) and adds `password` when the URL has none.
 */
export function storeUrl(text: string, password?: string): URL {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new StoreConfigError(`store "${text}" is not a URL: expected redis://host:port[/db] or rediss://host:port[/db]`);
  }
  if (url.protocol !== "redis:" && url.protocol !== "rediss:") {
    throw new StoreConfigError(`store URL must start with redis:// or rediss://, got ${url.protocol}//`);
  }
  if (!url.hostname) throw new StoreConfigError("store URL names no host: expected redis://host:port[/db]");
  if (!/^\/?\d*$/.test(url.pathname) || url.search || url.hash) {
    throw new StoreConfigError(`store URL may end only in a database number (/0, /1, ...), got "${url.pathname}${url.search}${url.hash}"`);
  }
  if (password && !url.password) url.password = password;
  return url;
}

/** Connects to the store and loads the shared list; a store that cannot be reached yet gives a degraded membership that keeps retrying. */
export async function openStore(url: string, options: StoreOptions): Promise<RedisMembership> {
  const m = new RedisMembership(storeUrl(url, options.password), options);
  await m.start();
  return m;
}

export class RedisMembership implements Membership {
  readonly registryId: string;
  /** Why the store is degraded, while it is. */
  lastError: string | undefined;
  private readonly o: Required<Omit<StoreOptions, "password" | "tls" | "registryId">> & { tls?: Bun.TLSOptions };
  private readonly url: string;
  /** `host:port/db`, for messages: never the password. */
  private readonly where: string;
  private readonly mirror: MemoryMembership;
  private readonly listeners = new Set<(change: Change) => void>();
  /** The registrations this registry holds: what it writes back when the store lost them. */
  private readonly own = new Map<string, Member>();
  private link: Link | undefined;
  private current: StoreState = "degraded";
  /** Id of the last log entry applied to the mirror. */
  private cursor = "0-0";
  /** Changes waiting for the next batch script; batch scripts on their way. */
  private readonly queue: Queued[] = [];
  private batches = 0;
  private sendSoon: ReturnType<typeof setImmediate> | undefined;
  /** Entries that arrived (in a script's reply or a message) before the entries they follow, by the id they follow. */
  private readonly pending = new Map<string, { id: string; entry: string | LogChange }>();
  /** The newest log entry known to be in the store; while it is ahead of `cursor`, something is missing. */
  private known = "0-0";
  /** Messages that came while the list was being reloaded: read against the reloaded list. */
  private early: string[] = [];
  private catching: Promise<void> | undefined;
  private catchTimer: Timer | undefined;
  /** Joins and leaves waiting for their entry to reach the mirror: true once applied, false if a reload or a lost store overtook it. */
  private readonly waiters = new Map<string, (applied: boolean) => void>();
  private reconciling: Promise<void> | undefined;
  private recovering: Promise<void> | undefined;
  private inflight = 0;
  private drained: (() => void) | undefined;
  /** The mirror's seq when the store was lost: changes made alone go above it. */
  private storeSeq = 0;
  private beating = false;
  private closed = false;
  private readonly heartbeat: Timer;
  private retry: { timer: Timer; wake: () => void } | undefined;

  constructor(url: URL, options: StoreOptions) {
    const prefix = options.prefix ?? STORE_DEFAULTS.prefix;
    // The prefix ends up in a KEYS pattern when an epoch is wiped.
    if (!/^[A-Za-z0-9._:-]*$/.test(prefix)) throw new StoreConfigError(`store key prefix "${prefix}" may hold only A-Z a-z 0-9 . _ : -`);
    if (!options.registryId) throw new StoreConfigError("a registry id is needed to hold a lease in the store");
    this.registryId = options.registryId;
    this.o = { ...STORE_DEFAULTS, ...definedOnly(options), prefix, now: options.now ?? (() => performance.now()) };
    this.url = url.href;
    this.where = `${url.host}${url.pathname.length > 1 ? url.pathname : ""}`;
    this.mirror = new MemoryMembership(randomId(), this.o.now);
    this.mirror.subscribe((change) => this.onMirror(change));
    this.heartbeat = setInterval(() => void this.beat(), this.o.heartbeatMs);
    this.heartbeat.unref();
  }

  get boot(): string {
    return this.mirror.boot;
  }
  get seq(): number {
    return this.mirror.seq;
  }
  get size(): number {
    return this.mirror.size;
  }
  get state(): StoreState {
    return this.current;
  }
  get(id: string): Member | undefined {
    return this.mirror.get(id);
  }
  at(address: string): Member | undefined {
    return this.mirror.at(address);
  }
  members(): IterableIterator<Member> {
    return this.mirror.members();
  }
  peerList(except?: string): string {
    return this.mirror.peerList(except);
  }
  pairs(): [string, string][] {
    return this.mirror.pairs();
  }
  mesh(): MeshState {
    return this.mirror.mesh();
  }
  subscribe(fn: (change: Change) => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  /** First connection: resolves once the list is loaded, or at once degraded (retrying) if the store cannot be reached. */
  async start(): Promise<void> {
    if (!(await this.attempt())) this.recoverLater();
  }

  async join(member: Member, replaces: readonly Member[]): Promise<JoinResult> {
    if (member.registry !== this.registryId) {
      throw new Error(`member ${member.id} names registry ${member.registry}, but this membership is ${this.registryId}'s`);
    }
    const result = await this.submit({
      kind: "j",
      args: [member.id, addressOf(member), storedJson(member), ...replaces.map((r) => r.ticket)],
      // Ours before its entry is applied, so that an entry of it coming from elsewhere is known by its ticket.
      before: (r) => {
        if (!r.startsWith("{")) this.own.set(member.id, member);
      },
      change: (id) => ({ kind: "joined", seq: seqOf(id), member }),
    });
    if (result?.startsWith("{")) {
      const holder = parseMember(result);
      if (!holder) throw new Error(`the store holds an unreadable entry for ${member.id} or its address`);
      return { ok: false, holder };
    }
    if (result !== undefined) {
      if (await this.applied(result)) return { ok: true, seq: seqOf(result) };
      // A reload or a lost store overtook the change: the mirror is the judge now.
      const listed = this.mirror.get(member.id);
      if (listed?.ticket === member.ticket) return { ok: true, seq: this.mirror.seq };
      if (this.current === "ok") {
        this.own.delete(member.id);
        const holder = listed ?? this.mirror.at(addressOf(member));
        return holder ? { ok: false, holder } : this.join(member, replaces);
      }
    }
    // Without the store this registry's list decides alone; the store learns it on reconcile.
    const r = await this.mirror.join(member, replaces);
    if (r.ok) this.own.set(member.id, member);
    else if (this.own.get(member.id)?.ticket === member.ticket) this.own.delete(member.id);
    return r;
  }

  async leave(member: Member, reason: LeaveReason): Promise<boolean> {
    if (this.own.get(member.id)?.ticket === member.ticket) this.own.delete(member.id);
    const result = await this.submit({
      kind: "l",
      args: [member.id, member.ticket, reason, addressOf(member)],
      change: (id) => ({ kind: "left", seq: seqOf(id), member, reason }),
    });
    if (result === "") return false;
    if (result !== undefined) {
      if (await this.applied(result)) return true;
      await this.mirror.leave(member, reason);
      return true;
    }
    return this.mirror.leave(member, reason);
  }

  receipt(member: Member, ids: readonly string[]): void {
    if (!ids.length) return;
    void this.submit({ kind: "r", args: [member.id, member.ticket, ...ids] }).then((result) => {
      if (result === undefined) this.mirror.receipt(member, ids);
    });
  }

  async isConnected(registry: string): Promise<boolean> {
    const link = this.link;
    // Without the store nothing is known: the caller must not take the holder for dead.
    if (registry === this.registryId || !link || this.current !== "ok") return true;
    try {
      const [subs, ttl] = await link.owed.track(
        Promise.all([link.cmd.send("PUBSUB", ["NUMSUB", this.key(`alive:${registry}`)]), link.cmd.send("PTTL", [this.key(`lease:${registry}`)])]),
      );
      // Connected is not enough: a frozen or cut-off registry keeps its connections but stops
      // renewing its lease. One that missed a renewal by half a beat is silent, as a session is
      // that missed a beat, and so are the sessions it holds.
      return Number((subs as unknown[])[1]) > 0 && Number(ttl) > this.o.leaseMs - 1.5 * this.o.heartbeatMs;
    } catch (e) {
      this.lose(link, e);
      return true;
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.heartbeat);
    clearTimeout(this.catchTimer);
    // What is still queued goes now (or learns that the store is gone).
    this.sendQueued();
    if (this.retry) {
      clearTimeout(this.retry.timer);
      this.retry.wake();
    }
    await this.recovering;
    const link = this.link;
    this.link = undefined;
    if (link) {
      // Survivors sweep whatever this registry still lists at their next beat instead of after the lease.
      await deadline(link.cmd.send("DEL", [this.key(`lease:${this.registryId}`)]), this.o.opTimeoutMs, "DEL lease").catch(() => {});
      closeLink(link);
    }
    this.settleWaiters();
    this.listeners.clear();
    await this.mirror.close();
  }

  // --- writing ---------------------------------------------------------------

  /**
   * Sends a change to the store; resolves with its result from the batch
   * script's reply, once the reply's entries reached the mirror (`before`
   * runs just before they do), or with undefined when the store is not ok or
   * was lost on the way. Changes go in order. One goes at once when none is
   * on its way; otherwise the changes of one turn of the event loop go
   * together, one script call for all (at high concurrency one call carries
   * tens of registrations' joins and leaves).
   */
  private submit(change: Omit<Queued, "done">): Promise<string | undefined> {
    // Without the store, and nothing ahead of it: the caller decides alone at once.
    if ((this.current !== "ok" || !this.link) && !this.batches && !this.queue.length) return Promise.resolve(undefined);
    return new Promise((done) => {
      this.queue.push({ ...change, done });
      if (!this.batches && this.queue.length === 1) this.sendQueued();
      else this.sendSoon ??= setImmediate(() => this.sendQueued());
    });
  }

  private sendQueued(): void {
    if (this.sendSoon) clearImmediate(this.sendSoon);
    this.sendSoon = undefined;
    while (this.queue.length) void this.sendBatch(this.queue.splice(0, MAX_BATCH));
  }

  /** One batch script (see BATCH) for `batch`, in its order; each change learns its result. */
  private async sendBatch(batch: Queued[]): Promise<void> {
    const args = [String(batch.length)];
    for (const q of batch) args.push(q.kind, String(q.args.length), ...q.args);
    this.batches++;
    const link = this.link;
    const reply = await this.write(SCRIPTS.batch, args).finally(() => this.batches--);
    const results = batch.map((_, k) => (reply ? String(reply[1 + k]) : undefined));
    if (reply) {
      try {
        const changes = new Map<string, LogChange>();
        batch.forEach((q, k) => {
          q.before?.(results[k]!);
          if (q.change) changes.set(results[k]!, q.change(results[k]!));
        });
        this.ingestReply(reply, 1 + batch.length, changes);
      } catch (e) {
        // A subscriber that throws while a change is applied must not kill the process: the list is reloaded instead.
        this.lose(link, e);
      }
    }
    batch.forEach((q, k) => q.done(results[k]));
  }

  /**
   * Runs a change script while the store is ok; undefined when it is not, or
   * was lost on the way (the outcome is then unknown, and reconcile settles
   * it). A store in a new epoch is reconciled with first.
   */
  private async write(script: Script, args: string[]): Promise<Reply | undefined> {
    for (let tries = 0; tries < 2; tries++) {
      while (this.reconciling) await this.reconciling;
      const link = this.link;
      if (this.current !== "ok" || !link) return undefined;
      this.inflight++;
      try {
        const reply = await this.run(link, script, [this.registryId, ...args]);
        if (reply[0] !== "epoch") return reply;
      } catch (e) {
        this.lose(link, e);
        return undefined;
      } finally {
        if (--this.inflight === 0) this.drained?.();
      }
      await this.resync();
    }
    // The epoch changed again under the reconcile: treat the store as lost rather than act on it.
    this.lose(this.link, new Error("the store changed epoch twice in a row"));
    return undefined;
  }

  /** Runs a script; its answer is owed within the command deadline (`long`: the reconcile's, five times that). */
  private run(link: Link, script: Script, args: string[], long = false): Promise<Reply> {
    const argv = [this.o.prefix, this.mirror.boot, String(this.o.logLength), ...args];
    const answer = (link.cmd.send("EVALSHA", [script.sha, "0", ...argv]) as Promise<Reply>).catch((e: Error) => {
      // A restarted store has forgotten the scripts; EVAL loads them again.
      if (!String(e.message).startsWith("NOSCRIPT")) throw e;
      return link.cmd.send("EVAL", [script.source, "0", ...argv]) as Promise<Reply>;
    });
    return link.owed.track(answer, long);
  }

  private async beat(): Promise<void> {
    if (this.beating || this.current !== "ok") return;
    this.beating = true;
    try {
      const reply = await this.write(SCRIPTS.heartbeat, [String(this.o.leaseMs)]);
      if (reply) this.ingestReply(reply, 2);
      // The newest entry in the log: anything this registry missed (a message lost, entries written by something else) is read now.
      if (reply && this.link) this.expect(this.link, String(reply[1]));
      // Our lease had run out: others may have swept our entries, which we still hold.
      if (reply?.[0] === "lost") await this.resync();
    } finally {
      this.beating = false;
    }
  }

  // --- reading the log -------------------------------------------------------

  /**
   * Feeds a script's log entries (from index `from` on, as id, previous id,
   * JSON) to the mirror. An entry of the caller's own change comes without
   * its JSON: `changes` has it, by id.
   */
  private ingestReply(reply: Reply, from = 1, changes?: Map<string, LogChange>): void {
    for (let i = from; i + 2 < reply.length; i += 3) {
      const id = String(reply[i]);
      const json = String(reply[i + 2]);
      if (!this.ingest(id, String(reply[i + 1]), json || (changes?.get(id) ?? json), false)) void this.resync();
    }
  }

  /** Another registry's change, published by its script on this registry's channel: its entries, one field a line. */
  private onMessage(link: Link, message: string): void {
    if (this.link !== link) return;
    if (this.reconciling) {
      this.early.push(message);
      return;
    }
    const f = message.split("\n");
    // A line break inside an entry's JSON: not written by a registry, as unreadable as a broken entry.
    if (f.length % 3 !== 0) return void this.resync();
    try {
      for (let i = 0; i < f.length; i += 3) {
        if (!this.ingest(f[i]!, f[i + 1]!, f[i + 2]!, false)) return void this.resync();
      }
    } catch (e) {
      // A subscriber that throws while a change is applied must not kill the process: the list is reloaded instead.
      this.lose(link, e);
    }
  }

  /**
   * Applies one log entry if it follows the last one applied (each names the
   * id before it). Replies and messages may arrive before entries they
   * follow: they wait, and if what they follow does not come at once, the
   * log is read (`catchUp`). What the log itself says is complete: an entry
   * there that does not follow means entries were trimmed or lost, and false
   * means the whole list must be reloaded.
   */
  private ingest(id: string, prev: string, entry: string | LogChange, fromLog: boolean): boolean {
    if (compareIds(id, this.cursor) <= 0) return true;
    if (prev !== this.cursor) {
      if (fromLog) return false;
      this.pending.set(prev, { id, entry });
      if (this.link) this.expect(this.link, id);
      return true;
    }
    if (!this.apply(id, entry)) return false;
    for (let next = this.pending.get(this.cursor); next; next = this.pending.get(this.cursor)) {
      this.pending.delete(this.cursor);
      if (!this.apply(next.id, next.entry)) return false;
    }
    return true;
  }

  private apply(id: string, entry: string | LogChange): boolean {
    const e = typeof entry === "string" ? this.entryOf(parseJson(entry)) : entry;
    if (!e) return false;
    this.cursor = id;
    if (e.kind === "greeted") for (const b of e.ids) this.mirror.apply({ kind: "greeted", a: e.a, b });
    else this.mirror.apply(e);
    const waiter = this.waiters.get(id);
    if (waiter) {
      this.waiters.delete(id);
      waiter(true);
    }
    return true;
  }

  /**
   * A log entry as the mirror takes it. Only a member this registry does not
   * hold yet is checked field by field (a third of the client's CPU went to
   * that): a leave names a registration the mirror lists, a join of its own
   * one this registry made, and their id and ticket find the member, checked
   * when it was listed.
   */
  private entryOf(raw: unknown): LogChange | undefined {
    const k = v.safeParse(KnownEntry, raw);
    if (k.success) {
      const { kind, seq, member, reason } = k.output;
      const held = kind === "left" ? this.mirror.get(member.id) : this.own.get(member.id);
      if (held?.ticket === member.ticket) {
        if (kind === "joined") return { kind, seq, member: held };
        if (reason) return { kind, seq, member: held, reason };
      }
    }
    const r = v.safeParse(LogEntry, raw);
    return r.success ? r.output : undefined;
  }

  private applied(id: string): Promise<boolean> {
    if (this.link === undefined) return Promise.resolve(false);
    if (compareIds(id, this.cursor) <= 0) return Promise.resolve(true);
    return new Promise((resolve) => this.waiters.set(id, resolve));
  }

  private settleWaiters(): void {
    for (const w of this.waiters.values()) w(false);
    this.waiters.clear();
  }

  /**
   * The store has entry `id` (a reply or message named it, or a heartbeat saw
   * it as the newest): if the mirror is still behind it a moment later (what
   * it follows was not published to this registry, or the message was lost),
   * the log is read from the cursor.
   */
  private expect(link: Link, id: string): void {
    if (compareIds(id, this.known) > 0) this.known = id;
    if (compareIds(this.known, this.cursor) <= 0) return;
    // A moment: an entry that came first on one connection usually has what it follows on its way on the other.
    this.catchTimer ??= setTimeout(() => {
      this.catchTimer = undefined;
      if (this.catching || this.link !== link || this.reconciling || compareIds(this.known, this.cursor) <= 0) return;
      const target = this.known;
      this.catching = this.catchUp(link).finally(() => {
        this.catching = undefined;
        // Learned of more while reading (that read may have been sent before it was written): look again.
        if (compareIds(this.known, target) > 0) this.expect(link, this.known);
      });
    }, CATCH_UP_DELAY_MS);
  }

  /** Reads the log from the cursor to its end (at the time of reading) into the mirror. */
  private async catchUp(link: Link): Promise<void> {
    const stream = this.key("log");
    try {
      for (let more = true; more; ) {
        const reply = await link.owed.track(link.cmd.send("XREAD", ["COUNT", String(READ_COUNT), "STREAMS", stream, this.cursor]));
        if (this.link !== link || this.reconciling) return;
        const entries = streamEntries(reply, stream);
        for (const [id, prev, json] of entries) {
          if (!this.ingest(id, prev, json, true)) return void this.resync();
        }
        more = entries.length === READ_COUNT;
      }
    } catch (e) {
      // The store failed, or a subscriber threw while a change was applied: either way the list is reloaded.
      this.lose(link, e);
    }
  }

  /** Keeps `own` true to the list: registrations another registry took over are no longer ours to write back. */
  private onMirror(change: Change): void {
    if (change.kind === "joined" && change.replaced && change.member.registry !== this.registryId) {
      if (this.own.get(change.replaced.id)?.ticket === change.replaced.ticket) this.own.delete(change.replaced.id);
    } else if (change.kind === "left" && this.own.get(change.member.id)?.ticket === change.member.ticket) {
      // Swept as dead (our lease ran out) while we hold it: write it back rather than let it go.
      if (change.reason !== "replaced" && this.current === "ok") void this.resync();
      else this.own.delete(change.member.id);
    }
    for (const fn of this.listeners) fn(change);
  }

  private announce(change: Change): void {
    for (const fn of this.listeners) fn(change);
  }

  // --- reconcile, loss, recovery ---------------------------------------------

  /** Reloads the list, writing this registry's own entries back first; one at a time, never rejects. */
  private resync(): Promise<void> {
    this.reconciling ??= this.reconcile().finally(() => {
      this.reconciling = undefined;
      // Changes published while the list was reloaded: those after it follow the reloaded list.
      const early = this.early.splice(0);
      const link = this.link;
      if (link) for (const message of early) this.onMessage(link, message);
    });
    return this.reconciling;
  }

  private async reconcile(): Promise<void> {
    const link = this.link;
    if (!link) return;
    // Changes in flight settle first, so that `own` says what the store will have.
    if (this.inflight) await new Promise<void>((resolve) => (this.drained = resolve));
    this.drained = undefined;
    const own = [...this.own.values()];
    const mine = new Set(this.own.keys());
    const links = this.mirror.pairs().filter(([a, b]) => mine.has(a) || mine.has(b));
    // Seqs this registry used alone are not reused: the list it announces next is numbered above them.
    const alone = this.current === "degraded" && this.mirror.seq > this.storeSeq;
    const floor = alone ? this.mirror.seq + 1 : this.mirror.seq;
    const args = [this.registryId, String(this.o.leaseMs), randomId(), String(floor), String(own.length)];
    for (const m of own) args.push(m.id, addressOf(m), storedJson(m), m.ticket);
    for (const [a, b] of links) args.push(a, b);
    try {
      const reply = await this.run(link, SCRIPTS.reconcile, args, true);
      if (this.link === link) this.reload(reply);
    } catch (e) {
      this.lose(link, e);
    }
  }

  /** Replaces the mirror by the list a reconcile script returned: `reset`, boot, seq, last log id, members, pairs. */
  private reload(reply: Reply): void {
    const [, boot, seq, last, rawMembers, rawPairs] = reply as [string, string, number, string, string[], string[]];
    const members = rawMembers.flatMap((raw) => parseMember(raw) ?? []);
    const pairs: [string, string][] = [];
    for (let i = 0; i + 1 < rawPairs.length; i += 2) pairs.push([rawPairs[i]!, rawPairs[i + 1]!]);
    this.pending.clear();
    this.cursor = this.known = last;
    this.storeSeq = seq;
    this.mirror.reset(boot, seq, members, pairs);
    // What the store gave to someone else while we were away is no longer ours.
    for (const [id, m] of this.own) if (this.mirror.get(id)?.ticket !== m.ticket) this.own.delete(id);
    this.settleWaiters();
  }

  /** The store failed (closed, timed out, refused): serve alone, say so once, and reconnect. */
  private lose(link: Link | undefined, error: unknown): void {
    if (!link || this.link !== link) return;
    this.link = undefined;
    closeLink(link);
    this.pending.clear();
    this.early = [];
    this.settleWaiters();
    this.lastError = `store ${this.where}: ${errorText(error)}`;
    if (this.current === "ok") {
      this.current = "degraded";
      this.storeSeq = this.mirror.seq;
      this.announce({ kind: "store", state: "degraded", reason: this.lastError });
    }
    this.recoverLater();
  }

  private recoverLater(): void {
    if (this.closed || this.recovering) return;
    this.recovering = this.recover().finally(() => (this.recovering = undefined));
  }

  private async recover(): Promise<void> {
    for (let attempt = 1; !this.closed; attempt++) {
      const capMs = Math.min(this.o.retryMaxMs, this.o.retryBaseMs * 2 ** Math.min(attempt, 20));
      await new Promise<void>((wake) => (this.retry = { timer: setTimeout(wake, Math.random() * capMs), wake }));
      if (!this.closed && (await this.attempt())) return;
    }
  }

  /** One connection attempt: connect, reconcile, start reading; false if the store is still out of reach. */
  private async attempt(): Promise<boolean> {
    let link: Link;
    try {
      link = await this.connect();
    } catch (e) {
      this.lastError = `store ${this.where}: ${errorText(e)}`;
      return false;
    }
    if (this.closed) {
      closeLink(link);
      return true;
    }
    this.link = link;
    await this.resync();
    if (this.link !== link) return false;
    this.lastError = undefined;
    this.current = "ok";
    this.announce({ kind: "store", state: "ok" });
    return true;
  }

  /** Two connections: commands, and subscriptions (one shows this registry is alive, one brings the others' changes). */
  private async connect(): Promise<Link> {
    const options: RedisOptions = {
      autoReconnect: false, // a lost connection is a lost store: reconcile, never replay a queue
      enableOfflineQueue: false,
      connectionTimeout: this.o.connectTimeoutMs,
      ...(this.o.tls ? { tls: this.o.tls } : {}),
    };
    const now = () => performance.now();
    const link: Link = {
      cmd: new RedisClient(this.url, options),
      sub: new RedisClient(this.url, options),
      owed: new Owed("store command", this.o.opTimeoutMs, 5 * this.o.opTimeoutMs, now),
      watchdog: undefined,
    };
    try {
      await deadline(Promise.all([link.cmd.connect(), link.sub.connect()]), this.o.connectTimeoutMs + 500, "connect");
      // Before the list is loaded: every change after the reconcile that loads it is published to this registry.
      const subscribed = Promise.all([
        link.sub.subscribe(this.key(`alive:${this.registryId}`), () => {}),
        link.sub.subscribe(this.key(`log:${this.registryId}`), (message) => this.onMessage(link, message)),
      ]);
      await deadline(subscribed, this.o.opTimeoutMs, "SUBSCRIBE");
    } catch (e) {
      closeLink(link);
      // Bun reports a refused password, TLS or protocol mismatch as a plain close.
      const hint = errorText(e) === "Connection closed" ? " (closed during the handshake: wrong password, TLS setting, or not Redis?)" : "";
      throw new Error(`cannot connect: ${errorText(e)}${hint}`, { cause: e });
    }
    for (const c of [link.cmd, link.sub]) c.onclose = () => this.lose(link, new Error("connection closed"));
    // One timer for every command's deadline; closing the link rejects what it still owes.
    link.watchdog = setInterval(() => {
      const late = link.owed.late();
      if (late) this.lose(link, new Error(late));
    }, Math.max(25, this.o.opTimeoutMs / 4));
    link.watchdog.unref();
    return link;
  }

  private key(name: string): string {
    return this.o.prefix + name;
  }
}

// --- internal ----------------------------------------------------------------

type Reply = unknown[];

/** A change for the next batch (see BATCH). */
interface Queued {
  kind: "j" | "l" | "r";
  args: string[];
  before?: (result: string) => void;
  /** The log entry this change wrote, which the reply leaves out (its JSON empty): the caller knows it. */
  change?: (id: string) => LogChange;
  done: (result: string | undefined) => void;
}
/** Most changes in one batch script: the store runs nothing else meanwhile. */
const MAX_BATCH = 100;

/** How long an entry may wait for the one it follows before the log is read for it, ms. */
const CATCH_UP_DELAY_MS = 2;
/** Log entries read at once. */
const READ_COUNT = 1000;

interface Link {
  cmd: RedisClient;
  sub: RedisClient;
  /** Answers owed on the command connection. */
  owed: Owed;
  watchdog: Timer | undefined;
}

/**
 * Answers one connection owes. Replies come in order, so a connection that
 * owes one and has answered nothing for longer than the deadline is stuck
 * (a frozen store, a partition): one periodic check for all commands, where
 * a timer per command cost a fifth of the client's CPU.
 */
class Owed {
  private count = 0;
  private longs = 0;
  /** When the connection last answered, or began to owe. */
  private since = 0;

  constructor(
    private readonly what: string,
    private readonly limitMs: number,
    private readonly longLimitMs: number,
    private readonly now: () => number,
  ) {}

  /** `long`: the answer may take the longer limit, and so may the answers queued behind it. */
  track<T>(answer: Promise<T>, long = false): Promise<T> {
    if (this.count++ === 0) this.since = this.now();
    if (long) this.longs++;
    const answered = () => {
      this.count--;
      if (long) this.longs--;
      this.since = this.now();
    };
    // Not finally(): that takes two more turns of the microtask queue before the caller resumes, on every command.
    return answer.then(
      (value) => {
        answered();
        return value;
      },
      (e: unknown) => {
        answered();
        throw e;
      },
    );
  }

  /** Why the connection counts as stuck, or undefined. */
  late(): string | undefined {
    const limit = this.longs ? this.longLimitMs : this.limitMs;
    return this.count && this.now() - this.since > limit ? `${this.what}: no answer within ${limit}ms` : undefined;
  }
}

interface Script {
  name: string;
  source: string;
  sha: string;
}

/** One change as the log carries it: joins and leaves under their seq, greetings as one entry per receipt. */
const LogEntry = v.variant("kind", [
  v.object({ kind: v.literal("joined"), seq: Joined.entries.seq, member: Member, replaced: v.optional(Member) }),
  v.object({ kind: v.literal("left"), seq: Joined.entries.seq, member: Member, reason: LeaveReason }),
  v.object({ kind: v.literal("greeted"), a: v.string(), ids: v.array(v.string()) }),
]);

type LogChange = v.InferOutput<typeof LogEntry>;

/** Just enough of a join or leave to find a member already held (see entryOf). */
const KnownEntry = v.object({
  kind: v.picklist(["joined", "left"]),
  seq: Joined.entries.seq,
  member: v.object({ id: v.string(), ticket: v.string() }),
  reason: v.optional(LeaveReason),
});

/**
 * Shared by every script. ARGV: 1 key prefix, 2 the epoch (boot) the caller
 * knows, 3 log length, 4 the caller's registry id, then the script's own.
 * Keys (docs/STORE.md): boot, seq, last (id of the newest log entry), log,
 * members (id -> member JSON), where (id -> address), addr (address -> id),
 * links:<id>, owned:<registry>, registries, lease:<registry>.
 * Members are stored as the JSON the registry wrote and logged as is, never
 * re-encoded (cjson would round numbers); cjson only reads fields.
 */
const PRELUDE = `
local P, BOOT, MAXLEN, SELF = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local out = {'ok'}
-- Registries swept by this script: told too, in case one still lives (stalled) and must write its nodes back.
local swept = {}
-- Entries of the reply that differ from the published ones (by index in out).
local short = {}
local function key(name) return P .. name end
-- The seq and the newest log entry's id: read once per script, written back once (finish), as a batch takes many.
local seq, stored, last
local function currentSeq()
  if not seq then
    seq = tonumber(redis.call('GET', key('seq')) or '0')
    stored = seq
  end
  return seq
end
local function nextSeq()
  if seq then
    seq = seq + 1
  else
    seq = redis.call('INCR', key('seq'))
    stored = seq
  end
  return seq
end
-- mine: the caller's own change, which it knows: its reply leaves the JSON out (the log and the others get it).
local function log(id, json, mine)
  local prev = last or redis.call('GET', key('last')) or '0-0'
  last = redis.call('XADD', key('log'), 'MAXLEN', '~', MAXLEN, id, 'p', prev, 'c', json)
  out[#out + 1] = last
  out[#out + 1] = prev
  out[#out + 1] = json
  if mine then short[#out] = '' end
  return last
end
-- address and registry: when the caller knows them (the registration's own), else read.
local function unlist(id, raw, address, registry)
  address = address or redis.call('HGET', key('where'), id)
  redis.call('HDEL', key('members'), id)
  redis.call('HDEL', key('where'), id)
  if address and redis.call('HGET', key('addr'), address) == id then redis.call('HDEL', key('addr'), address) end
  redis.call('SREM', key('owned:') .. (registry or cjson.decode(raw).registry), id)
  local links = redis.call('SMEMBERS', key('links:') .. id)
  for _, other in ipairs(links) do redis.call('SREM', key('links:') .. other, id) end
  if #links > 0 then redis.call('DEL', key('links:') .. id) end
end
local function remove(id, raw, reason, address, registry, mine)
  unlist(id, raw, address, registry)
  local n = nextSeq()
  return log(n .. '-0', '{"kind":"left","seq":' .. n .. ',"member":' .. raw .. ',"reason":"' .. reason .. '"}', mine)
end
local function list(id, address, json, replaced, mine)
  redis.call('HSET', key('members'), id, json)
  redis.call('HSET', key('where'), id, address)
  redis.call('HSET', key('addr'), address, id)
  redis.call('SADD', key('owned:') .. SELF, id)
  local n = nextSeq()
  return log(n .. '-0', '{"kind":"joined","seq":' .. n .. ',"member":' .. json .. (replaced and (',"replaced":' .. replaced) or '') .. '}', mine)
end
-- Writes the seq and the newest entry's id back. The other registries get the entries this script wrote on their own
-- channels (entries as id, previous id, JSON, a line each): none has to read the log for them, and none is woken by its
-- own changes.
local function finish()
  if seq ~= stored then redis.call('SET', key('seq'), seq) end
  if not last then return end
  redis.call('SET', key('last'), last)
  local to = swept
  for _, r in ipairs(redis.call('SMEMBERS', key('registries'))) do
    if r ~= SELF then to[#to + 1] = r end
  end
  if #to == 0 then return end
  local message = table.concat(out, '\\n', 2)
  for _, r in ipairs(to) do redis.call('PUBLISH', key('log:') .. r, message) end
end
-- Greetings take no seq of their own (nodes never see them): they are numbered after the last change.
local function greet(a, ids)
  return log(currentSeq() .. '-*', '{"kind":"greeted","a":' .. cjson.encode(a) .. ',"ids":' .. cjson.encode(ids) .. '}')
end
local function link(a, b)
  if a == b or redis.call('HEXISTS', key('members'), a) == 0 or redis.call('HEXISTS', key('members'), b) == 0 then return false end
  if redis.call('SADD', key('links:') .. a, b) == 0 then return false end
  redis.call('SADD', key('links:') .. b, a)
  return true
end
-- Entries of registries whose lease ran out go, as if their sessions had timed out.
local function sweep()
  for _, r in ipairs(redis.call('SMEMBERS', key('registries'))) do
    if r ~= SELF and redis.call('EXISTS', key('lease:') .. r) == 0 then
      for _, id in ipairs(redis.call('SMEMBERS', key('owned:') .. r)) do
        local raw = redis.call('HGET', key('members'), id)
        if raw then remove(id, raw, 'timeout') end
      end
      redis.call('DEL', key('owned:') .. r)
      redis.call('SREM', key('registries'), r)
      swept[#swept + 1] = r
    end
  end
end
`;

/** Refuses to act on a store in another epoch (restarted empty): the caller reconciles first. */
const SAME_EPOCH = `if redis.call('GET', key('boot')) ~= BOOT then return {'epoch'} end
`;

/**
 * ARGV 5 the number of changes, then each as its kind (j join, l leave, r
 * receipt), the number of its arguments, and those: join: id, address, member
 * JSON, tickets the caller allows to be replaced (compare-and-set on
 * tickets); leave: id, ticket, reason, address (only that registration goes);
 * receipt: id, ticket, ids it has greeted. They run in order, as one script
 * each would. The reply: 'ok', one result per change (a join: its entry's id,
 * or the JSON of the holder that made it fail; a leave: its entry's id, or ''
 * if that registration was gone), then the entries, those of the joins and
 * leaves themselves without their JSON (the caller knows them; parsing them
 * back was a fifth of its CPU).
 */
const BATCH = `
local present = false
local function join(a, n)
  local id, address, json = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local function allowed(raw)
    local ticket = cjson.decode(raw).ticket
    for i = a + 3, a + n - 1 do if ARGV[i] == ticket then return true end end
    return false
  end
  local byId = redis.call('HGET', key('members'), id)
  local other = redis.call('HGET', key('addr'), address)
  local byAddress = other and other ~= id and redis.call('HGET', key('members'), other)
  if byId and not allowed(byId) then return byId end
  if byAddress and not allowed(byAddress) then return byAddress end
  if byAddress then remove(other, byAddress, 'replaced') end
  if byId then unlist(id, byId) end
  -- A registry that lists a member is one the others sweep if it dies.
  if not present then
    redis.call('SADD', key('registries'), SELF)
    present = true
  end
  return list(id, address, json, byId, true)
end
local function leave(a)
  local raw = redis.call('HGET', key('members'), ARGV[a])
  local m = raw and cjson.decode(raw)
  if not m or m.ticket ~= ARGV[a + 1] then return '' end
  return remove(ARGV[a], raw, ARGV[a + 2], ARGV[a + 3], m.registry, true)
end
local function receipt(a, n)
  local id = ARGV[a]
  local raw = redis.call('HGET', key('members'), id)
  if not raw or cjson.decode(raw).ticket ~= ARGV[a + 1] then return '' end
  local added = {}
  for i = a + 2, a + n - 1 do if link(id, ARGV[i]) then added[#added + 1] = ARGV[i] end end
  return #added > 0 and greet(id, added) or ''
end
local reply, a = {'ok'}, 6
for k = 1, tonumber(ARGV[5]) do
  local kind, n = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  if kind == 'j' then reply[k + 1] = join(a, n)
  elseif kind == 'l' then reply[k + 1] = leave(a)
  else reply[k + 1] = receipt(a, n) end
  a = a + n
end
finish()
for i = 2, #out do reply[#reply + 1] = short[i] or out[i] end
return reply
`;

/** ARGV 5 lease ms. Renews the lease ('lost' if it had run out) and sweeps the dead; the reply's second field is the newest log entry's id. */
const HEARTBEAT = `
local had = redis.call('SET', key('lease:') .. SELF, BOOT, 'PX', ARGV[5], 'GET')
redis.call('SADD', key('registries'), SELF)
sweep()
finish()
table.insert(out, 2, redis.call('GET', key('last')) or '0-0')
if not had then out[1] = 'lost' end
return out
`;

/**
 * ARGV 5 lease ms, 6 a fresh epoch id, 7 seq floor, 8 n, then n x (id,
 * address, JSON, ticket) this registry holds, then pairs (a, b) they greeted.
 * Starts an epoch if the store has none; removes what this registry no longer
 * holds; writes back what it holds unless the store gave the id or address
 * to another registration meanwhile (the store's wins); returns the whole list.
 */
const RECONCILE = `
local boot = redis.call('GET', key('boot'))
if not boot then
  for _, k in ipairs(redis.call('KEYS', P .. '*')) do redis.call('DEL', k) end
  boot = ARGV[6]
  redis.call('SET', key('boot'), boot)
elseif boot == BOOT and tonumber(redis.call('GET', key('seq')) or '0') < tonumber(ARGV[7]) then
  redis.call('SET', key('seq'), ARGV[7])
end
sweep()
redis.call('SET', key('lease:') .. SELF, boot, 'PX', ARGV[5])
redis.call('SADD', key('registries'), SELF)
local n, held = tonumber(ARGV[8]), {}
for i = 0, n - 1 do held[ARGV[9 + i * 4]] = ARGV[12 + i * 4] end
for _, id in ipairs(redis.call('SMEMBERS', key('owned:') .. SELF)) do
  local raw = redis.call('HGET', key('members'), id)
  if not raw then redis.call('SREM', key('owned:') .. SELF, id)
  elseif held[id] ~= cjson.decode(raw).ticket then remove(id, raw, 'closed') end
end
for i = 0, n - 1 do
  local b = 9 + i * 4
  if not redis.call('HGET', key('members'), ARGV[b]) and not redis.call('HGET', key('addr'), ARGV[b + 1]) then
    list(ARGV[b], ARGV[b + 1], ARGV[b + 2], false)
  end
end
local greeted = {}
for i = 9 + n * 4, #ARGV - 1, 2 do
  if link(ARGV[i], ARGV[i + 1]) then
    greeted[ARGV[i]] = greeted[ARGV[i]] or {}
    table.insert(greeted[ARGV[i]], ARGV[i + 1])
  end
end
for a, ids in pairs(greeted) do greet(a, ids) end
finish()
local links = {}
for _, id in ipairs(redis.call('HKEYS', key('members'))) do
  for _, other in ipairs(redis.call('SMEMBERS', key('links:') .. id)) do
    if id < other then links[#links + 1] = id; links[#links + 1] = other end
  end
end
return {'reset', boot, tonumber(redis.call('GET', key('seq')) or '0'), redis.call('GET', key('last')) or '0-0', redis.call('HVALS', key('members')), links}
`;

function script(name: string, body: string, epochChecked = true): Script {
  const source = PRELUDE + (epochChecked ? SAME_EPOCH : "") + body;
  return { name, source, sha: new Bun.CryptoHasher("sha1").update(source).digest("hex") };
}

const SCRIPTS = {
  batch: script("batch", BATCH),
  heartbeat: script("heartbeat", HEARTBEAT),
  reconcile: script("reconcile", RECONCILE, false),
};

/** Entries of an XREAD reply as [id, previous id, change JSON]; RESP3 gives a map, RESP2 an array of pairs. */
function streamEntries(reply: unknown, stream: string): [string, string, string][] {
  if (!reply) return [];
  const entries = Array.isArray(reply) ? (reply.find((r) => Array.isArray(r) && r[0] === stream)?.[1] as unknown) : (reply as Record<string, unknown>)[stream];
  if (!Array.isArray(entries)) return [];
  return entries.map(([id, fields]: [string, string[]]) => {
    const f: Record<string, string> = {};
    for (let i = 0; i + 1 < fields.length; i += 2) f[fields[i]!] = fields[i + 1]!;
    return [id, f.p ?? "", f.c ?? ""];
  });
}

/** Orders stream ids (`<seq>-<n>`) numerically (several times per entry: without splitting into arrays). */
function compareIds(a: string, b: string): number {
  if (a === b) return 0;
  const i = a.indexOf("-");
  const j = b.indexOf("-");
  return Number(a.slice(0, i)) - Number(b.slice(0, j)) || Number(a.slice(i + 1)) - Number(b.slice(j + 1));
}

function seqOf(id: string): number {
  return Number(id.slice(0, id.indexOf("-")));
}

/** The member as the store keeps it: its own fields only, whatever else the caller's object carries. */
function storedJson(m: Member): string {
  const { id, host, port, name, source, registry, joinedAt, ticket } = m;
  return JSON.stringify({ id, host, port, name, source, registry, joinedAt, ticket });
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

function parseMember(raw: unknown): Member | undefined {
  const r = v.safeParse(Member, typeof raw === "string" ? parseJson(raw) : undefined);
  return r.success ? r.output : undefined;
}

function closeLink(link: Link): void {
  clearInterval(link.watchdog);
  for (const c of [link.cmd, link.sub]) {
    c.onclose = null;
    c.close();
  }
}

/** Settles with `promise`, or rejects naming `what` once `ms` have passed. */
async function deadline<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: Timer | undefined;
  const late = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms}ms`)), ms)));
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
}

function errorText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

function definedOnly<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, x]) => x !== undefined)) as Partial<T>;
}

/**
 * Membership: the list of registered nodes, its sequence numbers, the cached
 * peer list that every reply carries, the greeted pairs and mesh completeness.
 * No sockets: the registry's sessions call it and listen to its changes.
 *
 * `Membership` is the seam between one registry and several: `MemoryMembership`
 * keeps the list in this process (the default); a store-backed implementation
 * keeps a local mirror of a shared list and applies other registries' changes
 * to it. Both announce every change, their own and others', in `seq` order.
 */
import * as v from "valibot";
import { formatAddress } from "./net.ts";
import { Peer, type LeaveReason } from "./protocol.ts";

/** A listed node as the registry keeps it (a schema too: a shared store hands members back as text). */
export const Member = v.object({
  ...Peer.entries,
  /** Address its registry session comes from. */
  source: v.string(),
  /** The registry whose session holds it. */
  registry: v.string(),
  /** When this registration was accepted, ms since the epoch. */
  joinedAt: v.number(),
  /** Unique per registration: tells a node's newer registration from an older one. */
  ticket: v.string(),
});
export type Member = v.InferOutput<typeof Member>;

/** A change of the list, announced in order. */
export type Change =
  /** A node was listed; `replaced` is the same id's previous registration, if any (an update, not a second node). */
  | { kind: "joined"; seq: number; member: Member; replaced?: Member }
  | { kind: "left"; seq: number; member: Member; reason: LeaveReason }
  /** The list was rebuilt wholesale (several registries: the store came back or changed epoch): every session must resync. */
  | { kind: "reset"; boot: string; seq: number }
  | { kind: "greeted"; a: string; b: string }
  | { kind: "mesh-complete"; nodes: number; pairs: number; ms: number }
  /** Several registries: the shared store was lost (the list then changes only by this registry's sessions) or is back. */
  | { kind: "store"; state: StoreState; reason?: string };

export type StoreState = "ok" | "degraded";

export type JoinResult = { ok: true; seq: number } | { ok: false; holder: Member };

export interface Membership {
  /**
   * Set when the list is shared with other registries (a store): the id this
   * registry is known by there (its lease), which every member it joins must
   * carry as `registry`. Undefined for a list of this registry alone.
   */
  readonly registryId?: string;
  /** Identifies the list's history: a new one means sequence numbers started over. Sent to nodes as `boot`. */
  readonly boot: string;
  /** Sequence number of the last change applied. */
  readonly seq: number;
  readonly size: number;
  readonly state: StoreState;
  /** Why the shared store is out of reach, while `state` is degraded. */
  readonly lastError?: string;
  get(id: string): Member | undefined;
  /** The member listed at `host:port` (as `formatAddress` writes it). */
  at(address: string): Member | undefined;
  members(): IterableIterator<Member>;
  /** Every member's peer JSON joined by commas, without `except`'s: the body of a `registered` or `snapshot`. */
  peerList(except?: string): string;
  /**
   * Lists `member`. `replaces` are the registrations the caller has decided
   * may go (the same id's, or another id's at the same address); anything
   * else holding the id or the address makes the join fail, naming it.
   */
  join(member: Member, replaces: readonly Member[]): Promise<JoinResult>;
  /** Unlists `member` if it is still that registration (same ticket); false if it was not. */
  leave(member: Member, reason: LeaveReason): Promise<boolean>;
  /** Records that `member` has greeted (or been greeted by) each of `ids`; unknown ids are ignored. */
  receipt(member: Member, ids: readonly string[]): void;
  /** Greeted pairs, as [id, id] with the smaller id first. */
  pairs(): [string, string][];
  mesh(): MeshState;
  subscribe(fn: (change: Change) => void): () => void;
  /**
   * Whether registry `registry` is still connected to the shared store and
   * renewing its lease on time: false soon after it died (its connections
   * close at once on kill -9), or once it missed a renewal by half a beat
   * (frozen, stalled, cut off), long before its lease runs out, so its
   * entries may be replaced. The memory list knows only this registry, and
   * says true.
   */
  isConnected(registry: string): Promise<boolean>;
  close(): Promise<void>;
}

export interface MeshState {
  greeted: number;
  expected: number;
  /** Time from the last join until every pair had greeted, ms; null while incomplete. */
  completeMs: number | null;
}

/** `host:port` of a member, the key of the address index. */
export function addressOf(p: Peer): string {
  return formatAddress(p.host, p.port);
}

/** The peer as it goes on the wire: the fields a node sees, in a fixed order. */
export function peerOf(m: Member): Peer {
  return m.name ? { id: m.id, host: m.host, port: m.port, name: m.name } : { id: m.id, host: m.host, port: m.port };
}

/**
 * The list in this process: one registry, no store. Changes are applied and
 * announced synchronously, so `join` and `leave` resolve with the list
 * already updated. A store-backed membership keeps one as its mirror and
 * feeds it the store's changes through `apply` and `reset`.
 */
export class MemoryMembership implements Membership {
  readonly state: StoreState = "ok";
  private entries = new Map<string, Entry>();
  private byAddress = new Map<string, string>();
  private listeners = new Set<(change: Change) => void>();
  private lastSeq = 0;
  private greeted = 0;
  private lastJoinAt = 0;
  private completeMs: number | null = 0;
  // The peer list as JSON fragments joined by commas: appended to on join and
  // cut on leave, so the N-th reply does not re-encode N peers. `beforeLast` is
  // the list without the newest fragment: the reply to the registration that
  // added it, without a copy.
  private list: string | null = "";
  private beforeLast: { id: string; list: string } | undefined;

  constructor(
    private currentBoot: string,
    private readonly now: () => number = () => performance.now(),
  ) {}

  get boot(): string {
    return this.currentBoot;
  }

  get seq(): number {
    return this.lastSeq;
  }

  get size(): number {
    return this.entries.size;
  }

  get(id: string): Member | undefined {
    return this.entries.get(id)?.member;
  }

  at(address: string): Member | undefined {
    const id = this.byAddress.get(address);
    return id === undefined ? undefined : this.get(id);
  }

  *members(): IterableIterator<Member> {
    for (const e of this.entries.values()) yield e.member;
  }

  peerList(except?: string): string {
    if (this.list === null) this.list = Array.from(this.entries.values(), (e) => e.json).join(",");
    const e = except === undefined ? undefined : this.entries.get(except);
    if (!e) return this.list;
    const before = this.beforeLast;
    if (before && before.id === except) return before.list;
    return withoutFragment(this.list, e.json) ?? Array.from(this.entries.values(), (x) => x.json).filter((j) => j !== e.json).join(",");
  }

  async join(member: Member, replaces: readonly Member[]): Promise<JoinResult> {
    const address = addressOf(member);
    const byId = this.entries.get(member.id);
    const byAddr = this.entries.get(this.byAddress.get(address) ?? "");
    for (const holder of [byId, byAddr]) {
      if (holder && !replaces.some((r) => r.ticket === holder.member.ticket)) return { ok: false, holder: holder.member };
    }
    // Another id at this address goes first, as a leave of its own; the same id is updated in place.
    if (byAddr && byAddr !== byId) this.remove(byAddr, "replaced", this.lastSeq + 1);
    const seq = this.lastSeq + 1;
    this.put(member, address, seq);
    return { ok: true, seq };
  }

  async leave(member: Member, reason: LeaveReason): Promise<boolean> {
    const e = this.entries.get(member.id);
    if (!e || e.member.ticket !== member.ticket) return false;
    this.remove(e, reason, this.lastSeq + 1);
    return true;
  }

  receipt(member: Member, ids: readonly string[]): void {
    const e = this.entries.get(member.id);
    if (!e || e.member.ticket !== member.ticket) return;
    let added = 0;
    for (const id of ids) if (this.link(e, id)) added++;
    if (added) this.checkMesh();
  }

  /**
   * Applies a change decided elsewhere (a shared store's log), announced as if
   * it were this list's own. Its seq is taken as is: it may skip numbers
   * (changes this mirror has no part in), never go back. A `left` for a
   * registration no longer listed only moves the seq on.
   */
  apply(change: Extract<Change, { kind: "joined" | "left" | "greeted" }>): void {
    if (change.kind === "joined") return this.put(change.member, addressOf(change.member), change.seq);
    if (change.kind === "greeted") {
      const e = this.entries.get(change.a);
      if (e && this.link(e, change.b)) this.checkMesh();
      return;
    }
    const e = this.entries.get(change.member.id);
    if (e && e.member.ticket === change.member.ticket) this.remove(e, change.reason, change.seq);
    else this.lastSeq = change.seq;
  }

  /** Replaces the whole list (a shared store's, reloaded) and announces `reset`: sessions must resync. */
  reset(boot: string, seq: number, members: Iterable<Member>, pairs: Iterable<readonly [string, string]>): void {
    for (const e of this.entries.values()) e.links.clear();
    this.entries.clear();
    this.byAddress.clear();
    this.list = null;
    this.beforeLast = undefined;
    this.greeted = 0;
    for (const member of members) {
      const address = addressOf(member);
      this.entries.set(member.id, { member, json: JSON.stringify(peerOf(member)), address, links: new Set() });
      this.byAddress.set(address, member.id);
    }
    for (const [a, b] of pairs) {
      const e = this.entries.get(a);
      if (e) this.link(e, b, false);
    }
    this.currentBoot = boot;
    this.lastSeq = seq;
    this.lastJoinAt = this.now();
    this.completeMs = this.greeted >= this.mesh().expected ? 0 : null;
    this.announce({ kind: "reset", boot, seq });
  }

  pairs(): [string, string][] {
    const out: [string, string][] = [];
    for (const e of this.entries.values()) for (const other of e.links) if (e.member.id < other) out.push([e.member.id, other]);
    return out;
  }

  mesh(): MeshState {
    const n = this.entries.size;
    return { greeted: this.greeted, expected: (n * (n - 1)) / 2, completeMs: this.completeMs };
  }

  subscribe(fn: (change: Change) => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  async isConnected(): Promise<boolean> {
    return true;
  }

  async close(): Promise<void> {
    this.listeners.clear();
  }

  /** Lists `member` under `seq`, in place of the same id's registration if any. */
  private put(member: Member, address: string, seq: number): void {
    const byId = this.entries.get(member.id);
    if (byId) this.unlist(byId);
    const json = JSON.stringify(peerOf(member));
    const before = this.list;
    this.entries.set(member.id, { member, json, address, links: new Set() });
    this.byAddress.set(address, member.id);
    if (before !== null) {
      this.list = before ? `${before},${json}` : json;
      this.beforeLast = { id: member.id, list: before };
    }
    this.lastSeq = seq;
    this.lastJoinAt = this.now();
    this.completeMs = this.entries.size < 2 ? 0 : null;
    this.announce({ kind: "joined", seq, member, replaced: byId?.member });
  }

  private remove(e: Entry, reason: LeaveReason, seq: number): void {
    this.unlist(e);
    this.lastSeq = seq;
    this.announce({ kind: "left", seq, member: e.member, reason });
    this.checkMesh();
  }

  /** Records that `e` and `id` have met (both sides hold the link); false if `id` is not listed or they had. */
  private link(e: Entry, id: string, announce = true): boolean {
    const other = id === e.member.id ? undefined : this.entries.get(id);
    if (!other || e.links.has(id)) return false;
    e.links.add(id);
    other.links.add(e.member.id);
    this.greeted++;
    if (announce) this.announce({ kind: "greeted", a: e.member.id, b: id });
    return true;
  }

  /** Takes an entry out of the list and the pair counts, announcing nothing. */
  private unlist(e: Entry): void {
    this.entries.delete(e.member.id);
    if (this.byAddress.get(e.address) === e.member.id) this.byAddress.delete(e.address);
    for (const other of e.links) if (this.entries.get(other)?.links.delete(e.member.id)) this.greeted--;
    e.links.clear();
    this.list = withoutFragment(this.list, e.json);
    this.beforeLast = undefined;
  }

  private checkMesh(): void {
    const { greeted, expected } = this.mesh();
    if (this.completeMs === null && greeted >= expected) {
      this.completeMs = this.now() - this.lastJoinAt;
      this.announce({ kind: "mesh-complete", nodes: this.entries.size, pairs: expected, ms: Math.round(this.completeMs) });
    }
  }

  private announce(change: Change): void {
    for (const fn of this.listeners) fn(change);
  }
}

// --- internal ----------------------------------------------------------------

interface Entry {
  member: Member;
  /** The peer, encoded once. */
  json: string;
  address: string;
  /** Peers this node has exchanged a greeting with (both sides hold the link). */
  links: Set<string>;
}

/**
 * The comma-joined list without one fragment, cut out in place instead of
 * re-encoding the list. A fragment is found exactly: it starts with its own
 * unique id, and quotes inside JSON strings are escaped. The search runs from
 * the end, where short-lived nodes sit. Null (rebuild on next use) if absent.
 */
export function withoutFragment(list: string | null, json: string): string | null {
  if (list === null) return null;
  const i = list.lastIndexOf(json);
  if (i < 0) return null;
  const end = i + json.length;
  if (i === 0) return end === list.length ? "" : list.slice(end + 1);
  return list.slice(0, i - 1) + list.slice(end);
}

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
import { formatAddress } from "./net.ts";
import type { LeaveReason, Peer } from "./protocol.ts";

/** A listed node as the registry keeps it. */
export interface Member extends Peer {
  /** Address its registry session comes from. */
  source: string;
  /** The registry whose session holds it. */
  registry: string;
  /** When this registration was accepted, ms since the epoch. */
  joinedAt: number;
  /** Unique per registration: tells a node's newer registration from an older one. */
  ticket: string;
}

/** A change of the list, announced in order. */
export type Change =
  /** A node was listed; `replaced` is the same id's previous registration, if any (an update, not a second node). */
  | { kind: "joined"; seq: number; member: Member; replaced?: Member }
  | { kind: "left"; seq: number; member: Member; reason: LeaveReason }
  /** The list was rebuilt wholesale (several registries: the store came back or changed epoch): every session must resync. */
  | { kind: "reset"; boot: string; seq: number }
  | { kind: "greeted"; a: string; b: string }
  | { kind: "mesh-complete"; nodes: number; pairs: number; ms: number }
  /** Several registries: the shared store was lost or is back; the list is then this registry's own. */
  | { kind: "store"; state: StoreState; reason?: string };

export type StoreState = "ok" | "degraded";

export type JoinResult = { ok: true; seq: number } | { ok: false; holder: Member };

export interface Membership {
  /** Identifies the list's history: a new one means sequence numbers started over. Sent to nodes as `boot`. */
  readonly boot: string;
  /** Sequence number of the last change applied. */
  readonly seq: number;
  readonly size: number;
  readonly state: StoreState;
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
  /** Several registries: whether registry `id` is still connected to the shared list (its sessions may be live). */
  registryAlive?(id: string): boolean | Promise<boolean>;
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
 * already updated.
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
    readonly boot: string,
    private readonly now: () => number = () => performance.now(),
  ) {}

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
    if (byAddr && byAddr !== byId) this.remove(byAddr, "replaced");
    if (byId) this.unlist(byId);
    const json = JSON.stringify(peerOf(member));
    const before = this.list;
    this.entries.set(member.id, { member, json, address, links: new Set() });
    this.byAddress.set(address, member.id);
    if (before !== null) {
      this.list = before ? `${before},${json}` : json;
      this.beforeLast = { id: member.id, list: before };
    }
    const seq = ++this.lastSeq;
    this.lastJoinAt = this.now();
    this.completeMs = this.entries.size < 2 ? 0 : null;
    this.announce({ kind: "joined", seq, member, replaced: byId?.member });
    return { ok: true, seq };
  }

  async leave(member: Member, reason: LeaveReason): Promise<boolean> {
    const e = this.entries.get(member.id);
    if (!e || e.member.ticket !== member.ticket) return false;
    this.remove(e, reason);
    return true;
  }

  receipt(member: Member, ids: readonly string[]): void {
    const e = this.entries.get(member.id);
    if (!e || e.member.ticket !== member.ticket) return;
    let added = 0;
    for (const id of ids) {
      const other = id === member.id ? undefined : this.entries.get(id);
      if (!other || e.links.has(id)) continue;
      e.links.add(id);
      other.links.add(member.id);
      this.greeted++;
      added++;
      this.announce({ kind: "greeted", a: member.id, b: id });
    }
    if (added) this.checkMesh();
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

  async close(): Promise<void> {
    this.listeners.clear();
  }

  private remove(e: Entry, reason: LeaveReason): void {
    this.unlist(e);
    const seq = ++this.lastSeq;
    this.announce({ kind: "left", seq, member: e.member, reason });
    this.checkMesh();
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

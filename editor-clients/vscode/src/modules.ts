/**
 * The answer of `shoptalk/findModule` ({modules: [{id, uri, range, score,
 * reason, confidence}], confidence, abstained, message}) checked and turned
 * into quick-pick entries.
 *
 * Pure: no `vscode` import, so the unit tests run in plain node.
 */

export interface Position {
  line: number;
  character: number;
}

export interface ModuleHit {
  id: string;
  uri: string;
  range: { start: Position; end: Position };
  score: number;
  reason: string;
  /** "high" | "medium" | "low", or "" when the server rated nothing. */
  confidence: string;
}

/** How sure the server is of the whole answer; `abstained`: no module clearly matches. */
export interface Verdict {
  confidence: string;
  abstained: boolean;
  message: string;
}

export interface ModulePick {
  label: string;
  description: string;
  detail: string;
  hit: ModuleHit;
}

function isPosition(value: unknown): value is Position {
  const v = value as Position | null;
  return typeof v === "object" && v !== null && Number.isInteger(v.line) && Number.isInteger(v.character);
}

/** The modules of an answer; throws with the server's own error when it sent one. */
export function parseModules(answer: unknown): ModuleHit[] {
  if (typeof answer !== "object" || answer === null) {
    throw new Error("the server sent no answer to shoptalk/findModule");
  }
  const { modules, error } = answer as { modules?: unknown; error?: unknown };
  if (typeof error === "string" && error !== "") {
    throw new Error(error);
  }
  if (!Array.isArray(modules)) {
    throw new Error("the server's shoptalk/findModule answer has no modules list");
  }
  const hits: ModuleHit[] = [];
  for (const item of modules as unknown[]) {
    const m = item as Partial<ModuleHit> | null;
    if (m === null || typeof m !== "object" || typeof m.id !== "string" || typeof m.uri !== "string") {
      continue;
    }
    const zero = { line: 0, character: 0 };
    const range = m.range && isPosition(m.range.start) && isPosition(m.range.end) ? m.range : { start: zero, end: zero };
    hits.push({
      id: m.id,
      uri: m.uri,
      range,
      score: typeof m.score === "number" ? m.score : 0,
      reason: typeof m.reason === "string" ? m.reason : "",
      confidence: typeof m.confidence === "string" ? m.confidence : "",
    });
  }
  return hits;
}

/** The answer's verdict (older servers send none: rated "", never abstaining). */
export function parseVerdict(answer: unknown): Verdict {
  const a = (typeof answer === "object" && answer !== null ? answer : {}) as Partial<Verdict>;
  return {
    confidence: typeof a.confidence === "string" ? a.confidence : "",
    abstained: a.abstained === true,
    message: typeof a.message === "string" ? a.message : "",
  };
}

export function toPicks(hits: ModuleHit[]): ModulePick[] {
  return hits.map((hit) => ({
    label: hit.id,
    description: hit.confidence ? `${hit.confidence} confidence` : `score ${hit.score.toFixed(2)}`,
    detail: `${hit.reason}${hit.reason ? " · " : ""}line ${hit.range.start.line + 1}`,
    hit,
  }));
}

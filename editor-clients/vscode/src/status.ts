/**
 * What the status bar says about the server: which model (base / team /
 * personal), the device, and the training state (idle / queued / training
 * n% / promoted), from a `shoptalk/status` answer — and why suggestions are
 * slow or missing: the model is loading, the last one was over the time
 * budget ("over budget (2.1 s > 1.5 s)").
 *
 * Pure: no `vscode` import, so the unit tests run in plain node.
 */
import type { Off } from "./controls";

export type ModelKind = "base" | "team" | "personal";

export interface TrainingJob {
  state?: string;
  step?: string | null;
  progress?: number | null;
  message?: string | null;
}

/** The server's note on its last answer (`answer` of `shoptalk/status`). */
export interface AnswerNote {
  state?: string;
  message?: string;
  age_s?: number;
}

/** The `shoptalk/status` answer (fields the server may leave out are optional). */
export interface ServerStatus {
  model?: string | null;
  adapter?: string | null;
  device?: string | null;
  source?: string | null;
  run_id?: string | null;
  base?: string | null;
  personal?: boolean | null;
  loading?: boolean;
  error?: string | null;
  training?: TrainingJob | null;
  queue?: number | null;
  answer?: AnswerNote | null;
  counters?: Partial<Record<string, number>> | null;
}

export interface StatusView {
  kind: ModelKind;
  training: string;
  /** The status bar text (with a codicon). */
  text: string;
  /** Lines for the tooltip and the details quick pick. */
  details: string[];
}

export function modelKind(status: ServerStatus): ModelKind {
  if (status.personal === true || status.source === "personal") {
    return "personal";
  }
  if (status.source === "promoted") {
    return "team";
  }
  return "base";
}

export function trainingState(status: ServerStatus): string {
  const job = status.training;
  if (job === undefined || job === null || job.state === undefined) {
    return "idle";
  }
  switch (job.state) {
    case "queued":
      return "queued";
    case "running": {
      const progress = typeof job.progress === "number" ? Math.round(Math.min(1, Math.max(0, job.progress)) * 100) : 0;
      return `training ${progress}%`;
    }
    case "done":
      return /promot/i.test(job.message ?? "") ? "promoted" : "idle";
    case "failed":
      return "training failed";
    default:
      return "idle";
  }
}

function baseName(file: string): string {
  const parts = file.split(/[\\/]/);
  return parts[parts.length - 1] ?? file;
}

/**
 * The status bar's view of a `shoptalk/status` answer; `off` (the editor's
 * own switches or the file's exclusion, see controls.ts) takes the text.
 */
export function describeStatus(status: ServerStatus, off?: Off): StatusView {
  const kind = modelKind(status);
  const training = trainingState(status);
  const device = status.device ?? "?";
  let text: string;
  const slow = status.answer?.state === "over_budget" ? status.answer.message ?? "over budget" : undefined;
  if (status.loading === true) {
    text = "$(loading~spin) ShopTalk: loading";
  } else if (status.model === undefined || status.model === null) {
    text = "$(warning) ShopTalk: no model";
  } else if (slow !== undefined) {
    text = `$(watch) ShopTalk: ${kind} · ${slow}`;
  } else {
    text = `$(sparkle) ShopTalk: ${kind} · ${device} · ${training}`;
  }
  const details = [
    `Model: ${status.model ? baseName(status.model) : "none"} (${kind}${status.run_id ? `, run ${status.run_id}` : ""})`,
    `Adapter: ${status.adapter ? baseName(status.adapter) : "none"}`,
    `Device: ${device}`,
    `Training: ${training}${status.training?.message ? ` — ${status.training.message}` : ""}`,
    `Queue: ${status.queue ?? 0} job(s)`,
  ];
  if (status.loading === true) {
    details.push("Last suggestion: none yet, the model is loading");
  } else if (slow !== undefined) {
    details.push(`Last suggestion: ${slow}; raise shoptalk.maxLatencyMs or use a smaller model`);
  }
  const counters = status.counters ?? {};
  if (typeof counters.requests === "number") {
    details.push(`Requests: ${counters.requests} (${counters.answered ?? 0} answered)`);
  }
  const hits = counters.budget_hits;
  if (typeof hits === "number" && hits > 0) {
    details.push(`Over the time budget: ${hits} request(s) so far`);
  }
  if (status.error) {
    details.push(`Problem: ${status.error}`);
  }
  if (off !== undefined) {
    return { kind, training, text: off.text, details: [off.detail, ...details] };
  }
  return { kind, training, text, details };
}

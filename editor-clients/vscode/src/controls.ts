/**
 * Whether ShopTalk suggests in a document, and what the status bar says when
 * it does not: the global switch (`shoptalk.enable`), a snooze (until a
 * time), the languages turned off (`shoptalk.disabledLanguages`), and the
 * server's exclusion of the file (never-send files such as `.env*`, keys and
 * certificates, `.shoptalkignore`, `[mine] ignore_globs`; `shoptalk/exclusion`).
 *
 * An explicit trigger (VS Code's "Trigger Inline Suggestion", Alt+\) still
 * asks when suggestions are off, snoozed or off for the language; an
 * excluded file never gets a request.
 *
 * Pure: no `vscode` import, so the unit tests run in plain node.
 */

export interface Controls {
  enabled: boolean;
  /** Epoch milliseconds; undefined or past: not snoozed. */
  snoozedUntil?: number;
  disabledLanguages: readonly string[];
}

/** The server's `shoptalk/exclusion` answer for a document. */
export interface Exclusion {
  excluded: boolean;
  reason?: string | null;
  message?: string | null;
}

export type OffKind = "off" | "snoozed" | "language" | "excluded";

export interface Off {
  kind: OffKind;
  /** The status bar text (with a codicon). */
  text: string;
  /** The line for the tooltip and the details quick pick. */
  detail: string;
}

export const SNOOZE_CHOICES: readonly { label: string; minutes: number }[] = [
  { label: "15 minutes", minutes: 15 },
  { label: "1 hour", minutes: 60 },
  { label: "4 hours", minutes: 240 },
];

/** "14 min", "1 h 5 min": how long a snooze still lasts. */
export function remaining(until: number, now: number): string {
  const minutes = Math.max(1, Math.ceil((until - now) / 60000));
  if (minutes < 60) {
    return `${minutes} min`;
  }
  const hours = Math.floor(minutes / 60);
  const rest = minutes % 60;
  return rest === 0 ? `${hours} h` : `${hours} h ${rest} min`;
}

/** Why there are no suggestions in a document of `languageId`, or undefined when there are. */
export function offReason(controls: Controls, languageId: string | undefined, exclusion: Exclusion | undefined, now: number): Off | undefined {
  if (exclusion?.excluded === true) {
    const why = exclusion.message ?? exclusion.reason ?? "excluded";
    return { kind: "excluded", text: "$(lock) ShopTalk: off for this file", detail: `This file never reaches the model: ${why}` };
  }
  if (!controls.enabled) {
    return { kind: "off", text: "$(circle-slash) ShopTalk: off", detail: "Suggestions are off (shoptalk.enable)" };
  }
  if (controls.snoozedUntil !== undefined && controls.snoozedUntil > now) {
    const left = remaining(controls.snoozedUntil, now);
    return { kind: "snoozed", text: `$(clock) ShopTalk: snoozed (${left})`, detail: `Suggestions are snoozed for ${left} more` };
  }
  if (languageId !== undefined && controls.disabledLanguages.includes(languageId)) {
    return {
      kind: "language",
      text: `$(circle-slash) ShopTalk: off for ${languageId}`,
      detail: `Suggestions are off for ${languageId} (shoptalk.disabledLanguages)`,
    };
  }
  return undefined;
}

/** Whether to ask the server: never for an excluded file; when off, only on an explicit trigger. */
export function mayRequest(off: Off | undefined, explicit: boolean): boolean {
  if (off === undefined) {
    return true;
  }
  return explicit && off.kind !== "excluded";
}

/** `languages` with `languageId` added or removed (the per-language switch). */
export function toggled(languages: readonly string[], languageId: string): string[] {
  return languages.includes(languageId) ? languages.filter((id) => id !== languageId) : [...languages, languageId];
}

// On/off, snooze, per-language switches and the server's exclusion: what is asked and what the status bar says.
import assert from "node:assert/strict";
import { test } from "node:test";

import { mayRequest, offReason, remaining, toggled } from "../controls";
import { describeStatus } from "../status";

const ON = { enabled: true, disabledLanguages: [] as string[] };
const NOW = Date.UTC(2026, 0, 1, 12, 0, 0);

void test("suggestions are on unless a switch, a snooze or the file says otherwise", () => {
  assert.equal(offReason(ON, "python", undefined, NOW), undefined);
  assert.equal(offReason(ON, "python", { excluded: false, reason: null }, NOW), undefined);
  assert.equal(offReason({ ...ON, enabled: false }, "python", undefined, NOW)?.text, "$(circle-slash) ShopTalk: off");
  const snoozed = offReason({ ...ON, snoozedUntil: NOW + 14 * 60000 }, "python", undefined, NOW);
  assert.equal(snoozed?.text, "$(clock) ShopTalk: snoozed (14 min)");
  assert.equal(offReason({ ...ON, snoozedUntil: NOW - 1 }, "python", undefined, NOW), undefined); // over
  const language = offReason({ ...ON, disabledLanguages: ["python"] }, "python", undefined, NOW);
  assert.equal(language?.text, "$(circle-slash) ShopTalk: off for python");
  assert.equal(offReason({ ...ON, disabledLanguages: ["python"] }, "go", undefined, NOW), undefined);
  const excluded = offReason(ON, "python", { excluded: true, reason: "never_send", message: "never sent (keys, secrets, environment files)" }, NOW);
  assert.equal(excluded?.text, "$(lock) ShopTalk: off for this file");
  assert.equal(excluded.detail, "This file never reaches the model: never sent (keys, secrets, environment files)");
});

void test("an explicit trigger asks even when off or snoozed, never for an excluded file", () => {
  const off = offReason({ ...ON, enabled: false }, "python", undefined, NOW);
  const excluded = offReason(ON, "python", { excluded: true, reason: "shoptalkignore" }, NOW);
  assert.equal(mayRequest(undefined, false), true);
  assert.equal(mayRequest(off, false), false);
  assert.equal(mayRequest(off, true), true);
  assert.equal(mayRequest(excluded, true), false);
});

void test("snooze time left, and the language list switch", () => {
  assert.equal(remaining(NOW + 30 * 1000, NOW), "1 min");
  assert.equal(remaining(NOW + 60 * 60000, NOW), "1 h");
  assert.equal(remaining(NOW + 65 * 60000, NOW), "1 h 5 min");
  assert.deepEqual(toggled(["go"], "python"), ["go", "python"]);
  assert.deepEqual(toggled(["go", "python"], "python"), ["go"]);
});

void test("a switch takes the status bar text; the server's details stay in the tooltip", () => {
  const off = offReason({ ...ON, enabled: false }, "python", undefined, NOW);
  const view = describeStatus({ model: "/m/model.gguf", device: "cpu", source: "promoted" }, off);
  assert.equal(view.text, "$(circle-slash) ShopTalk: off");
  assert.equal(view.details[0], "Suggestions are off (shoptalk.enable)");
  assert.ok(view.details.includes("Device: cpu"));
});

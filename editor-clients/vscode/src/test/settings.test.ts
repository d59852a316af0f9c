// Settings: reading the contributed schema, fallbacks, initializationOptions, debounce.
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import { test } from "node:test";

import { DEFAULTS, debounce, initializationOptions, needsRestart, readSettings, settingsChange } from "../settings";

interface Property {
  default: unknown;
}

const manifest = JSON.parse(fs.readFileSync(path.join(__dirname, "..", "..", "package.json"), "utf8")) as {
  contributes: { configuration: { properties: Record<string, Property> } };
};
const schema = manifest.contributes.configuration.properties;

void test("package.json's schema and the typed defaults agree key for key", () => {
  const fromSchema = readSettings((key) => (schema[`shoptalk.${key}`] as Property | undefined)?.default);
  assert.deepEqual(fromSchema.problems, []);
  assert.deepEqual(fromSchema.settings, DEFAULTS);
  const keys = Object.keys(schema).map((key) => key.replace(/^shoptalk\./, ""));
  const read: string[] = [];
  readSettings((key) => {
    read.push(key);
    return undefined;
  });
  assert.deepEqual([...read].sort(), [...keys].sort());
});

void test("unset settings give the defaults", () => {
  const { settings, problems } = readSettings(() => undefined);
  assert.deepEqual(settings, DEFAULTS);
  assert.deepEqual(problems, []);
});

void test("an invalid value falls back to its default and is reported by name", () => {
  const values: Record<string, unknown> = { maxLatencyMs: -5, multiline: "sometimes", languages: "python" };
  const { settings, problems } = readSettings((key) => values[key]);
  assert.equal(settings.maxLatencyMs, DEFAULTS.maxLatencyMs);
  assert.equal(settings.multiline, "auto");
  assert.deepEqual(settings.languages, DEFAULTS.languages);
  assert.equal(problems.length, 3);
  assert.match(problems.join("\n"), /shoptalk\.maxLatencyMs: expected a whole number/);
  assert.match(problems.join("\n"), /shoptalk\.multiline: expected "auto", "always" or "never", got "sometimes"/);
});

void test("inconsistent settings are reported: openai without a URL, personal without identity", () => {
  const values: Record<string, unknown> = { backend: "openai", "personal.enabled": true };
  const { problems } = readSettings((key) => values[key]);
  assert.equal(problems.length, 2);
  assert.match(problems[0] ?? "", /openaiUrl is empty/);
  assert.match(problems[1] ?? "", /personal\.identity is empty/);
});

void test("initializationOptions carry the [serve] keys and personal, as the server reads them", () => {
  const values: Record<string, unknown> = {
    maxLatencyMs: 800,
    multiline: "never",
    watch: true,
    "personal.enabled": true,
    "personal.identity": ["me@example.com"],
    openaiUrl: "  ",
  };
  const options = initializationOptions(readSettings((key) => values[key]).settings);
  assert.deepEqual(options, {
    backend: "llama",
    max_latency_ms: 800,
    max_tokens: 48,
    multiline: "never",
    watch: true,
    personal: { enabled: true, identity: ["me@example.com"] },
  });
  assert.equal(initializationOptions(DEFAULTS).max_latency_ms, "auto");
  const remote = initializationOptions({ ...DEFAULTS, backend: "openai", openaiUrl: "http://127.0.0.1:8000", openaiModel: "team" });
  assert.equal(remote.openai_url, "http://127.0.0.1:8000");
  assert.equal(remote.openai_model, "team");
});

void test("a settings change restarts the server only for a new process; the rest is sent to it", () => {
  assert.equal(settingsChange(DEFAULTS, { ...DEFAULTS }), "none");
  // What the server reads: workspace/didChangeConfiguration, the model stays loaded.
  assert.equal(settingsChange(DEFAULTS, { ...DEFAULTS, watch: true }), "configure");
  assert.equal(settingsChange(DEFAULTS, { ...DEFAULTS, maxLatencyMs: 900 }), "configure");
  assert.equal(settingsChange(DEFAULTS, { ...DEFAULTS, personal: { enabled: true, identity: ["me@example.com"] } }), "configure");
  // The extension's own switches: nothing to tell the server.
  assert.equal(settingsChange(DEFAULTS, { ...DEFAULTS, enable: false }), "none");
  assert.equal(settingsChange(DEFAULTS, { ...DEFAULTS, disabledLanguages: ["go"] }), "none");
  // Another interpreter, command or language list: a new process.
  assert.equal(settingsChange(DEFAULTS, { ...DEFAULTS, pythonPath: "/opt/py/bin/python" }), "restart");
  assert.equal(settingsChange(DEFAULTS, { ...DEFAULTS, serverCommand: ["shoptalk", "serve"] }), "restart");
  assert.equal(settingsChange(DEFAULTS, { ...DEFAULTS, languages: ["python"] }), "restart");
  assert.equal(needsRestart(DEFAULTS, { ...DEFAULTS, watch: true }), false);
  assert.equal(needsRestart(DEFAULTS, { ...DEFAULTS, languages: ["go"] }), true);
});

void test("debounce runs once after a burst", async () => {
  let calls = 0;
  const debounced = debounce(() => {
    calls += 1;
  }, 30);
  for (let i = 0; i < 5; i += 1) {
    debounced();
  }
  assert.equal(calls, 0);
  await new Promise((resolve) => setTimeout(resolve, 80));
  assert.equal(calls, 1);
  debounced();
  debounced.cancel();
  await new Promise((resolve) => setTimeout(resolve, 80));
  assert.equal(calls, 1);
});

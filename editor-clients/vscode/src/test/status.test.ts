// Status bar and module answers: what the user sees from the server's replies.
import assert from "node:assert/strict";
import { test } from "node:test";

import { parseModules, toPicks } from "../modules";
import { describeStatus, modelKind, trainingState } from "../status";

void test("the model kind: base, team (promoted), personal", () => {
  assert.equal(modelKind({ source: "default base" }), "base");
  assert.equal(modelKind({ source: "--model" }), "base");
  assert.equal(modelKind({ source: "promoted", run_id: "run-1" }), "team");
  assert.equal(modelKind({ source: "promoted", personal: true }), "personal");
});

void test("the training state: idle, queued, training n%, promoted, failed", () => {
  assert.equal(trainingState({}), "idle");
  assert.equal(trainingState({ training: null }), "idle");
  assert.equal(trainingState({ training: { state: "queued" } }), "queued");
  assert.equal(trainingState({ training: { state: "running", progress: 0.426 } }), "training 43%");
  assert.equal(trainingState({ training: { state: "done", message: "promoted run-7 (EM 31.0 >= 29.5)" } }), "promoted");
  assert.equal(trainingState({ training: { state: "done", message: "kept the current model" } }), "idle");
  assert.equal(trainingState({ training: { state: "failed", message: "out of memory" } }), "training failed");
});

void test("the status bar text and details", () => {
  const view = describeStatus({
    model: "/data/repos/x/runs/run-3/export/model-q4_k_m.gguf",
    device: "cpu",
    source: "promoted",
    run_id: "run-3",
    training: { state: "running", progress: 0.5 },
    queue: 1,
  });
  assert.equal(view.text, "$(sparkle) ShopTalk: team · cpu · training 50%");
  assert.deepEqual(view.details.slice(0, 3), ["Model: model-q4_k_m.gguf (team, run run-3)", "Adapter: none", "Device: cpu"]);
  assert.equal(describeStatus({ loading: true }).text, "$(loading~spin) ShopTalk: loading");
  const broken = describeStatus({ model: null, error: "no model to serve" });
  assert.equal(broken.text, "$(warning) ShopTalk: no model");
  assert.ok(broken.details.includes("Problem: no model to serve"));
});

void test("why suggestions are slow or missing: loading, over budget, and the count", () => {
  const slow = describeStatus({
    model: "/m/model.gguf",
    device: "cpu",
    source: "promoted",
    answer: { state: "over_budget", message: "over budget (2.1 s > 1.5 s)", age_s: 3 },
    counters: { budget_hits: 4 },
  });
  assert.equal(slow.text, "$(watch) ShopTalk: team · over budget (2.1 s > 1.5 s)");
  assert.ok(slow.details.includes("Last suggestion: over budget (2.1 s > 1.5 s); raise shoptalk.maxLatencyMs or use a smaller model"));
  assert.ok(slow.details.includes("Over the time budget: 4 request(s) so far"));
  const loading = describeStatus({ loading: true, answer: { state: "loading", message: "loading" } });
  assert.equal(loading.text, "$(loading~spin) ShopTalk: loading");
  assert.ok(loading.details.includes("Last suggestion: none yet, the model is loading"));
  const fine = describeStatus({ model: "/m/model.gguf", device: "cpu", answer: { state: "ok", message: "ok" } });
  assert.equal(fine.text, "$(sparkle) ShopTalk: base · cpu · idle");
});

void test("findModule answers become quick-pick entries; a server error is raised as such", () => {
  const hits = parseModules({
    modules: [
      { id: "shop.billing", uri: "file:///r/shop/billing.py", range: { start: { line: 3, character: 0 }, end: { line: 9, character: 0 } }, score: 0.8123, reason: "bm25" },
      { id: "broken" },
      { id: "shop.mailer", uri: "file:///r/shop/mailer.py", score: "high" },
    ],
  });
  assert.deepEqual(
    hits.map((h) => h.id),
    ["shop.billing", "shop.mailer"],
  );
  assert.deepEqual(hits[1]?.range.start, { line: 0, character: 0 });
  const picks = toPicks(hits);
  assert.equal(picks[0]?.label, "shop.billing");
  assert.equal(picks[0]?.description, "score 0.81");
  assert.equal(picks[0]?.detail, "bm25 · line 4");
  assert.throws(() => parseModules({ modules: [], error: "the query is empty" }), /the query is empty/);
  assert.throws(() => parseModules(null), /no answer/);
});

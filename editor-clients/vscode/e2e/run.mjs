// The extension in a real VS Code: code-server on loopback, driven in headless
// Chromium with playwright-core. Opens a file, types, waits for the ghost
// text, accepts it with Tab, runs "ShopTalk: Find module…", opens the status
// details. Writes what it saw to <out>/result.json (and a screenshot when a
// step fails); tests/test_vscode.py asserts on it.
//
// usage: node run.mjs --code-server DIR --vsix FILE --workspace DIR --python PY
//                     --out DIR [--chromium /usr/bin/chromium] [--query TEXT]
import { spawn, spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as net from "node:net";
import * as path from "node:path";
import { parseArgs } from "node:util";

import { chromium } from "playwright-core";

const { values: args } = parseArgs({
  options: {
    "code-server": { type: "string" },
    vsix: { type: "string" },
    workspace: { type: "string" },
    python: { type: "string" },
    out: { type: "string" },
    chromium: { type: "string", default: "/usr/bin/chromium" },
    query: { type: "string", default: "create invoices for customers" },
    typed: { type: "string", default: '        path = os.environ.get("APP_' },
  },
});
for (const name of ["code-server", "vsix", "workspace", "python", "out"]) {
  if (!args[name]) {
    console.error(`missing --${name}`);
    process.exit(2);
  }
}

const out = path.resolve(args.out);
fs.mkdirSync(out, { recursive: true });
const entry = path.join(args["code-server"], "out", "node", "entry.js");
const userData = path.join(out, "user-data");
const extensions = path.join(out, "extensions");
const result = { steps: [], log: [] };
const save = () => fs.writeFileSync(path.join(out, "result.json"), JSON.stringify(result, null, 2));
const note = (step, data = {}) => {
  result.steps.push({ step, at: Date.now(), ...data });
  save();
  console.error(`e2e: ${step} ${JSON.stringify(data)}`);
};

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
    server.on("error", reject);
  });
}

// Settings of a fresh user: no welcome page, no trust prompt, typing lands as typed.
fs.mkdirSync(path.join(userData, "User"), { recursive: true });
fs.writeFileSync(
  path.join(userData, "User", "settings.json"),
  JSON.stringify(
    {
      "shoptalk.pythonPath": args.python,
      "shoptalk.maxLatencyMs": 30000,
      "workbench.startupEditor": "none",
      "security.workspace.trust.enabled": false,
      "editor.autoClosingBrackets": "never",
      "editor.autoClosingQuotes": "never",
      "editor.quickSuggestions": { other: "off", comments: "off", strings: "off" },
      "editor.suggestOnTriggerCharacters": false,
      "editor.inlineSuggest.enabled": true,
      "workbench.tips.enabled": false,
      "extensions.ignoreRecommendations": true,
      "telemetry.telemetryLevel": "off",
      "update.mode": "none",
      "shoptalk.trace.server": "messages",
    },
    null,
    2,
  ),
);

// code-server runs the extension host as a remote one: settings of machine
// scope (shoptalk.pythonPath) belong in the remote machine's settings, which
// survive a settings update (the user file's copy is dropped on reload).
fs.mkdirSync(path.join(userData, "Machine"), { recursive: true });
fs.writeFileSync(path.join(userData, "Machine", "settings.json"), JSON.stringify({ "shoptalk.pythonPath": args.python }, null, 2));

const common = ["--user-data-dir", userData, "--extensions-dir", extensions, "--config", path.join(out, "config.yaml")];
fs.writeFileSync(path.join(out, "config.yaml"), "auth: none\ncert: false\n");
const install = spawnSync(process.execPath, [entry, ...common, "--install-extension", args.vsix], { encoding: "utf8" });
note("install-extension", { code: install.status, output: (install.stdout + install.stderr).trim().slice(-500) });
if (install.status !== 0) {
  process.exit(1);
}

const port = await freePort();
const serverLog = fs.openSync(path.join(out, "code-server.log"), "w");
const codeServer = spawn(
  process.execPath,
  [entry, ...common, "--bind-addr", `127.0.0.1:${port}`, "--auth", "none", "--disable-telemetry", "--disable-update-check", "--disable-workspace-trust", "--ignore-last-opened", args.workspace],
  { stdio: ["ignore", serverLog, serverLog], env: { ...process.env, XDG_CONFIG_HOME: path.join(out, "xdg-config"), XDG_DATA_HOME: path.join(out, "xdg-data") } },
);

let browser;
let page;
let failed = false;
try {
  const base = `http://127.0.0.1:${port}`;
  for (let i = 0; ; i += 1) {
    try {
      const response = await fetch(`${base}/healthz`);
      if (response.ok) break;
    } catch {
      // not listening yet
    }
    if (i > 300) throw new Error("code-server did not start");
    await new Promise((r) => setTimeout(r, 200));
  }
  note("code-server-up", { port });

  browser = await chromium.launch({ executablePath: args.chromium, args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"] });
  page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.on("console", (message) => {
    if (message.type() === "error") result.log.push(message.text().slice(0, 300));
  });
  await page.goto(`${base}/?folder=${encodeURIComponent(args.workspace)}`);
  await page.waitForSelector(".monaco-workbench .statusbar", { timeout: 120000 });
  note("workbench");

  // Open app.py with Quick Open.
  await page.keyboard.press("Control+P");
  await page.waitForSelector(".quick-input-widget .quick-input-box input", { timeout: 30000 });
  await page.keyboard.type("app.py");
  await page.waitForSelector(".quick-input-list .monaco-list-row", { timeout: 30000 });
  await page.keyboard.press("Enter");
  await page.waitForSelector('.tab.active[aria-label*="app.py"]', { timeout: 30000 });
  note("opened", { file: "app.py" });

  // Wait for the server: the status bar item leaves "starting"/"loading".
  const statusItem = page.locator(".statusbar-item", { hasText: "ShopTalk" }).first();
  await statusItem.waitFor({ timeout: 120000 });
  for (let i = 0; ; i += 1) {
    const text = (await statusItem.innerText()).trim();
    if (/ShopTalk: (base|team|personal)/.test(text)) {
      note("status-bar", { text });
      break;
    }
    if (/error|stopped|no model/i.test(text) || i > 600) throw new Error(`status bar says: ${text}`);
    await page.waitForTimeout(200);
  }

  // Type at the end of the file and wait for the ghost text.
  await page.locator(".monaco-editor .view-lines").first().click();
  await page.keyboard.press("Control+End");
  await page.keyboard.type(args.typed, { delay: 15 });
  const ghostSelector = ".monaco-editor .ghost-text-decoration, .monaco-editor .ghost-text";
  await page.locator(ghostSelector).first().waitFor({ state: "visible", timeout: 90000 });
  // Let the suggestion settle (a newer answer may replace the first one).
  let ghostParts = [];
  for (let i = 0; i < 20; i += 1) {
    const parts = await page.locator(ghostSelector).allInnerTexts();
    if (parts.length > 0 && JSON.stringify(parts) === JSON.stringify(ghostParts)) break;
    ghostParts = parts;
    await page.waitForTimeout(300);
  }
  note("ghost-text", { parts: ghostParts });
  await page.screenshot({ path: path.join(out, "ghost.png") });

  await page.keyboard.press("Tab");
  for (let i = 0; i < 40 && (await page.locator(ghostSelector).count()) > 0; i += 1) {
    await page.waitForTimeout(250);
  }
  await page.keyboard.press("Control+S");
  const file = path.join(args.workspace, "app.py");
  // Saved once the typed line goes on past what was typed (the accepted text).
  const accepted = (text) => text.split("\n").some((line) => line.startsWith(args.typed) && line.length > args.typed.length);
  let saved = "";
  for (let i = 0; i < 100; i += 1) {
    saved = fs.readFileSync(file, "utf8");
    if (accepted(saved)) break;
    if (i % 10 === 9) await page.keyboard.press("Control+S");
    await page.waitForTimeout(100);
  }
  note("accepted", { saved });
  await page.screenshot({ path: path.join(out, "accepted.png") });
  await page.keyboard.press("Escape");

  // ShopTalk: Find module…
  await page.keyboard.press("F1");
  await page.waitForSelector(".quick-input-widget .quick-input-box input", { timeout: 30000 });
  await page.keyboard.type("ShopTalk: Find module");
  await page.waitForSelector('.quick-input-list .monaco-list-row[aria-label*="Find module"]', { timeout: 30000 });
  await page.keyboard.press("Enter");
  await page.waitForSelector('.quick-input-widget .quick-input-title:has-text("Find module")', { timeout: 30000 });
  await page.keyboard.type(args.query);
  await page.keyboard.press("Enter");
  await page.waitForSelector('.quick-input-widget .quick-input-title:has-text("Modules for")', { timeout: 120000 });
  await page.waitForSelector(".quick-input-list .monaco-list-row", { timeout: 30000 });
  const rowLabels = () =>
    page.$$eval(".quick-input-widget .quick-input-list .monaco-list-row", (rows) => rows.map((row) => row.getAttribute("aria-label") ?? ""));
  const modules = (await rowLabels()).map((label) => label.split(",")[0].trim());
  note("module-pick", { modules });
  await page.keyboard.press("Enter");
  const first = modules[0].trim();
  const expectedFile = `${first.split(".").pop()}.py`;
  await page.waitForSelector(`.tab.active[aria-label*="${expectedFile}"]`, { timeout: 30000 });
  const cursor = (await page.locator(".statusbar-item", { hasText: /^Ln \d+/ }).first().innerText()).trim();
  note("module-opened", { tab: await page.locator(".tab.active").first().getAttribute("aria-label"), cursor });

  // Status details from the status bar item.
  await statusItem.click();
  await page.waitForSelector('.quick-input-widget .quick-input-title:has-text("ShopTalk")', { timeout: 30000 });
  const details = (await rowLabels()).map((label) => label.trim());
  note("status-details", { details });
  await page.keyboard.press("Escape");

  const statusText = async () => (await statusItem.innerText()).trim();
  const waitStatus = async (pattern, step, timeout = 60000) => {
    for (let waited = 0; ; waited += 250) {
      const text = await statusText();
      if (pattern.test(text)) {
        note(step, { text });
        return text;
      }
      if (waited > timeout) throw new Error(`status bar says "${text}", waiting for ${pattern}`);
      await page.waitForTimeout(250);
    }
  };
  // The request count the status menu shows (shoptalk/status counters).
  const requestCount = async () => {
    await statusItem.click();
    await page.waitForSelector('.quick-input-widget .quick-input-title:has-text("ShopTalk")', { timeout: 30000 });
    const line = (await rowLabels()).find((label) => label.startsWith("Requests:")) ?? "";
    await page.keyboard.press("Escape");
    return Number((line.match(/Requests: (\d+)/) ?? [])[1]);
  };
  const typeAtEnd = async (text) => {
    await page.locator(".monaco-editor .view-lines").first().click();
    await page.keyboard.press("Control+End");
    await page.keyboard.type(text, { delay: 15 });
  };
  const runCommand = async (title) => {
    await page.keyboard.press("F1");
    await page.waitForSelector(".quick-input-widget .quick-input-box input", { timeout: 30000 });
    await page.keyboard.type(title);
    await page.waitForSelector(`.quick-input-list .monaco-list-row[aria-label*="${title.replace(/^ShopTalk: /, "")}"]`, { timeout: 30000 });
    await page.keyboard.press("Enter");
  };

  // Off from the status-bar menu: the status bar says so and nothing is asked.
  await statusItem.click();
  await page.waitForSelector('.quick-input-list .monaco-list-row[aria-label*="Turn suggestions off"]', { timeout: 30000 });
  const menu = (await rowLabels()).map((label) => label.trim());
  note("switch-menu", { rows: menu });
  await page.locator('.quick-input-list .monaco-list-row[aria-label*="Turn suggestions off"]').first().click();
  await waitStatus(/^ShopTalk: off$/, "switched-off");
  const before = await requestCount();
  await typeAtEnd("\n    answer = read_config(");
  await page.waitForTimeout(4000);
  note("typed-while-off", { before, after: await requestCount(), ghosts: await page.locator(ghostSelector).count() });
  // On again from the command palette.
  await runCommand("ShopTalk: Toggle Suggestions");
  await waitStatus(/^ShopTalk: (team|base)/, "switched-on");

  // A settings change reaches the running server without a restart: a 1 ms
  // budget is over at once, and the status bar says by how much.
  // (Edited as a user edits it: in VS Code's own settings.json editor.)
  const settingsFile = path.join(userData, "User", "settings.json");
  const userSettings = JSON.parse(fs.readFileSync(settingsFile, "utf8"));
  await runCommand("Preferences: Open User Settings (JSON)");
  await page.waitForSelector('.tab.active[aria-label*="settings.json"]', { timeout: 30000 });
  await page.locator(".monaco-editor .view-lines").first().click();
  await page.keyboard.press("Control+A");
  await page.keyboard.insertText(JSON.stringify({ ...userSettings, "shoptalk.maxLatencyMs": 1 }, null, 2));
  await page.keyboard.press("Control+S");
  for (let i = 0; i < 40 && !fs.readFileSync(settingsFile, "utf8").includes('"shoptalk.maxLatencyMs": 1,'); i += 1) {
    await page.waitForTimeout(250);
  }
  await page.keyboard.press("Control+W");
  await page.waitForTimeout(1500);
  await typeAtEnd(" path");
  await waitStatus(/over budget \(.+ > 1 ms\)/, "over-budget");

  // A file the server never sends to a model: "off for this file", no request.
  await page.keyboard.press("Control+P");
  await page.waitForSelector(".quick-input-widget .quick-input-box input", { timeout: 30000 });
  await page.keyboard.type("secret_keys.py");
  await page.waitForSelector('.quick-input-list .monaco-list-row[aria-label*="secret_keys.py"]', { timeout: 30000 });
  await page.keyboard.press("Enter");
  await page.waitForSelector('.tab.active[aria-label*="secret_keys.py"]', { timeout: 30000 });
  await waitStatus(/^ShopTalk: off for this file$/, "excluded-file");
  const beforeSecret = await requestCount();
  await typeAtEnd("\n    token = os.environ.get(");
  await page.waitForTimeout(3000);
  note("typed-in-excluded", { before: beforeSecret, after: await requestCount(), ghosts: await page.locator(ghostSelector).count() });
} catch (error) {
  failed = true;
  note("failed", { error: String(error && error.stack ? error.stack : error).slice(0, 2000) });
  if (page) await page.screenshot({ path: path.join(out, "failure.png") }).catch(() => {});
} finally {
  if (browser) await browser.close().catch(() => {});
  codeServer.kill("SIGTERM");
  await new Promise((r) => setTimeout(r, 500));
  if (codeServer.exitCode === null) codeServer.kill("SIGKILL");
  save();
}
process.exit(failed ? 1 : 0);

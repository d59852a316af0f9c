// Launcher: which interpreter, which command, and the checks that tell
// "Python not found" from "shoptalk not installed" — against real interpreters.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { test } from "node:test";

import { checkInterpreter, findOnPath, installCommand, isProblem, LogTail, resolveInterpreter, serverCommand } from "../launcher";
import { DEFAULTS } from "../settings";

// The interpreter with shoptalk installed (the repository's venv, or the one pytest runs).
const SHOPTALK_PYTHON = process.env.SHOPTALK_TEST_PYTHON ?? path.resolve(__dirname, "..", "..", "..", "..", ".venv", "bin", "python");

function tempDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), "shoptalk-launcher-"));
}

void test("the configured interpreter wins, and a missing one is reported", () => {
  const chosen = resolveInterpreter({ ...DEFAULTS, pythonPath: SHOPTALK_PYTHON }, "/usr/bin/python3", process.env);
  assert.ok(!isProblem(chosen));
  assert.equal(chosen.path, SHOPTALK_PYTHON);
  assert.equal(chosen.source, "setting shoptalk.pythonPath");

  const missing = resolveInterpreter({ ...DEFAULTS, pythonPath: "/no/such/python" }, undefined, process.env);
  assert.ok(isProblem(missing));
  assert.equal(missing.kind, "python-not-found");
  assert.match(missing.message, /\/no\/such\/python/);
});

void test("without a setting: the Python extension's interpreter, then python3 on PATH, else a clear problem", () => {
  const fromExtension = resolveInterpreter(DEFAULTS, SHOPTALK_PYTHON, process.env);
  assert.ok(!isProblem(fromExtension));
  assert.equal(fromExtension.source, "Python extension");

  const dir = tempDir();
  const fake = path.join(dir, "python3");
  fs.writeFileSync(fake, "#!/bin/sh\nexit 0\n", { mode: 0o755 });
  const fromPath = resolveInterpreter(DEFAULTS, undefined, { PATH: `/no/such/dir${path.delimiter}${dir}` });
  assert.ok(!isProblem(fromPath));
  assert.equal(fromPath.path, fake);
  assert.equal(fromPath.source, "PATH");

  const none = resolveInterpreter(DEFAULTS, undefined, { PATH: tempDir() });
  assert.ok(isProblem(none));
  assert.equal(none.kind, "python-not-found");
  assert.equal(findOnPath("python3", ""), undefined);
});

void test("the server command runs the CLI module with the interpreter, or the configured command", () => {
  const interpreter = { path: "/opt/py/bin/python", source: "PATH" as const };
  assert.deepEqual(serverCommand(DEFAULTS, interpreter), {
    command: "/opt/py/bin/python",
    args: ["-m", "shoptalk.models.cli", "serve", "--stdio"],
  });
  assert.deepEqual(serverCommand({ ...DEFAULTS, serverCommand: ["shoptalk", "serve", "--stdio", "--repo", "/r"] }, undefined), {
    command: "shoptalk",
    args: ["serve", "--stdio", "--repo", "/r"],
  });
  assert.equal(installCommand("/a b/python"), `"/a b/python" -m pip install 'shoptalk[serve]'`);
});

void test("checkInterpreter: a working install passes", async () => {
  assert.equal(await checkInterpreter(SHOPTALK_PYTHON), undefined);
});

void test("checkInterpreter: a Python without shoptalk asks for the install command", async () => {
  const venv = path.join(tempDir(), "venv");
  const made = spawnSync("python3", ["-m", "venv", "--without-pip", venv]);
  assert.equal(made.status, 0, String(made.stderr));
  const python = path.join(venv, "bin", "python");
  const problem = await checkInterpreter(python);
  assert.ok(problem !== undefined);
  assert.equal(problem.kind, "shoptalk-missing");
  assert.ok("installCommand" in problem);
  assert.equal(problem.installCommand, `${python} -m pip install 'shoptalk[serve]'`);
});

void test("checkInterpreter: a path that cannot run is 'Python not found'", async () => {
  const problem = await checkInterpreter("/no/such/python");
  assert.equal(problem?.kind, "python-not-found");
});

void test("LogTail keeps the last lines, across chunk boundaries", () => {
  const tail = new LogTail(3);
  tail.push("one\ntw");
  tail.push("o\nthree\n\nfour\nfi");
  assert.equal(tail.text(), "three\nfour\nfi");
  tail.clear();
  assert.equal(tail.text(), "");
});

/**
 * Starting `shoptalk serve --stdio`: which interpreter (setting, the Python
 * extension's active one, python3 on PATH), the command line, and a check
 * that tells "Python not found" from "shoptalk not installed" before the
 * language client tries to talk to a process that cannot start.
 *
 * No `vscode` import: the unit tests run it in plain node against real
 * interpreters.
 */
import { spawn } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";

import type { ShopTalkSettings } from "./settings";

export interface Interpreter {
  path: string;
  source: "setting shoptalk.pythonPath" | "Python extension" | "PATH";
}

export type LaunchProblem =
  | { kind: "python-not-found"; message: string }
  | { kind: "shoptalk-missing"; message: string; installCommand: string }
  | { kind: "serve-extra-missing"; message: string; installCommand: string }
  | { kind: "probe-failed"; message: string };

export interface ServerCommand {
  command: string;
  args: string[];
}

function isExecutable(file: string): boolean {
  try {
    fs.accessSync(file, fs.constants.X_OK);
    return fs.statSync(file).isFile();
  } catch {
    return false;
  }
}

/** The first executable named `name` on a PATH string. */
export function findOnPath(name: string, envPath: string | undefined, platform = process.platform): string | undefined {
  if (name.includes("/") || name.includes("\\")) {
    return isExecutable(name) ? name : undefined;
  }
  const extensions = platform === "win32" ? [".exe", ".cmd", ""] : [""];
  for (const dir of (envPath ?? "").split(path.delimiter)) {
    if (dir === "") {
      continue;
    }
    for (const extension of extensions) {
      const candidate = path.join(dir, name + extension);
      if (isExecutable(candidate)) {
        return candidate;
      }
    }
  }
  return undefined;
}

function expandHome(file: string, home: string | undefined): string {
  return file.startsWith("~/") && home ? path.join(home, file.slice(2)) : file;
}

/**
 * The interpreter to run the server with, or the problem that prevents it.
 * `fromPythonExtension` is the Python extension's active interpreter, when
 * that extension is installed.
 */
export function resolveInterpreter(
  settings: ShopTalkSettings,
  fromPythonExtension: string | undefined,
  env: NodeJS.ProcessEnv,
): Interpreter | LaunchProblem {
  if (settings.pythonPath !== "") {
    const configured = expandHome(settings.pythonPath, env.HOME);
    const found = findOnPath(configured, env.PATH);
    if (found === undefined) {
      return {
        kind: "python-not-found",
        message: `The Python interpreter "${settings.pythonPath}" (setting shoptalk.pythonPath) does not exist or is not executable. Point the setting at the interpreter you installed shoptalk into.`,
      };
    }
    return { path: found, source: "setting shoptalk.pythonPath" };
  }
  if (fromPythonExtension !== undefined && isExecutable(fromPythonExtension)) {
    return { path: fromPythonExtension, source: "Python extension" };
  }
  for (const name of ["python3", "python"]) {
    const found = findOnPath(name, env.PATH);
    if (found !== undefined) {
      return { path: found, source: "PATH" };
    }
  }
  return {
    kind: "python-not-found",
    message:
      "No Python interpreter found (no shoptalk.pythonPath setting, no Python extension interpreter, no python3 on PATH). Install Python 3.11+ and shoptalk, then set shoptalk.pythonPath.",
  };
}

export function isProblem(value: Interpreter | LaunchProblem | undefined): value is LaunchProblem {
  return value !== undefined && "kind" in value;
}

/** The command line of the language server. */
export function serverCommand(settings: ShopTalkSettings, interpreter: Interpreter | undefined): ServerCommand {
  if (settings.serverCommand.length > 0) {
    const [command, ...args] = settings.serverCommand;
    return { command, args };
  }
  if (interpreter === undefined) {
    throw new Error("serverCommand needs an interpreter when shoptalk.serverCommand is empty");
  }
  return { command: interpreter.path, args: ["-m", "shoptalk.models.cli", "serve", "--stdio"] };
}

export function installCommand(python: string): string {
  const quoted = /\s/.test(python) ? `"${python}"` : python;
  return `${quoted} -m pip install 'shoptalk[serve]'`;
}

const PROBE = [
  "import importlib.util, json",
  "def has(name):",
  "    try:",
  "        return importlib.util.find_spec(name) is not None",
  "    except ImportError:",
  "        return False",
  "print(json.dumps({'shoptalk': has('shoptalk.server') and has('shoptalk.models.cli'),",
  "                  'missing': [m for m in ('pygls', 'lsprotocol', 'llama_cpp') if not has(m)]}))",
].join("\n");

/** Run `command` and collect its output (no shell). */
export function run(
  command: string,
  args: string[],
  timeoutMs: number,
): Promise<{ code: number | null; stdout: string; stderr: string; error?: Error }> {
  return new Promise((resolve) => {
    let stdout = "";
    let stderr = "";
    let settled = false;
    const child = spawn(command, args, { stdio: ["ignore", "pipe", "pipe"] });
    const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
    child.stdout.on("data", (chunk: Buffer) => {
      stdout += chunk.toString();
    });
    child.stderr.on("data", (chunk: Buffer) => {
      stderr += chunk.toString();
    });
    const finish = (code: number | null, error?: Error): void => {
      if (!settled) {
        settled = true;
        clearTimeout(timer);
        resolve({ code, stdout, stderr, error });
      }
    };
    child.on("error", (error) => {
      finish(null, error);
    });
    child.on("close", (code) => {
      finish(code);
    });
  });
}

/**
 * Check that `python` runs and has shoptalk with its serve extra; undefined
 * when all is well.
 */
export async function checkInterpreter(python: string, timeoutMs = 20000): Promise<LaunchProblem | undefined> {
  const result = await run(python, ["-c", PROBE], timeoutMs);
  if (result.error !== undefined) {
    return {
      kind: "python-not-found",
      message: `Could not run the Python interpreter ${python}: ${result.error.message}. Set shoptalk.pythonPath to an existing interpreter.`,
    };
  }
  if (result.code !== 0) {
    return {
      kind: "probe-failed",
      message: `${python} failed (exit code ${String(result.code)}): ${result.stderr.trim().split("\n").slice(-3).join(" ")}`,
    };
  }
  let answer: { shoptalk: boolean; missing: string[] };
  try {
    answer = JSON.parse(result.stdout) as { shoptalk: boolean; missing: string[] };
  } catch {
    return { kind: "probe-failed", message: `Unexpected output from ${python}: ${result.stdout.slice(0, 200)}` };
  }
  if (!answer.shoptalk) {
    return {
      kind: "shoptalk-missing",
      message: `shoptalk is not installed for ${python}.`,
      installCommand: installCommand(python),
    };
  }
  if (answer.missing.length > 0) {
    return {
      kind: "serve-extra-missing",
      message: `shoptalk's serve extra is incomplete for ${python} (missing ${answer.missing.join(", ")}).`,
      installCommand: installCommand(python),
    };
  }
  return undefined;
}

/** The last `count` lines of a log, for error messages. */
export class LogTail {
  private lines: string[] = [];
  private partial = "";

  constructor(private readonly count: number) {}

  push(chunk: string): void {
    const parts = (this.partial + chunk).split("\n");
    this.partial = parts.pop() ?? "";
    this.lines.push(...parts.filter((line) => line.trim() !== ""));
    if (this.lines.length > this.count) {
      this.lines = this.lines.slice(-this.count);
    }
  }

  text(): string {
    const all = this.partial.trim() !== "" ? [...this.lines, this.partial] : this.lines;
    return all.slice(-this.count).join("\n");
  }

  clear(): void {
    this.lines = [];
    this.partial = "";
  }
}

/**
 * The ShopTalk extension: starts `shoptalk serve --stdio` through
 * vscode-languageclient (inline completions come from the server's
 * textDocument/inlineCompletion), sends changed settings as
 * workspace/didChangeConfiguration (restarting only when the interpreter,
 * the command or the languages change), and adds "Find module…", the
 * on/off, snooze and per-language switches (status bar menu and commands),
 * the status bar item and clear errors when Python, the package or the
 * server is not right.
 */
import { spawn, type ChildProcess } from "node:child_process";
import * as vscode from "vscode";
import {
  CloseAction,
  DidChangeConfigurationNotification,
  ErrorAction,
  LanguageClient,
  State,
  type LanguageClientOptions,
  type ServerOptions,
} from "vscode-languageclient/node";

import { mayRequest, offReason, SNOOZE_CHOICES, toggled, type Exclusion, type Off } from "./controls";

import {
  checkInterpreter,
  isProblem,
  LogTail,
  resolveInterpreter,
  run,
  serverCommand,
  type Interpreter,
  type LaunchProblem,
} from "./launcher";
import { parseModules, parseVerdict, toPicks, type ModulePick, type Verdict } from "./modules";
import { initializationOptions, readSettings, debounce, settingsChange, type ShopTalkSettings } from "./settings";
import { describeStatus, type ServerStatus } from "./status";

const SECTION = "shoptalk";
const STATUS_POLL_MS = 5000;
const SNOOZE_KEY = "shoptalk.snoozedUntil";

let client: LanguageClient | undefined;
let interpreter: Interpreter | undefined;
let settings: ShopTalkSettings | undefined;
let output: vscode.LogOutputChannel;
let statusItem: vscode.StatusBarItem;
let statusTimer: NodeJS.Timeout | undefined;
let lastStatus: ServerStatus | undefined;
let stopping = false;
const logTail = new LogTail(12);
let snoozeState: vscode.Memento | undefined;
/** The server's `shoptalk/exclusion` answers, by document URI. */
const exclusions = new Map<string, Exclusion>();

/** The API of the Python extension that gives the active interpreter. */
interface PythonExtensionApi {
  environments?: {
    getActiveEnvironmentPath(resource?: vscode.Uri): { path: string };
    resolveEnvironment(path: { path: string } | string): Promise<{ executable: { uri?: vscode.Uri } } | undefined>;
  };
}

async function pythonFromExtension(): Promise<string | undefined> {
  const extension = vscode.extensions.getExtension<PythonExtensionApi>("ms-python.python");
  if (extension === undefined) {
    return undefined;
  }
  try {
    const api = extension.isActive ? extension.exports : await extension.activate();
    const environments = api.environments;
    if (environments === undefined) {
      return undefined;
    }
    const resource = vscode.workspace.workspaceFolders?.[0]?.uri;
    const active = environments.getActiveEnvironmentPath(resource);
    const resolved = await environments.resolveEnvironment(active);
    return resolved?.executable.uri?.fsPath;
  } catch (error) {
    output.appendLine(`the Python extension did not give an interpreter: ${String(error)}`);
    return undefined;
  }
}

function workspaceRoot(): string | undefined {
  return vscode.workspace.workspaceFolders?.[0]?.uri.fsPath;
}

function readCurrentSettings(): ShopTalkSettings {
  const configuration = vscode.workspace.getConfiguration(SECTION);
  const { settings: read, problems } = readSettings((key) => configuration.get(key));
  if (problems.length > 0) {
    void vscode.window.showWarningMessage(`ShopTalk settings: ${problems.join("; ")}`, "Open Settings").then((choice) => {
      if (choice === "Open Settings") {
        void vscode.commands.executeCommand("workbench.action.openSettings", SECTION);
      }
    });
  }
  return read;
}

async function reportLaunchProblem(problem: LaunchProblem): Promise<void> {
  output.appendLine(problem.message);
  setStatusText("$(error) ShopTalk", problem.message);
  if (problem.kind === "shoptalk-missing" || problem.kind === "serve-extra-missing") {
    const choice = await vscode.window.showErrorMessage(
      `${problem.message} Install it with: ${problem.installCommand}`,
      "Install in Terminal",
      "Copy Command",
      "Choose Interpreter",
    );
    if (choice === "Install in Terminal") {
      const terminal = vscode.window.createTerminal("ShopTalk install");
      terminal.show();
      terminal.sendText(problem.installCommand);
    } else if (choice === "Copy Command") {
      await vscode.env.clipboard.writeText(problem.installCommand);
    } else if (choice === "Choose Interpreter") {
      await vscode.commands.executeCommand("workbench.action.openSettings", `${SECTION}.pythonPath`);
    }
    return;
  }
  const choice = await vscode.window.showErrorMessage(problem.message, "Open Settings");
  if (choice === "Open Settings") {
    await vscode.commands.executeCommand("workbench.action.openSettings", `${SECTION}.pythonPath`);
  }
}

async function reportCrash(): Promise<void> {
  const tail = logTail.text();
  output.appendLine("the ShopTalk server stopped unexpectedly");
  setStatusText("$(error) ShopTalk: stopped", tail || "the server stopped");
  const choice = await vscode.window.showErrorMessage(
    `The ShopTalk server stopped.${tail ? ` Last log lines:\n${tail}` : ""}`,
    "Restart",
    "Show Log",
  );
  if (choice === "Restart") {
    await restartClient();
  } else if (choice === "Show Log") {
    output.show();
  }
}

function setStatusText(text: string, tooltip: string): void {
  statusItem.text = text;
  statusItem.tooltip = tooltip;
  statusItem.show();
}

async function refreshStatus(): Promise<ServerStatus | undefined> {
  if (client === undefined || client.state !== State.Running) {
    return undefined;
  }
  try {
    const status = await client.sendRequest<ServerStatus>("shoptalk/status", {});
    lastStatus = status;
    const view = describeStatus(status, await activeOff());
    setStatusText(view.text, view.details.join("\n"));
    return status;
  } catch (error) {
    output.appendLine(`shoptalk/status failed: ${String(error)}`);
    return undefined;
  }
}

function spawnServer(command: string, args: string[], cwd: string | undefined): ServerOptions {
  return (): Promise<ChildProcess> => {
    logTail.clear();
    output.appendLine(`starting: ${command} ${args.join(" ")}`);
    const child = spawn(command, args, { cwd, stdio: ["pipe", "pipe", "pipe"], env: process.env });
    child.stderr.on("data", (chunk: Buffer) => {
      const text = chunk.toString();
      logTail.push(text);
      output.append(text);
    });
    return Promise.resolve(child);
  };
}

async function startClient(): Promise<void> {
  settings = readCurrentSettings();
  interpreter = undefined;
  exclusions.clear(); // asked again: the new server may read other rules
  if (settings.serverCommand.length === 0) {
    const resolved = resolveInterpreter(settings, await pythonFromExtension(), process.env);
    if (isProblem(resolved)) {
      await reportLaunchProblem(resolved);
      return;
    }
    const problem = await checkInterpreter(resolved.path);
    if (problem !== undefined) {
      await reportLaunchProblem(problem);
      return;
    }
    interpreter = resolved;
    output.appendLine(`Python: ${resolved.path} (${resolved.source})`);
  }
  const { command, args } = serverCommand(settings, interpreter);
  const clientOptions: LanguageClientOptions = {
    documentSelector: settings.languages.map((language) => ({ scheme: "file", language })),
    initializationOptions: initializationOptions(settings),
    outputChannel: output,
    middleware: {
      // The switches and the file's exclusion decide before anything is asked.
      provideInlineCompletionItems: async (document, position, context, token, next) => {
        const explicit = context.triggerKind === vscode.InlineCompletionTriggerKind.Invoke;
        if (!mayRequest(await offFor(document), explicit)) {
          return undefined;
        }
        return next(document, position, context, token);
      },
    },
    errorHandler: {
      error: () => ({ action: ErrorAction.Continue }),
      closed: () => {
        if (!stopping) {
          void reportCrash();
        }
        return { action: CloseAction.DoNotRestart, handled: true };
      },
    },
  };
  client = new LanguageClient("shoptalk", "ShopTalk", spawnServer(command, args, workspaceRoot()), clientOptions);
  // textDocument/inlineCompletion is among the client's "proposed" features (LSP 3.18).
  client.registerProposedFeatures();
  setStatusText("$(loading~spin) ShopTalk: starting", "starting the language server");
  try {
    await client.start();
  } catch (error) {
    output.appendLine(`the server did not start: ${String(error)}`);
    await reportCrash();
    return;
  }
  await refreshStatus();
}

async function stopClient(): Promise<void> {
  const running = client;
  client = undefined;
  if (running === undefined) {
    return;
  }
  stopping = true;
  try {
    await running.stop(5000);
  } catch (error) {
    output.appendLine(`stopping the server: ${String(error)}`);
  } finally {
    stopping = false;
  }
}

async function restartClient(): Promise<void> {
  await stopClient();
  await startClient();
}

async function findModule(): Promise<void> {
  if (client === undefined || client.state !== State.Running) {
    void vscode.window.showWarningMessage("The ShopTalk server is not running; run “ShopTalk: Restart Server”.");
    return;
  }
  const query = await vscode.window.showInputBox({
    title: "ShopTalk: Find module",
    prompt: "What does the module do?",
    placeHolder: "e.g. send invoices to customers",
  });
  if (query === undefined || query.trim() === "") {
    return;
  }
  let picks: ModulePick[];
  let verdict: Verdict;
  try {
    const answer = await vscode.window.withProgress(
      { location: vscode.ProgressLocation.Window, title: "ShopTalk: finding modules" },
      () => (client as LanguageClient).sendRequest("shoptalk/findModule", { query, limit: 20 }),
    );
    picks = toPicks(parseModules(answer));
    verdict = parseVerdict(answer);
  } catch (error) {
    void vscode.window.showErrorMessage(`ShopTalk: module lookup failed: ${error instanceof Error ? error.message : String(error)}`);
    return;
  }
  if (picks.length === 0) {
    void vscode.window.showInformationMessage(`ShopTalk: no module matches “${query}”.`);
    return;
  }
  const choice = await vscode.window.showQuickPick(picks, {
    title: verdict.abstained
      ? `ShopTalk: ${verdict.message || `no module clearly does “${query}”`}`
      : `Modules for “${query}”${verdict.confidence ? ` (${verdict.confidence} confidence)` : ""}`,
    matchOnDescription: true,
    matchOnDetail: true,
  });
  if (choice === undefined) {
    return;
  }
  const { start } = choice.hit.range;
  const position = new vscode.Position(start.line, start.character);
  await vscode.window.showTextDocument(vscode.Uri.parse(choice.hit.uri), {
    selection: new vscode.Range(position, position),
  });
}

async function runCli(args: string[], title: string): Promise<void> {
  if (interpreter === undefined) {
    void vscode.window.showWarningMessage(`ShopTalk: ${title} needs the Python interpreter (shoptalk.pythonPath).`);
    return;
  }
  const result = await run(interpreter.path, ["-m", "shoptalk.models.cli", ...args], 120000);
  output.append(result.stdout + result.stderr);
  const last = (result.stderr.trim() || result.stdout.trim()).split("\n").slice(-1)[0] ?? "";
  if (result.code === 0) {
    void vscode.window.showInformationMessage(`ShopTalk: ${title}: ${last}`);
  } else {
    void vscode.window.showErrorMessage(`ShopTalk: ${title} failed: ${last}`);
  }
}

/** The snooze's end (epoch ms), if one is running. */
function snoozedUntil(): number | undefined {
  const until = snoozeState?.get<number>(SNOOZE_KEY);
  return until !== undefined && until > Date.now() ? until : undefined;
}

/** The server's exclusion of a document, asked once per document. */
async function exclusionOf(document: vscode.TextDocument): Promise<Exclusion | undefined> {
  const uri = document.uri.toString();
  const known = exclusions.get(uri);
  if (known !== undefined || client === undefined || client.state !== State.Running) {
    return known;
  }
  try {
    const answer = await client.sendRequest<Exclusion>("shoptalk/exclusion", { textDocument: { uri } });
    exclusions.set(uri, answer);
    return answer;
  } catch (error) {
    output.appendLine(`shoptalk/exclusion failed: ${String(error)}`);
    return undefined;
  }
}

/** Why a document (none: no editor) gets no suggestions — switches, snooze, language, exclusion — if it does not. */
async function offFor(document: vscode.TextDocument | undefined): Promise<Off | undefined> {
  const current = settings ?? readCurrentSettings();
  const controls = { enabled: current.enable, snoozedUntil: snoozedUntil(), disabledLanguages: current.disabledLanguages };
  const handled = document !== undefined && document.uri.scheme === "file" && current.languages.includes(document.languageId);
  const exclusion = handled ? await exclusionOf(document) : undefined;
  return offReason(controls, document?.languageId, exclusion, Date.now());
}

async function activeOff(): Promise<Off | undefined> {
  return offFor(vscode.window.activeTextEditor?.document);
}

function switchActions(language: string | undefined): { label: string; action: string }[] {
  const current = settings ?? readCurrentSettings();
  const snoozed = snoozedUntil() !== undefined;
  const actions = [
    { label: current.enable ? "$(circle-slash) Turn suggestions off" : "$(check) Turn suggestions on", action: "toggle" },
    { label: snoozed ? "$(play) Resume suggestions (end the snooze)" : "$(clock) Snooze suggestions…", action: "snooze" },
  ];
  if (language !== undefined) {
    const off = current.disabledLanguages.includes(language);
    actions.push({ label: off ? `$(check) Turn suggestions on for ${language}` : `$(circle-slash) Turn suggestions off for ${language}`, action: "language" });
  }
  return actions;
}

async function toggleSuggestions(): Promise<void> {
  const current = settings ?? readCurrentSettings();
  await vscode.workspace.getConfiguration(SECTION).update("enable", !current.enable, vscode.ConfigurationTarget.Global);
}

async function snooze(): Promise<void> {
  if (snoozedUntil() !== undefined) {
    await snoozeState?.update(SNOOZE_KEY, undefined);
  } else {
    const choice = await vscode.window.showQuickPick(
      SNOOZE_CHOICES.map((c) => ({ label: c.label, minutes: c.minutes })),
      { title: "ShopTalk: snooze suggestions for" },
    );
    if (choice === undefined) {
      return;
    }
    await snoozeState?.update(SNOOZE_KEY, Date.now() + choice.minutes * 60000);
  }
  await refreshStatus();
}

async function toggleLanguage(): Promise<void> {
  const language = vscode.window.activeTextEditor?.document.languageId;
  if (language === undefined) {
    void vscode.window.showInformationMessage("ShopTalk: open a file to turn suggestions off or on for its language.");
    return;
  }
  const current = settings ?? readCurrentSettings();
  await vscode.workspace
    .getConfiguration(SECTION)
    .update("disabledLanguages", toggled(current.disabledLanguages, language), vscode.ConfigurationTarget.Global);
}

/**
 * A settings change: the server's settings go over
 * workspace/didChangeConfiguration (the loaded model stays); only a new
 * interpreter, command or language list restarts it.
 */
function applySettings(restartSoon: () => void): void {
  const before = settings;
  const after = readCurrentSettings();
  const change = before === undefined ? "restart" : settingsChange(before, after);
  settings = after;
  output.appendLine(`settings changed: ${change === "restart" ? "restarting the server" : change === "configure" ? "sent to the server" : "switches only"}`);
  if (change === "restart") {
    restartSoon();
    return;
  }
  if (change === "configure" && client !== undefined && client.state === State.Running) {
    void client.sendNotification(DidChangeConfigurationNotification.type, { settings: initializationOptions(after) });
  }
  void refreshStatus();
}

async function showStatus(): Promise<void> {
  const status = (await refreshStatus()) ?? lastStatus;
  const off = await activeOff();
  const view = status ? describeStatus(status, off) : undefined;
  const personal = settings?.personal.enabled === true;
  const language = vscode.window.activeTextEditor?.document.languageId;
  const actions = [
    ...switchActions(language),
    { label: "$(debug-restart) Restart server", action: "restart" },
    { label: "$(sync) Retrain now", action: "retrain" },
    { label: "$(history) Roll back to the previous model", action: "rollback" },
    { label: personal ? "$(person) Turn personalization off" : "$(person) Turn personalization on", action: "personal" },
    { label: "$(output) Show log", action: "log" },
  ];
  const rows: (vscode.QuickPickItem & { action?: string })[] = [
    ...(view?.details ?? ["The server is not running."]).map((line) => ({ label: line })),
    { label: "", kind: vscode.QuickPickItemKind.Separator },
    ...actions,
  ];
  const choice = await vscode.window.showQuickPick(rows, { title: "ShopTalk" });
  const root = workspaceRoot();
  switch (choice?.action) {
    case "toggle":
      await toggleSuggestions();
      break;
    case "snooze":
      await snooze();
      break;
    case "language":
      await toggleLanguage();
      break;
    case "restart":
      await restartClient();
      break;
    case "retrain":
      if (root !== undefined && interpreter !== undefined) {
        const terminal = vscode.window.createTerminal({ name: "ShopTalk retrain", cwd: root });
        terminal.show();
        terminal.sendText(`"${interpreter.path}" -m shoptalk.models.cli retrain --repo "${root}"`);
      }
      break;
    case "rollback":
      if (root !== undefined) {
        await runCli(["models", "rollback", "--repo", root], "roll back");
      }
      break;
    case "personal":
      await vscode.workspace
        .getConfiguration(SECTION)
        .update("personal.enabled", !personal, vscode.ConfigurationTarget.Global);
      break;
    case "log":
      output.show();
      break;
    default:
      break;
  }
}

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  snoozeState = context.globalState;
  output = vscode.window.createOutputChannel("ShopTalk", { log: true });
  statusItem = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  statusItem.command = "shoptalk.showStatus";
  statusItem.name = "ShopTalk";
  const restartSoon = debounce(() => {
    void restartClient();
  }, 750);
  context.subscriptions.push(
    output,
    statusItem,
    {
      dispose: () => {
        restartSoon.cancel();
      },
    },
    vscode.commands.registerCommand("shoptalk.restartServer", restartClient),
    // Not "shoptalk.findModule": the language client registers the server's
    // workspace/executeCommand of that name.
    vscode.commands.registerCommand("shoptalk.findModuleAndOpen", findModule),
    vscode.commands.registerCommand("shoptalk.showStatus", showStatus),
    vscode.commands.registerCommand("shoptalk.showLog", () => {
      output.show();
    }),
    vscode.commands.registerCommand("shoptalk.toggle", toggleSuggestions),
    vscode.commands.registerCommand("shoptalk.snooze", snooze),
    vscode.commands.registerCommand("shoptalk.toggleLanguage", toggleLanguage),
    vscode.workspace.onDidChangeConfiguration((event) => {
      if (event.affectsConfiguration(SECTION)) {
        applySettings(restartSoon);
      }
    }),
    vscode.window.onDidChangeActiveTextEditor(() => {
      void refreshStatus();
    }),
    vscode.workspace.onDidCloseTextDocument((document) => {
      exclusions.delete(document.uri.toString());
    }),
  );
  // Tell the server where the cursor rests (shoptalk/prefill) so it evaluates
  // the prompt before the first keystroke there.
  let prefillTarget: vscode.TextEditor | undefined;
  const prefillSoon = debounce(() => {
    const editor = prefillTarget;
    if (editor === undefined || client?.state !== State.Running || settings === undefined) {
      return;
    }
    if (editor.document.uri.scheme !== "file" || !settings.languages.includes(editor.document.languageId)) {
      return;
    }
    const position = editor.selection.active;
    void client.sendNotification("shoptalk/prefill", {
      textDocument: { uri: editor.document.uri.toString() },
      position: { line: position.line, character: position.character },
    });
  }, 250);
  context.subscriptions.push(
    vscode.window.onDidChangeTextEditorSelection((event) => {
      prefillTarget = event.textEditor;
      prefillSoon();
    }),
    {
      dispose: () => {
        prefillSoon.cancel();
      },
    },
  );
  statusTimer = setInterval(() => {
    void refreshStatus();
  }, STATUS_POLL_MS);
  context.subscriptions.push({
    dispose: () => {
      clearInterval(statusTimer);
    },
  });
  await startClient();
}

export async function deactivate(): Promise<void> {
  await stopClient();
}

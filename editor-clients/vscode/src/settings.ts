/**
 * The extension's settings: read from the `shoptalk.*` configuration that
 * package.json's `contributes.configuration` declares (the single schema),
 * checked, and turned into the server's initializationOptions (the
 * `[serve]` keys plus `personal`, see docs/architecture.md).
 *
 * Pure: no `vscode` import, so the unit tests run in plain node.
 */

export type Backend = "llama" | "openai";
export type Multiline = "auto" | "always" | "never";

export interface ShopTalkSettings {
  /** Suggestions on (the status-bar menu and "ShopTalk: Toggle Suggestions" flip it). */
  enable: boolean;
  /** Languages with suggestions off ("ShopTalk: Toggle Suggestions for This Language"). */
  disabledLanguages: string[];
  /** Interpreter with `shoptalk[serve]`; empty: the Python extension's, then python3. */
  pythonPath: string;
  /** Full server command; overrides pythonPath when not empty. */
  serverCommand: string[];
  languages: string[];
  backend: Backend;
  openaiUrl: string;
  openaiModel: string;
  maxLatencyMs: number;
  maxTokens: number;
  multiline: Multiline;
  watch: boolean;
  personal: { enabled: boolean; identity: string[] };
}

export const DEFAULTS: ShopTalkSettings = {
  enable: true,
  disabledLanguages: [],
  pythonPath: "",
  serverCommand: [],
  languages: [
    "python",
    "javascript",
    "javascriptreact",
    "typescript",
    "typescriptreact",
    "go",
    "java",
    "rust",
    "c",
    "cpp",
    "ruby",
    "shellscript",
    "lua",
  ],
  backend: "llama",
  openaiUrl: "",
  openaiModel: "",
  maxLatencyMs: 0, // 0: "auto", the server measures the machine's decoding speed
  maxTokens: 48,
  multiline: "auto",
  watch: false,
  personal: { enabled: false, identity: [] },
};

/** Reads one `shoptalk.<key>` value (undefined when unset). */
export type SettingReader = (key: string) => unknown;

export interface ReadResult {
  settings: ShopTalkSettings;
  /** One message per invalid value; each fell back to its default. */
  problems: string[];
}

function isStringList(value: unknown): value is string[] {
  return Array.isArray(value) && value.every((item) => typeof item === "string");
}

/**
 * Read and check every setting. An invalid value falls back to its default
 * and is reported, so a typo never leaves the user without completions.
 */
export function readSettings(read: SettingReader): ReadResult {
  const problems: string[] = [];
  function pick<T>(key: string, fallback: T, valid: (value: unknown) => value is T, expected: string): T {
    const value = read(key);
    if (value === undefined || value === null) {
      return fallback;
    }
    if (!valid(value)) {
      problems.push(`shoptalk.${key}: expected ${expected}, got ${JSON.stringify(value)}`);
      return fallback;
    }
    return value;
  }
  const isString = (value: unknown): value is string => typeof value === "string";
  const isBool = (value: unknown): value is boolean => typeof value === "boolean";
  const positiveInt = (value: unknown): value is number =>
    typeof value === "number" && Number.isInteger(value) && value > 0;
  const wholeNumber = (value: unknown): value is number =>
    typeof value === "number" && Number.isInteger(value) && value >= 0;
  const oneOf =
    <T extends string>(options: readonly T[]) =>
    (value: unknown): value is T =>
      typeof value === "string" && (options as readonly string[]).includes(value);

  const settings: ShopTalkSettings = {
    enable: pick("enable", DEFAULTS.enable, isBool, "true or false"),
    disabledLanguages: pick("disabledLanguages", DEFAULTS.disabledLanguages, isStringList, "a list of language ids"),
    pythonPath: pick("pythonPath", DEFAULTS.pythonPath, isString, "a path").trim(),
    serverCommand: pick("serverCommand", DEFAULTS.serverCommand, isStringList, "a list of strings"),
    languages: pick("languages", DEFAULTS.languages, isStringList, "a list of language ids"),
    backend: pick("backend", DEFAULTS.backend, oneOf(["llama", "openai"] as const), '"llama" or "openai"'),
    openaiUrl: pick("openaiUrl", DEFAULTS.openaiUrl, isString, "a URL").trim(),
    openaiModel: pick("openaiModel", DEFAULTS.openaiModel, isString, "a model name").trim(),
    maxLatencyMs: pick(
      "maxLatencyMs",
      DEFAULTS.maxLatencyMs,
      wholeNumber,
      "a whole number of milliseconds (0 = measured on this machine)",
    ),
    maxTokens: pick("maxTokens", DEFAULTS.maxTokens, positiveInt, "a whole number > 0"),
    multiline: pick(
      "multiline",
      DEFAULTS.multiline,
      oneOf(["auto", "always", "never"] as const),
      '"auto", "always" or "never"',
    ),
    watch: pick("watch", DEFAULTS.watch, isBool, "true or false"),
    personal: {
      enabled: pick("personal.enabled", DEFAULTS.personal.enabled, isBool, "true or false"),
      identity: pick("personal.identity", DEFAULTS.personal.identity, isStringList, "a list of emails or names"),
    },
  };
  if (settings.backend === "openai" && settings.openaiUrl === "") {
    problems.push('shoptalk.backend is "openai" but shoptalk.openaiUrl is empty; set the completion server\'s URL');
  }
  if (settings.personal.enabled && settings.personal.identity.length === 0) {
    problems.push(
      "shoptalk.personal.enabled is on but shoptalk.personal.identity is empty; add the emails or names you commit with",
    );
  }
  return { settings, problems };
}

/** The server's initializationOptions (and didChangeConfiguration settings). */
export function initializationOptions(settings: ShopTalkSettings): Record<string, unknown> {
  const options: Record<string, unknown> = {
    backend: settings.backend,
    max_latency_ms: settings.maxLatencyMs > 0 ? settings.maxLatencyMs : "auto",
    max_tokens: settings.maxTokens,
    multiline: settings.multiline,
    watch: settings.watch,
    personal: { enabled: settings.personal.enabled, identity: [...settings.personal.identity] },
  };
  if (settings.openaiUrl !== "") {
    options.openai_url = settings.openaiUrl;
  }
  if (settings.openaiModel !== "") {
    options.openai_model = settings.openaiModel;
  }
  return options;
}

/**
 * What a settings change asks of the running server: `restart` when the
 * process itself changes (interpreter, command, the languages it is attached
 * to), `configure` when only what it reads changes (sent as
 * workspace/didChangeConfiguration: the loaded model stays), `none` when
 * only the extension's own switches changed (on/off, languages off).
 */
export type SettingsChange = "restart" | "configure" | "none";

export function settingsChange(before: ShopTalkSettings, after: ShopTalkSettings): SettingsChange {
  const process = (s: ShopTalkSettings): string => JSON.stringify([s.pythonPath, s.serverCommand, s.languages]);
  if (process(before) !== process(after)) {
    return "restart";
  }
  if (JSON.stringify(initializationOptions(before)) !== JSON.stringify(initializationOptions(after))) {
    return "configure";
  }
  return "none";
}

/** Whether two settings differ in anything that needs the server restarted. */
export function needsRestart(before: ShopTalkSettings, after: ShopTalkSettings): boolean {
  return settingsChange(before, after) === "restart";
}

/**
 * Calls `action` once, `delayMs` after the last of a burst of calls (typing
 * in the settings editor fires one change per keystroke).
 */
export function debounce(action: () => void, delayMs: number): { (): void; cancel(): void } {
  let timer: NodeJS.Timeout | undefined;
  const debounced = (): void => {
    if (timer !== undefined) {
      clearTimeout(timer);
    }
    timer = setTimeout(() => {
      timer = undefined;
      action();
    }, delayMs);
  };
  debounced.cancel = (): void => {
    if (timer !== undefined) {
      clearTimeout(timer);
      timer = undefined;
    }
  };
  return debounced;
}

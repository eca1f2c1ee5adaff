// Test harness: the real `drover server` and `drover agent` as child processes on a temporary
// data directory, headless Debian Chromium driven by playwright-core, and a clean-up that kills
// whatever the agent started even when a test failed.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
export const repo = path.resolve(here, '../..');
export const screenshotDir = path.join(repo, 'target/browser-screenshots');
export const logDir = path.join(repo, 'target/browser-test-logs');

export const ADMIN_ACCESS = 'UITESTADMINACCESS001';
export const ADMIN_SECRET = 'ui-test-admin-secret-0123456789abcdefgh';

const BIN = process.env.DROVER_BIN || path.join(repo, 'target/debug/drover');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

/** Flags for Chromium on a machine with a closed network (see the machine notes). */
const CHROMIUM_ARGS = [
  '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--disable-dev-shm-usage',
];

function basic() {
  return `Basic ${Buffer.from(`${ADMIN_ACCESS}:${ADMIN_SECRET}`).toString('base64')}`;
}

/** Waits for a line matching `pattern` on a child's stream, or fails after `ms`. */
function waitForLine(child, stream, pattern, ms, what) {
  return new Promise((resolve, reject) => {
    let seen = '';
    const timer = setTimeout(() => {
      cleanup();
      reject(new Error(`timed out after ${ms} ms waiting for ${what}; output so far:\n${seen}`));
    }, ms);
    const onData = (chunk) => {
      seen += chunk.toString();
      const match = seen.match(pattern);
      if (match) {
        cleanup();
        resolve(match);
      }
    };
    const onExit = (code) => {
      cleanup();
      reject(new Error(`${what}: the process exited with ${code} first; output:\n${seen}`));
    };
    const cleanup = () => {
      clearTimeout(timer);
      stream.off('data', onData);
      child.off('exit', onExit);
    };
    stream.on('data', onData);
    child.on('exit', onExit);
  });
}

export class Harness {
  /** `name` prefixes the log files, so each test file keeps its own. */
  constructor(name = '') {
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'drover-ui-'));
    this.children = [];
    this.prefix = name ? `${name}-` : '';
  }

  /** `drover server` on 127.0.0.1 with a free port (port 0; the address is read from its log). */
  async startServer(settings = {}) {
    if (!fs.existsSync(BIN)) throw new Error(`no drover binary at ${BIN}: run cargo build -p drover`);
    fs.mkdirSync(logDir, { recursive: true });
    const log = fs.createWriteStream(path.join(logDir, `${this.prefix}server.log`));
    const env = { ...process.env, DROVER_LOG: process.env.DROVER_LOG || 'info', ...settings };
    for (const name of ['DROVER_DATABASE_URL', 'DROVER_LISTEN', 'DROVER_DATA_DIR', 'DROVER_PUBLIC_URL']) delete env[name];
    const server = spawn(BIN, [
      'server', '--listen', '127.0.0.1:0', '--data-dir', path.join(this.dir, 'server'),
      '--admin-access-key', ADMIN_ACCESS, '--admin-secret-key', ADMIN_SECRET,
    ], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    this.children.push(server);
    this.server = server;
    server.stdout.pipe(log);
    server.stderr.pipe(log);
    const match = await waitForLine(server, server.stderr, /drover listening on (http:\/\/[0-9.:]+)\/v1/, 60000, 'the server to listen');
    this.url = match[1];
    return this.url;
  }

  /** A REST call with the admin key, or `key` ({access, secret}) (test setup only; the UI is what is under test). */
  async api(method, apiPath, body, key) {
    const response = await this.raw(method, apiPath, body, key);
    const json = await response.json();
    if (!response.ok) throw new Error(`${method} ${apiPath}: ${response.status} ${JSON.stringify(json)}`);
    return json;
  }

  /** The same call, answering the fetch Response whatever its status. */
  raw(method, apiPath, body, key) {
    const auth = key ? `Basic ${Buffer.from(`${key.access}:${key.secret}`).toString('base64')}` : basic();
    return fetch(`${this.url}/v1/${apiPath}`, {
      method,
      headers: { Authorization: auth, 'Content-Type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  }

  /** `drover agent`, registered with a registration token as on a real host. */
  async startAgent() {
    const token = (await this.api('POST', 'registrationtokens', {})).token;
    const log = fs.createWriteStream(path.join(logDir, `${this.prefix}agent.log`));
    const env = { ...process.env, DROVER_LOG: process.env.DROVER_LOG || 'info' };
    for (const name of ['CATTLE_URL', 'CATTLE_ACCESS_KEY', 'CATTLE_SECRET_KEY', 'DROVER_AGENT_FAULT']) delete env[name];
    this.agentDir = path.join(this.dir, 'agent');
    const agent = spawn(BIN, [
      'agent', '--url', this.url, '--registration-token', token, '--state-dir', this.agentDir,
    ], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    this.children.push(agent);
    this.agent = agent;
    agent.stdout.pipe(log);
    agent.stderr.pipe(log);
    return agent;
  }

  /** Stops the agent process (SIGSTOP): a slow agent, so a process stays Running. */
  freezeAgent() {
    this.agent.kill('SIGSTOP');
    this.frozen = true;
  }

  thawAgent() {
    if (this.agent && this.frozen) this.agent.kill('SIGCONT');
    this.frozen = false;
  }

  async launchBrowser() {
    this.browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
    return this.browser;
  }

  /** Kills what the agent started (each instance is its own process group), then the agent, the server and the browser. */
  async stop() {
    this.thawAgent();
    if (this.browser) await this.browser.close().catch(() => {});
    for (const child of this.children.reverse()) {
      if (child.exitCode !== null || child.signalCode !== null) continue;
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(timer);
    }
    // The instances last: with the server gone, nothing (a service's reconciler) starts them
    // again after they are killed.
    const instances = this.agentDir ? path.join(this.agentDir, 'instances') : null;
    if (instances && fs.existsSync(instances)) {
      for (const id of fs.readdirSync(instances)) {
        const dir = path.join(instances, id);
        if (fs.existsSync(path.join(dir, 'exit'))) continue;
        try {
          const { pid } = JSON.parse(fs.readFileSync(path.join(dir, 'pid'), 'utf8'));
          if (pid > 1) {
            try { process.kill(-pid, 'SIGKILL'); } catch { /* already gone */ }
            try { process.kill(pid, 'SIGKILL'); } catch { /* already gone */ }
          }
        } catch { /* never started */ }
      }
    }
    if (!process.env.KEEP_TEST_DIR) fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Logs `page` in through the form with a key (the admin key by default). */
export async function login(page, url, access = ADMIN_ACCESS, secret = ADMIN_SECRET) {
  await page.goto(`${url}/login`);
  await page.getByLabel('Access key', { exact: true }).fill(access);
  await page.getByLabel('Secret key', { exact: true }).fill(secret);
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.locator('.live[data-state="open"]').waitFor();
}

/** Saves a full-page screenshot into target/browser-screenshots and prints its path. */
export async function screenshot(page, name) {
  fs.mkdirSync(screenshotDir, { recursive: true });
  const file = path.join(screenshotDir, `${name}.png`);
  // Finite animations (a row's flash) are finished and infinite ones (the pulse) stopped.
  await page.screenshot({ path: file, fullPage: true, animations: 'disabled' });
  console.log(`screenshot: ${file}`);
  return file;
}

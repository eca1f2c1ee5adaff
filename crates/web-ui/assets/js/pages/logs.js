// A container's log, followed live: `POST <container>?action=logs` answers a WebSocket URL
// and a token; each text frame is "01 " + a stdout line or "02 " + a stderr line, and the
// server closes with 1000 "end of log" when there is no more. The DOM keeps the last
// MAX_LINES lines; the socket is closed when the page is left.

import { post } from '../api.js';
import { h, replace } from '../dom.js';

/** Lines kept on the page; older ones are dropped (and counted). */
export const MAX_LINES = 2000;
/** Lines asked for when the panel opens. */
const TAIL = 200;
/** States in which the log may still grow: the panel follows it. */
const RUNNING = new Set(['running', 'starting', 'restarting']);

export function logsPanel(id) {
  const view = h('div', { class: 'logview', role: 'log', 'aria-live': 'off', 'aria-label': `Log of ${id}`, tabindex: '0' });
  const status = h('span', { class: 'muted log-status', role: 'status' }, 'not started');
  const dropped = h('span', { class: 'muted log-dropped', hidden: true });
  const follow = h('input', { id: 'logs-follow', type: 'checkbox', checked: true });
  const clear = h('button', { type: 'button', class: 'small' }, 'Clear');
  const reconnect = h('button', { type: 'button', class: 'small', hidden: true }, 'Reconnect');
  const el = h('section', { class: 'card', 'aria-labelledby': 'logs-title', id: 'logs' },
    h('header', null,
      h('h2', { id: 'logs-title' }, 'Logs'),
      h('div', { class: 'toolbar' }, status, dropped,
        h('label', { class: 'check', for: 'logs-follow' }, follow, 'Scroll with the log'),
        reconnect, clear)),
    view);

  let socket = null;
  let stopped = false;
  let lines = 0;
  let droppedCount = 0;
  let containerState = null;
  let following = true;

  function setStatus(text, state) {
    status.textContent = text;
    status.dataset.state = state;
  }

  function add(stream, text) {
    const line = h('div', { class: `line ${stream}`, dataset: { stream } }, text);
    const atBottom = view.scrollTop + view.clientHeight >= view.scrollHeight - 4;
    view.appendChild(line);
    lines += 1;
    while (lines > MAX_LINES) {
      view.firstElementChild.remove();
      lines -= 1;
      droppedCount += 1;
    }
    if (droppedCount) {
      dropped.hidden = false;
      dropped.textContent = `${droppedCount} older line${droppedCount === 1 ? '' : 's'} dropped`;
    }
    if (follow.checked && atBottom) view.scrollTop = view.scrollHeight;
  }

  function onFrame(data) {
    if (typeof data !== 'string') return;
    // One frame may carry one line; tolerate a trailing newline.
    const text = data.endsWith('\n') ? data.slice(0, -1) : data;
    if (text.startsWith('02 ')) add('stderr', text.slice(3));
    else if (text.startsWith('01 ')) add('stdout', text.slice(3));
    else add('stdout', text);
  }

  /** Opens the log; `follow` keeps it open for what is written next (a running container). */
  async function start({ follow: keep = following } = {}) {
    if (stopped || socket) return;
    following = keep;
    reconnect.hidden = true;
    setStatus('connecting…', 'connecting');
    let answer;
    try {
      answer = await post(`containers/${encodeURIComponent(id)}?action=logs`, { follow: following, lines: TAIL });
    } catch (err) {
      if (stopped) return;
      setStatus(`no log: ${err.message}`, 'error');
      reconnect.hidden = false;
      return;
    }
    if (stopped) return;
    if (!answer || !answer.url || !answer.token) {
      setStatus('no log: the answer has no url and token', 'error');
      return;
    }
    let url = answer.url;
    // A URL made from another Host header than the page's would be refused by the page's CSP.
    try {
      const parsed = new URL(url, location.href);
      const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
      url = `${scheme}//${location.host}${parsed.pathname}`;
    } catch {
      /* keep it as given */
    }
    const ws = new WebSocket(`${url}?token=${encodeURIComponent(answer.token)}`);
    socket = ws;
    ws.addEventListener('open', () => {
      if (socket === ws) setStatus(following ? 'following' : 'reading', 'open');
    });
    ws.addEventListener('message', (message) => {
      if (socket === ws) onFrame(message.data);
    });
    ws.addEventListener('close', (event) => {
      if (socket !== ws) return;
      socket = null;
      if (stopped) return;
      if (event.code === 1000) setStatus(event.reason || 'end of log', 'ended');
      else setStatus(`disconnected${event.reason ? `: ${event.reason}` : ''}`, 'error');
      reconnect.hidden = false;
    });
  }

  clear.addEventListener('click', () => {
    replace(view);
    lines = 0;
    droppedCount = 0;
    dropped.hidden = true;
  });
  reconnect.addEventListener('click', () => {
    replace(view);
    lines = 0;
    start({ follow: RUNNING.has(containerState) });
  });

  return {
    el,
    start,
    /**
     * Called with the container's state. The first call opens the log, followed while the
     * container runs (a stopped one's log is read to its end); a later start offers to
     * follow it again.
     */
    setState(state) {
      const was = containerState;
      containerState = state;
      if (was === null) start({ follow: RUNNING.has(state) });
      else if (!RUNNING.has(was) && RUNNING.has(state) && !socket && !stopped) reconnect.hidden = false;
    },
    stop() {
      stopped = true;
      if (socket) {
        const ws = socket;
        socket = null;
        ws.close(1000, 'page left');
      }
    },
    /** Whether a socket is open now (for tests and the page). */
    get open() {
      return Boolean(socket);
    },
  };
}

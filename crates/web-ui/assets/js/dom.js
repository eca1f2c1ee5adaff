// Small DOM helpers: element builder, badges, ids, times, toasts. No framework.

/**
 * Builds an element: h('a', {href: '/x', class: 'id'}, 'text', child, [more]).
 * Props starting with "on" are listeners; `dataset`/`style` objects are merged; `false`,
 * `null` and `undefined` children are skipped.
 */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  if (props) {
    for (const [key, value] of Object.entries(props)) {
      if (value === undefined || value === null || value === false) continue;
      if (key.startsWith('on') && typeof value === 'function') {
        el.addEventListener(key.slice(2).toLowerCase(), value);
      } else if (key === 'dataset') {
        Object.assign(el.dataset, value);
      } else if (key === 'style') {
        // Through the CSSOM: the page's Content-Security-Policy refuses style attributes.
        el.style.cssText = value;
      } else if (key === 'class') {
        el.className = value;
      } else if (key === 'value' && 'value' in el) {
        el.value = value;
      } else if (key === 'checked' || key === 'disabled' || key === 'selected') {
        el[key] = Boolean(value);
        if (value) el.setAttribute(key, '');
      } else {
        el.setAttribute(key, value === true ? '' : String(value));
      }
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
}

/** Replaces an element's children. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

const GREEN = new Set(['running', 'active', 'success', 'done', 'open']);
const BLUE = new Set([
  'creating', 'starting', 'stopping', 'restarting', 'removing', 'purging', 'registering',
  'activating', 'deactivating', 'requested', 'calling',
]);
const AMBER = new Set(['delayed', 'reconnecting', 'ready', 'pending', 'waiting']);
const RED = new Set(['error', 'failure', 'failed', 'disconnected']);
const VIOLET = new Set(['canceled', 'cancelled']);

/** The colour of a state or result. */
export function tone(state) {
  const s = String(state || '').toLowerCase();
  if (GREEN.has(s)) return 'green';
  if (RED.has(s)) return 'red';
  if (BLUE.has(s) || s.startsWith('updating-')) return 'blue';
  if (AMBER.has(s)) return 'amber';
  if (VIOLET.has(s)) return 'violet';
  return 'gray';
}

/** A coloured state badge; `colour` overrides the state's own. */
export function badge(state, label, colour) {
  return h('span', { class: `badge ${colour || tone(state)}`, dataset: { state: String(state || '') } },
    label ?? (state || '—'));
}

/** A process's state: running is work in progress (blue), not a healthy resource (green). */
export function processBadge(process) {
  if (process.result) return badge(process.result.toLowerCase(), process.result);
  return badge(process.state, null, { running: 'blue', delayed: 'amber', ready: 'gray' }[process.state]);
}

/** A monospace id, linked when `href` is given. */
export function idTag(id, href) {
  if (!id) return h('span', { class: 'muted' }, '—');
  return href ? h('a', { class: 'id', href }, id) : h('span', { class: 'id' }, id);
}

/** Where the UI shows a resource of an API type: a detail page, or its row on a list. */
export function resourceHref(type, id) {
  if (!id) return null;
  const detail = { container: 'containers', instance: 'containers', service: 'services', stack: 'stacks' }[type];
  if (detail) return `/${detail}/${encodeURIComponent(id)}`;
  const page = { volume: 'volumes', host: 'hosts', agent: 'hosts' }[type];
  return page ? `/${page}#${id}` : null;
}

/** The Processes page filtered to one resource, by its typed id ("container:1i5"). */
export function processesHref(type, id) {
  return `/processes?tab=done&resource=${encodeURIComponent(`${type === 'instance' ? 'container' : type}:${id}`)}`;
}

/** The API type an id's prefix names ("1i5" → container), or null. */
export function typeOfId(id) {
  const match = /^1([a-z]+)\d+$/.exec(String(id || ''));
  if (!match) return null;
  return {
    i: 'container', h: 'host', ag: 'agent', v: 'volume', st: 'stack', s: 'service', eh: 'externalHandler',
  }[match[1]] || null;
}

/**
 * A value that may be long (a name, a command): one line cut with an ellipsis, the whole
 * value on hover. `tag`/`cls` style it; `href` makes it a link.
 */
export function ellipsis(text, { cls = '', href, tag } = {}) {
  const value = text === null || text === undefined ? '' : String(text);
  // The tooltip too is bounded: a 100 KB value would make a tooltip no screen can show.
  const title = value.length > 2000 ? `${value.slice(0, 2000)}…` : value;
  return h(href ? 'a' : tag || 'span', { class: `ellipsis${cls ? ` ${cls}` : ''}`, title, href }, value);
}

/**
 * Asks before something that cannot be undone: a modal dialog, answered true by its confirm
 * button and false by Cancel, Escape or a click outside.
 */
export function confirmDialog({ title, message, confirm = 'OK', danger = true }) {
  return new Promise((resolve) => {
    const ok = h('button', { type: 'button', class: danger ? 'primary danger-solid' : 'primary' }, confirm);
    const cancel = h('button', { type: 'button' }, 'Cancel');
    const titleId = `dialog-title-${Date.now()}`;
    const dialog = h('dialog', { class: 'dialog', 'aria-labelledby': titleId },
      h('h2', { id: titleId }, title),
      h('p', { class: 'dialog-msg' }, message),
      h('div', { class: 'dialog-actions' }, cancel, ok));
    let answered = false;
    const done = (answer) => {
      if (answered) return;
      answered = true;
      if (dialog.open) dialog.close();
      dialog.remove();
      resolve(answer);
    };
    ok.addEventListener('click', () => done(true));
    cancel.addEventListener('click', () => done(false));
    dialog.addEventListener('close', () => done(false));
    dialog.addEventListener('click', (event) => {
      if (event.target === dialog) done(false);
    });
    document.body.appendChild(dialog);
    dialog.showModal();
    cancel.focus();
  });
}

/** Epoch milliseconds of an API time (RFC 3339 text or a number). */
export function millis(value) {
  if (value === null || value === undefined || value === '') return null;
  if (typeof value === 'number') return value;
  const t = Date.parse(value);
  return Number.isNaN(t) ? null : t;
}

const UNITS = [
  ['d', 86400000], ['h', 3600000], ['min', 60000], ['s', 1000],
];

/** "12 s ago", "in 3 min", "just now". */
export function relative(ms, now = Date.now()) {
  const diff = ms - now;
  const abs = Math.abs(diff);
  if (abs < 1000) return diff < 0 || abs < 500 ? 'just now' : 'in 1 s';
  for (const [unit, size] of UNITS) {
    if (abs >= size || unit === 's') {
      const n = Math.floor(abs / size);
      const text = `${n} ${unit}`;
      return diff < 0 ? `${text} ago` : `in ${text}`;
    }
  }
  return '';
}

/** Absolute local time with the date, for tooltips. */
export function absolute(ms) {
  const d = new Date(ms);
  const pad = (n, w = 2) => String(n).padStart(w, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** A <time> showing a relative time, the absolute one on hover; kept fresh by tickTimes. */
export function timeEl(value) {
  const ms = millis(value);
  if (ms === null) return h('span', { class: 'muted' }, '—');
  return h('time', {
    datetime: new Date(ms).toISOString(), title: absolute(ms), dataset: { ts: String(ms) },
  }, relative(ms));
}

/** Rewrites every relative time on the page (a render clock: no request is made). */
export function tickTimes(root = document) {
  const now = Date.now();
  for (const el of root.querySelectorAll('time[data-ts]')) {
    const text = relative(Number(el.dataset.ts), now);
    if (el.textContent !== text) el.textContent = text;
  }
}

/** "1.2 s", "340 ms". */
export function duration(ms) {
  if (ms === null || ms === undefined) return '—';
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 1 : 0)} s`;
  return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
}

/** A progress bar and message for a resource that is transitioning. */
export function transition(resource) {
  if (!resource) return null;
  const message = resource.transitioningMessage;
  if (resource.transitioning === 'error') {
    return message ? h('span', { class: 'tmsg err clip', title: message }, message) : null;
  }
  if (resource.transitioning !== 'yes') return null;
  const progress = resource.transitioningProgress;
  return h('div', { class: 'progress' },
    h('div', {
      class: 'bar', role: 'progressbar', 'aria-label': `${resource.name || resource.id} progress`,
      'aria-valuemin': '0', 'aria-valuemax': '100',
      'aria-valuenow': progress === null || progress === undefined ? null : String(progress),
    }, h('span', { style: `width:${Math.max(4, Math.min(100, progress ?? 15))}%` })),
    h('span', null, message || 'in progress'),
    progress !== null && progress !== undefined ? h('span', null, `${progress}%`) : null);
}

/** Calls `fn` once events stop arriving for `wait` ms, and at least every `max` ms. */
export function debounce(fn, wait = 150, max = 1000) {
  let timer = null;
  let first = 0;
  const run = () => {
    timer = null;
    first = 0;
    fn();
  };
  const call = () => {
    const now = Date.now();
    if (!first) first = now;
    clearTimeout(timer);
    timer = setTimeout(run, Math.max(0, Math.min(wait, first + max - now)));
  };
  call.cancel = () => {
    clearTimeout(timer);
    timer = null;
    first = 0;
  };
  return call;
}

/** A short message at the bottom right; `link` is {href, text}. */
export function toast(message, { link, error = false, timeout = 6000 } = {}) {
  const box = document.getElementById('toasts');
  if (!box) return;
  const close = h('button', { class: 'x', 'aria-label': 'Dismiss notification' }, '×');
  const el = h('div', { class: `toast${error ? ' err' : ''}` },
    h('div', null, message, link ? [' ', h('a', { href: link.href }, link.text)] : null), close);
  close.addEventListener('click', () => el.remove());
  box.appendChild(el);
  // The newest few only: older ones make room.
  while (box.children.length > 3) box.firstElementChild.remove();
  if (timeout) setTimeout(() => el.remove(), timeout);
}

/** An "empty table" row spanning `columns`. */
export function emptyRow(columns, title, text) {
  return h('tr', null, h('td', { colspan: String(columns) },
    h('div', { class: 'empty' }, h('strong', null, title), text || null)));
}

/** Pretty JSON in a dark block. */
export function jsonBlock(value) {
  return h('pre', { class: 'json' }, JSON.stringify(value, null, 2));
}

/** Splits a command line into words, honouring simple quotes: `sh -c "echo hi"`. */
export function splitCommand(text) {
  const words = [];
  let current = '';
  let quote = null;
  let has = false;
  for (const ch of text.trim()) {
    if (quote) {
      if (ch === quote) quote = null;
      else current += ch;
    } else if (ch === '"' || ch === "'") {
      quote = ch;
      has = true;
    } else if (/\s/.test(ch)) {
      if (has || current) words.push(current);
      current = '';
      has = false;
    } else {
      current += ch;
      has = true;
    }
  }
  if (has || current) words.push(current);
  return words;
}

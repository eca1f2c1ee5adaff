// The UI's entry: the shell (sidebar, live status), the router, and the render clock.

import { clearSession, get, seesProcesses, session, setUnauthorizedHandler } from './api.js';
import { debounce, h, replace, tickTimes, toast } from './dom.js';
import { live } from './live.js';
import * as loginPage from './pages/login.js';
import * as processesPage from './pages/processes.js';
import * as processPage from './pages/process.js';
import * as hostsPage from './pages/hosts.js';
import * as resourcesPage from './pages/resources.js';
import * as eventsPage from './pages/events.js';
import * as clusterPage from './pages/cluster.js';
import * as containerPage from './pages/container.js';
import * as servicePage from './pages/service.js';
import * as stackPage from './pages/stack.js';
import * as settingsPage from './pages/settings.js';
import * as apikeysPage from './pages/apikeys.js';

const ICONS = {
  processes: 'M4 6h16M4 12h10M4 18h6M17 15l3 3-3 3',
  hosts: 'M4 5h16v6H4zM4 13h16v6H4zM8 8h.01M8 16h.01',
  containers: 'M12 3l8 4.5v9L12 21l-8-4.5v-9zM12 12l8-4.5M12 12v9M12 12L4 7.5',
  volumes: 'M4 7c0-1.7 3.6-3 8-3s8 1.3 8 3-3.6 3-8 3-8-1.3-8-3zM4 7v10c0 1.7 3.6 3 8 3s8-1.3 8-3V7M4 12c0 1.7 3.6 3 8 3s8-1.3 8-3',
  services: 'M5 5h5v5H5zM14 5h5v5h-5zM5 14h5v5H5zM14 14h5v5h-5z',
  stacks: 'M12 3l9 5-9 5-9-5zM3 13l9 5 9-5M3 17l9 5 9-5',
  apikeys: 'M14 10a4 4 0 1 0-.01 0M11 13l-7 7M6 18l2 2M8 16l2 2',
  settings: 'M4 6h10M18 6h2M4 12h4M12 12h8M4 18h12M20 18h0M14 4v4M8 10v4M16 16v4',
  events: 'M3 12h4l3-8 4 16 3-8h4',
  cluster: 'M12 4a2 2 0 1 0 0 .01M5 18a2 2 0 1 0 0 .01M19 18a2 2 0 1 0 0 .01M12 6v5M12 11l-6 6M12 11l6 6',
};

const NAV = [
  { page: 'processes', label: 'Processes', processes: true },
  { page: 'hosts', label: 'Hosts' },
  { page: 'containers', label: 'Containers' },
  { page: 'volumes', label: 'Volumes' },
  { page: 'services', label: 'Services' },
  { page: 'stacks', label: 'Stacks' },
  { page: 'events', label: 'Events' },
  { page: 'apikeys', label: 'API keys' },
  { page: 'settings', label: 'Settings', admin: true },
  { page: 'cluster', label: 'Cluster', admin: true },
];

function icon(name) {
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('fill', 'none');
  svg.setAttribute('stroke', 'currentColor');
  svg.setAttribute('stroke-width', '1.8');
  svg.setAttribute('stroke-linecap', 'round');
  svg.setAttribute('stroke-linejoin', 'round');
  svg.setAttribute('aria-hidden', 'true');
  const path = document.createElementNS('http://www.w3.org/2000/svg', 'path');
  path.setAttribute('d', ICONS[name]);
  svg.appendChild(path);
  return svg;
}

const app = document.getElementById('app');
let current = null;
let shell = null;

/** Which page a path shows, and its parameters; `page: null` is the "not found" page. */
function resolve(pathname) {
  const parts = pathname.split('/').filter(Boolean);
  const key = session();
  if (!key) return { page: loginPage, name: 'login' };
  const first = parts[0] || (seesProcesses(key) ? 'processes' : 'containers');
  const missing = { page: null, name: 'missing' };
  const id = parts[1] ? decodeURIComponent(parts[1]) : null;
  // A detail page has one id after its list's name; anything deeper is no page.
  if (parts.length > 2) return missing;
  switch (first) {
    case 'login':
      return parts.length > 1 ? missing : { page: loginPage, name: 'login' };
    case 'processes':
      return id
        ? { page: processPage, name: 'processes', params: { id } }
        : { page: processesPage, name: 'processes' };
    case 'containers':
      return id ? { page: containerPage, name: 'containers', params: { id } } : { page: resourcesPage, name: first, params: { kind: first } };
    case 'services':
      return id ? { page: servicePage, name: 'services', params: { id } } : { page: resourcesPage, name: first, params: { kind: first } };
    case 'stacks':
      return id ? { page: stackPage, name: 'stacks', params: { id } } : { page: resourcesPage, name: first, params: { kind: first } };
    case 'volumes':
      return id ? missing : { page: resourcesPage, name: first, params: { kind: first } };
    case 'hosts':
      return id ? missing : { page: hostsPage, name: 'hosts' };
    case 'events':
      return id ? missing : { page: eventsPage, name: 'events' };
    case 'cluster':
      return id ? missing : { page: clusterPage, name: 'cluster' };
    case 'settings':
      return id ? missing : { page: settingsPage, name: 'settings' };
    case 'apikeys':
      return id ? missing : { page: apikeysPage, name: 'apikeys' };
    default:
      return missing;
  }
}

/** Goes to a UI path without reloading. */
export function navigate(path, { replace: replaceState = false } = {}) {
  if (replaceState) history.replaceState(null, '', path);
  else history.pushState(null, '', path);
  route();
}

function route() {
  const target = resolve(location.pathname);
  if (current && current.unmount) current.unmount();
  current = null;
  if (target.name === 'login') {
    if (shell) for (const off of shell.off) off();
    shell = null;
    live.stop();
    app.removeAttribute('aria-busy');
    current = target.page.mount(app, {
      onLogin: () => {
        const next = new URLSearchParams(location.search).get('next');
        navigate(next && next.startsWith('/') && !next.startsWith('//') ? next : '/', { replace: true });
      },
    });
    document.title = 'Log in · drover';
    return;
  }
  if (!shell) buildShell();
  for (const link of shell.nav.querySelectorAll('a')) {
    if (link.dataset.page === target.name) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  const outlet = shell.outlet;
  outlet.replaceChildren();
  if (!target.page) {
    outlet.append(h('header', { class: 'page-head' }, h('div', null, h('h1', null, 'Page not found'),
      h('p', { class: 'sub' }, 'There is no page at ', h('code', { class: 'ellipsis path' }, location.pathname), '.'))),
    h('div', { class: 'content' }, h('div', { class: 'card pad empty not-found' },
      h('strong', null, 'Nothing here'),
      h('p', null, 'The link may be mistyped, or from a newer drover. ', h('a', { href: '/' }, 'Go to the start page'), ' or pick a page on the left.'))));
    document.title = 'Not found · drover';
    app.removeAttribute('aria-busy');
    return;
  }
  current = target.page.mount(outlet, { ...(target.params || {}), navigate });
  document.title = `${current.title || target.name} · drover`;
  app.removeAttribute('aria-busy');
  window.scrollTo(0, 0);
}

function buildShell() {
  const key = session();
  const nav = h('nav', { class: 'nav', 'aria-label': 'Main' });
  const counts = {};
  for (const item of NAV) {
    if (item.admin && !key.admin) continue;
    if (item.processes && !seesProcesses(key)) continue;
    const count = h('span', { class: 'count', 'aria-label': `${item.label} in progress` });
    counts[item.page] = count;
    nav.append(h('a', { href: `/${item.page}`, dataset: { page: item.page } },
      icon(item.page), h('span', { class: 'label' }, item.label), count));
  }
  const status = h('span', { class: 'live', 'data-state': 'closed', role: 'status', 'aria-live': 'polite' },
    h('span', null, 'Offline'));
  const logout = h('button', { type: 'button', class: 'small', 'aria-label': 'Log out' }, 'Log out');
  logout.addEventListener('click', () => {
    clearSession();
    live.stop();
    navigate('/login', { replace: true });
  });
  const outlet = h('main', { class: 'main', id: 'main' });
  const sidebar = h('aside', { class: 'sidebar' },
    h('a', { class: 'brand', href: '/', 'aria-label': 'drover home' },
      h('img', { src: '/assets/favicon.svg', alt: '' }),
      h('span', null, 'drover', h('small', null, 'processes · events'))),
    nav,
    h('div', { class: 'side-foot' },
      status,
      h('div', { class: 'who' }, h('span', { class: 'mono' }, key.access), ' · ', key.admin ? 'admin' : 'project key'),
      logout));
  replace(app, h('div', { class: 'app' }, sidebar, outlet));
  const off = [];
  shell = { nav, outlet, counts, off };

  off.push(live.onStatus((state) => {
    status.dataset.state = state;
    status.firstChild.textContent = { open: 'Live', connecting: 'Connecting…', closed: 'Reconnecting…' }[state];
  }));
  if (seesProcesses(key)) {
    const refreshCount = debounce(async () => {
      try {
        const summary = await get('processsummary');
        let pending = 0;
        let delayed = 0;
        for (const row of summary.data || []) {
          pending += (row.running || 0) + (row.ready || 0) + (row.delay || 0);
          delayed += row.delay || 0;
        }
        counts.processes.textContent = pending ? String(pending) : '';
        counts.processes.classList.toggle('warn', delayed > 0);
      } catch {
        /* the page shows errors; the badge just stays */
      }
    }, 300, 1500);
    off.push(live.on((event) => {
      if (['state.change', 'process.change', 'live.open'].includes(event.name)) refreshCount();
    }), () => refreshCount.cancel());
    refreshCount();
  }
  off.push(live.on(hostsPage.notePing));
  off.push(live.on((event) => {
    if (current && current.onEvent) current.onEvent(event);
  }));
  live.start();
}

// Same-origin links to UI pages navigate without a reload.
document.addEventListener('click', (event) => {
  if (event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
  const link = event.target.closest('a[href]');
  if (!link || link.target || link.hasAttribute('download')) return;
  const url = new URL(link.href, location.href);
  if (url.origin !== location.origin || url.pathname.startsWith('/v1') || url.pathname.startsWith('/assets')) return;
  event.preventDefault();
  if (url.pathname === location.pathname && url.search === location.search && url.hash) {
    history.pushState(null, '', url.hash);
    if (current && current.onHash) current.onHash(url.hash.slice(1));
    return;
  }
  navigate(url.pathname + url.search + url.hash);
});

window.addEventListener('popstate', route);

setUnauthorizedHandler(() => {
  if (!session()) return;
  clearSession();
  live.stop();
  toast('The key was refused (removed or changed): log in again.', { error: true });
  navigate(`/login?next=${encodeURIComponent(location.pathname + location.search)}`, { replace: true });
});

// The render clock: relative times ("12 s ago") are rewritten each second; no request is made.
setInterval(() => tickTimes(), 1000);

route();

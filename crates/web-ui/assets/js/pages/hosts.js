// Hosts and agents: state (active, reconnecting, disconnected), last ping, host facts, and the
// containers on each host, live.

import { all, seesProcesses } from '../api.js';
import {
  badge, debounce, ellipsis, emptyRow, h, idTag, millis, processesHref, replace, resourceHref, timeEl, transition,
} from '../dom.js';

/** Last ping per agent id, as `agent.ping` events report it; kept across page visits. */
const lastPings = new Map();

const FACTS = [
  ['hostname', 'Hostname'], ['os', 'OS'], ['kernel', 'Kernel'], ['arch', 'Arch'],
  ['cpus', 'CPUs'], ['memoryMb', 'Memory'], ['agentVersion', 'Agent'],
];

function fact(host, key) {
  const value = host[key] ?? (host.info && host.info[key]);
  if (value === undefined || value === null || value === '') return null;
  if (key === 'memoryMb') return value >= 1024 ? `${(value / 1024).toFixed(1)} GiB` : `${value} MiB`;
  return String(value);
}

export function mount(root) {
  let disposed = false;
  let generation = 0;
  let data = { hosts: [], agents: [], containers: [] };
  const list = h('div', { class: 'hosts' });
  const agentsBody = h('tbody');
  const stats = h('div', { class: 'stats' });
  const error = h('div', { class: 'callout red', role: 'alert', hidden: true });

  replace(root,
    h('header', { class: 'page-head' },
      h('div', null, h('h1', null, 'Hosts'),
        h('p', { class: 'sub' }, 'Each host runs an agent that the server pings every few seconds. Missed pings make it reconnecting, then disconnected; its facts come with each answer.'))),
    h('div', { class: 'content' },
      error, stats, list,
      h('section', { class: 'card', 'aria-labelledby': 'agents-title' },
        h('header', null, h('h2', { id: 'agents-title' }, 'Agents')),
        h('div', { class: 'table-wrap' }, h('table', { class: 'grid', 'aria-labelledby': 'agents-title' },
          h('thead', null, h('tr', null, h('th', { scope: 'col' }, 'Agent'), h('th', { scope: 'col' }, 'State'),
            h('th', { scope: 'col' }, 'Last ping'), h('th', { scope: 'col' }, 'Hosts'), h('th', { scope: 'col' }, 'Created'))),
          agentsBody)))));

  function lastPing(agent) {
    const live = lastPings.get(agent && agent.id);
    const stored = agent && millis(agent.lastPing);
    const best = Math.max(live || 0, stored || 0);
    return best ? timeEl(best) : h('span', { class: 'muted', title: 'No answer seen since this page opened' }, 'waiting…');
  }

  async function load() {
    const mine = ++generation;
    try {
      const [hosts, agents, containers] = await Promise.all([
        all('hosts?state_ne=purged'), all('agents'), all('containers?state_ne=removed'),
      ]);
      if (disposed || mine !== generation) return;
      error.hidden = true;
      data = { hosts, agents, containers };
      render();
    } catch (err) {
      if (disposed || mine !== generation) return;
      error.hidden = false;
      replace(error, h('strong', null, 'Cannot load hosts'), err.message);
    }
  }

  function render() {
    const { hosts, agents, containers } = data;
    const agentById = new Map(agents.map((a) => [a.id, a]));
    const visible = hosts.filter((host) => host.state !== 'removed');
    const count = (state) => visible.filter((host) => host.state === state).length;
    replace(stats,
      h('div', { class: 'stat' }, h('div', { class: 'label' }, 'Hosts'), h('div', { class: 'value' }, String(visible.length))),
      h('div', { class: 'stat' }, h('div', { class: 'label' }, 'Active'), h('div', { class: 'value' }, String(count('active')))),
      h('div', { class: `stat${count('reconnecting') ? ' warn' : ''}` }, h('div', { class: 'label' }, 'Reconnecting'), h('div', { class: 'value' }, String(count('reconnecting')))),
      h('div', { class: `stat${count('disconnected') ? ' bad' : ''}` }, h('div', { class: 'label' }, 'Disconnected'), h('div', { class: 'value' }, String(count('disconnected')))),
      h('div', { class: 'stat' }, h('div', { class: 'label' }, 'Containers'), h('div', { class: 'value' }, String(containers.length))));

    replace(list, visible.length ? visible.map((host) => {
      const agent = agentById.get(host.agentId);
      const mine = containers.filter((c) => c.hostId === host.id);
      const facts = FACTS.map(([key, label]) => [label, fact(host, key)]).filter(([, v]) => v);
      return h('article', { class: 'card host', id: host.id, 'aria-labelledby': `host-${host.id}` },
        h('header', null,
          h('div', { class: 'host-title' }, h('h2', { id: `host-${host.id}`, class: 'ellipsis', title: host.name || host.hostname || host.id }, host.name || host.hostname || host.id), idTag(host.id), badge(host.state), transition(host)),
          seesProcesses() ? h('a', { href: processesHref('host', host.id), style: 'font-size:.85rem' }, 'Processes →') : null),
        h('div', { class: 'agentline', dataset: { agent: host.agentId || '' } },
          h('span', null, h('strong', null, 'Agent'), idTag(host.agentId), ' ', agent ? badge(agent.state) : null),
          h('span', { class: 'last-ping' }, h('strong', null, 'Last ping'), lastPing(agent)),
          h('span', null, h('strong', null, 'Registered'), timeEl(host.createdTS ?? host.created))),
        h('div', { class: 'sect' },
          h('h3', null, 'Facts'),
          facts.length ? h('dl', { class: 'facts cols' }, facts.map(([label, value]) => h('div', null, h('dt', null, label), h('dd', null, value))))
            : h('p', { class: 'muted' }, 'No facts reported yet.')),
        h('div', { class: 'sect' },
          h('h3', null, `Containers (${mine.length})`),
          mine.length ? h('table', { class: 'grid', 'aria-label': `Containers on ${host.name || host.id}` },
            h('tbody', null, mine.map((c) => h('tr', null,
              h('td', { class: 'flex' }, ellipsis(c.name || '(unnamed)', { cls: 'primary', href: resourceHref('container', c.id) }), ' ', idTag(c.id, resourceHref('container', c.id))),
              h('td', null, badge(c.state), transition(c)),
              h('td', { class: 'flex' }, ellipsis([].concat(c.command || []).join(' '), { cls: 'cmd' }))))))
            : h('p', { class: 'muted' }, 'No containers on this host.')));
    }) : h('div', { class: 'card pad empty' }, h('strong', null, 'No hosts yet'),
      'Register one: create a registration token (POST /v1/registrationtokens) and run ',
      h('code', null, 'drover agent --url … --registration-token …'), ' on the machine.'));

    replace(agentsBody, agents.length ? agents.filter((a) => a.state !== 'purged').map((agent) => h('tr', { id: agent.id },
      h('td', { class: 'flex' }, ellipsis(agent.name || '(unnamed)', { cls: 'primary' }), ' ', idTag(agent.id)),
      h('td', null, badge(agent.state), transition(agent)),
      h('td', { dataset: { lastPing: agent.id } }, lastPing(agent)),
      h('td', null, hosts.filter((host) => host.agentId === agent.id).map((host) => [idTag(host.id, `#${host.id}`), ' '])),
      h('td', null, timeEl(agent.createdTS ?? agent.created))))
      : emptyRow(5, 'No agents yet'));
    scrollToHash();
  }

  let scrolled = false;
  function scrollToHash(force) {
    const target = location.hash.slice(1);
    if (!target || (scrolled && !force)) return;
    const el = document.getElementById(target);
    if (!el) return;
    scrolled = true;
    el.scrollIntoView({ block: 'center' });
    el.classList.add('focus');
  }

  const refresh = debounce(load, 150, 800);
  load();
  return {
    title: 'Hosts',
    onHash() {
      for (const el of root.querySelectorAll('.focus')) el.classList.remove('focus');
      scrollToHash(true);
    },
    onEvent(event) {
      if (event.name === 'agent.ping' && event.resourceId) {
        lastPings.set(event.resourceId, (event.data && event.data.lastPing) || event.time || Date.now());
        // Only the ping cells change: update them in place.
        const agent = data.agents.find((a) => a.id === event.resourceId);
        for (const cell of root.querySelectorAll(`[data-last-ping="${CSS.escape(event.resourceId)}"]`)) replace(cell, lastPing(agent));
        for (const line of root.querySelectorAll(`.agentline[data-agent="${CSS.escape(event.resourceId)}"] > .last-ping`)) {
          replace(line, h('strong', null, 'Last ping'), lastPing(agent));
        }
        return;
      }
      if (event.name === 'resource.change' || event.name === 'state.change' || event.name === 'live.open') refresh();
    },
    unmount() {
      disposed = true;
      refresh.cancel();
    },
  };
}

/** Records pings seen while another page is open, so Hosts shows them at once. */
export function notePing(event) {
  if (event.name === 'agent.ping' && event.resourceId) {
    lastPings.set(event.resourceId, (event.data && event.data.lastPing) || event.time || Date.now());
  }
}

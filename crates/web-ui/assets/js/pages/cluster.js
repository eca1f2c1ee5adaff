// The cluster: every server node on this database, its state, its last heartbeat and what it
// holds (the leader duty, process leases, agent sockets). Refetched when a `cluster.change`
// event says membership or leadership changed, on any node.

import { all } from '../api.js';
import { badge, debounce, emptyRow, h, replace, timeEl } from '../dom.js';

export function mount(root) {
  let disposed = false;
  let generation = 0;
  const body = h('tbody');
  const stats = h('div', { class: 'stats' });
  const error = h('div', { class: 'callout red', role: 'alert', hidden: true });

  replace(root,
    h('header', { class: 'page-head' },
      h('div', null, h('h1', null, 'Cluster'),
        h('p', { class: 'sub' }, 'The servers sharing this database. Each renews a lease every second; one whose lease ran out is dead and live nodes take its processes over. The leader runs clean-up, the ping monitor and the event worker.'))),
    h('div', { class: 'content' },
      error, stats,
      h('section', { class: 'card', 'aria-labelledby': 'nodes-title' },
        h('header', null, h('h2', { id: 'nodes-title' }, 'Nodes')),
        h('div', { class: 'table-wrap' }, h('table', { class: 'grid', 'aria-labelledby': 'nodes-title' },
          h('thead', null, h('tr', null,
            h('th', { scope: 'col' }, 'Node'), h('th', { scope: 'col' }, 'State'), h('th', { scope: 'col' }, 'Address'),
            h('th', { scope: 'col' }, 'Epoch'), h('th', { scope: 'col' }, 'Last heartbeat'),
            h('th', { scope: 'col' }, 'Processes'), h('th', { scope: 'col' }, 'Agents'))),
          body)))));

  async function load() {
    const mine = ++generation;
    try {
      const nodes = await all('clusternodes');
      if (disposed || mine !== generation) return;
      error.hidden = true;
      render(nodes);
    } catch (err) {
      if (disposed || mine !== generation) return;
      error.hidden = false;
      replace(error, h('strong', null, 'Cannot load the cluster'), err.message);
    }
  }

  function render(nodes) {
    const alive = nodes.filter((n) => n.state === 'alive');
    const leader = alive.find((n) => n.leader);
    replace(stats,
      h('div', { class: 'stat' }, h('div', { class: 'label' }, 'Live nodes'), h('div', { class: 'value' }, String(alive.length))),
      h('div', { class: `stat${nodes.length > alive.length ? ' warn' : ''}` }, h('div', { class: 'label' }, 'Dead'), h('div', { class: 'value' }, String(nodes.length - alive.length))),
      h('div', { class: 'stat' }, h('div', { class: 'label' }, 'Leader'), h('div', { class: 'value' }, leader ? leader.name : '—')));
    replace(body, nodes.length ? nodes.map((node) => h('tr', { id: node.id },
      h('td', null, h('span', { class: 'primary', title: node.id }, node.name), node.self ? h('span', { class: 'muted' }, ' (this page\u2019s server)') : null),
      h('td', null, badge(node.state === 'alive' ? 'active' : 'disconnected', node.state), node.leader ? [' ', badge('active', 'leader')] : null),
      h('td', { class: 'cmd' }, node.address),
      h('td', null, String(node.epoch)),
      h('td', null, timeEl(node.heartbeat)),
      h('td', null, String(node.processes)),
      h('td', null, String(node.agents))))
      : emptyRow(7, 'No nodes', 'This server has not joined yet.'));
  }

  const refresh = debounce(load, 150, 800);
  load();
  return {
    title: 'Cluster',
    onEvent(event) {
      if (event.name === 'cluster.change' || event.name === 'live.open') refresh();
    },
    unmount() {
      disposed = true;
      refresh.cancel();
    },
  };
}

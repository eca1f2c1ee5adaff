// One container: its state and how it ended (exit code, end time, the agent's last message),
// where it runs, its command, environment and labels, its last processes and its log, live.

import { get } from '../api.js';
import { badge, debounce, ellipsis, h, idTag, replace, resourceHref, timeEl } from '../dom.js';
import { detailHead, fact, mapTable, processesCard, showError } from './detail.js';
import { logsPanel } from './logs.js';

/** The agent's last word on a container ("exited with code 3", "running as process 42"). */
function agentMessage(c) {
  return c.agentMessage ?? null;
}

export function mount(root, { id }) {
  let disposed = false;
  let generation = 0;
  let container = null;
  let host = null;
  let service = null;

  const head = detailHead({
    type: 'container', listHref: '/containers', listLabel: 'Containers',
    actions: ['start', 'stop', 'restart', 'remove'],
    onDone: (updated) => render(updated),
  });
  const error = h('div', { class: 'callout red', role: 'alert', hidden: true });
  const ended = h('div', { id: 'container-exit', hidden: true });
  const facts = h('dl', { class: 'facts' });
  const env = h('div', { class: 'body' });
  const processes = processesCard('container', id);
  const logs = logsPanel(id);

  replace(root, head.el,
    h('div', { class: 'content' },
      error, ended,
      h('div', { class: 'detail-grid' },
        h('div', { class: 'col' }, logs.el, processes.el),
        h('div', { class: 'col side' },
          h('section', { class: 'card', 'aria-labelledby': 'container-facts-title' },
            h('header', null, h('h2', { id: 'container-facts-title' }, 'Container')), h('div', { class: 'body' }, facts)),
          h('section', { class: 'card', 'aria-labelledby': 'container-env-title' },
            h('header', null, h('h2', { id: 'container-env-title' }, 'Environment and labels')), env)))));

  function render(c) {
    container = c;
    head.update(c);
    document.title = `${c.name || c.id} · drover`;

    const code = c.exitCode;
    const message = agentMessage(c);
    const finished = c.finishedAt;
    // A code left from an earlier run says nothing while the container runs again.
    const up = ['running', 'starting', 'restarting'].includes(c.state);
    const exited = code !== null && code !== undefined && !up;
    const failed = c.state === 'error' || (exited && code !== 0);
    const detail = message || c.transitioningMessage;
    if (exited || (c.state === 'error' && detail)) {
      ended.hidden = false;
      ended.className = `callout ${failed ? 'red' : 'blue'}`;
      replace(ended,
        h('strong', null, exited ? `Exited with code ${code}` : 'Failed', finished ? [' · ', timeEl(finished)] : null),
        detail && detail.toLowerCase() !== `exited with code ${code}` ? h('div', { class: 'msg' }, detail) : null);
    } else {
      ended.hidden = true;
    }

    const hostName = host && host.id === c.hostId ? (host.name || host.hostname) : null;
    replace(facts,
      fact('Id', idTag(c.id)),
      fact('State', [badge(c.state), c.agentState && c.agentState !== c.state ? h('span', { class: 'secondary' }, `agent: ${c.agentState}`) : null]),
      fact('Host', c.hostId ? [hostName ? ellipsis(hostName) : null, ' ', idTag(c.hostId, resourceHref('host', c.hostId))] : (c.requestedHostId ? `requested ${c.requestedHostId}` : null)),
      fact('Service', c.serviceId ? [service && service.id === c.serviceId && service.name ? ellipsis(service.name, { href: resourceHref('service', c.serviceId) }) : null, ' ', idTag(c.serviceId, resourceHref('service', c.serviceId))] : null),
      fact('Command', c.command && [].concat(c.command).length ? ellipsis([].concat(c.command).join(' '), { cls: 'cmd' }) : null),
      fact('Working dir', c.workingDir ? ellipsis(c.workingDir, { cls: 'cmd' }) : null),
      fact('Exit code', exited ? h('span', { class: `mono${code !== 0 ? ' bad' : ''}`, dataset: { exitCode: String(code) } }, String(code)) : null),
      fact('Finished', finished && !up ? timeEl(finished) : null),
      fact('Agent message', message ? ellipsis(message, { cls: 'mono' }) : null),
      fact('Created', timeEl(c.createdTS ?? c.created)));

    const envTable = mapTable(c.environment, 'Environment');
    const labelTable = mapTable(c.labels, 'Labels');
    replace(env,
      h('h3', { class: 'minor' }, 'Environment'), envTable || h('p', { class: 'muted' }, 'No variables.'),
      h('h3', { class: 'minor' }, 'Labels'), labelTable || h('p', { class: 'muted' }, 'No labels.'));
    logs.setState(c.state);
  }

  async function load() {
    const mine = ++generation;
    try {
      const c = await get(`containers/${encodeURIComponent(id)}`);
      const [hostNow, serviceNow] = await Promise.all([
        c.hostId ? get(`hosts/${encodeURIComponent(c.hostId)}`).catch(() => null) : null,
        c.serviceId ? get(`services/${encodeURIComponent(c.serviceId)}`).catch(() => null) : null,
      ]);
      if (disposed || mine !== generation) return;
      host = hostNow;
      service = serviceNow;
      error.hidden = true;
      render(c);
    } catch (err) {
      if (disposed || mine !== generation) return;
      showError(error, err, 'container');
    }
    processes.load();
  }

  const refresh = debounce(load, 120, 600);
  load();
  return {
    title: id,
    onEvent(event) {
      if (event.name === 'live.open') {
        refresh();
        return;
      }
      const resource = event.name === 'resource.change' && event.data && event.data.resource;
      if (resource && resource.type === 'container' && resource.id === id) {
        render(resource);
        processes.load();
        return;
      }
      if (event.resourceId === id && ['state.change', 'process.change'].includes(event.name)) refresh();
      else if (container && event.name === 'resource.change' &&
        ((event.resourceType === 'host' && event.resourceId === container.hostId) ||
          (event.resourceType === 'service' && event.resourceId === container.serviceId))) refresh();
    },
    unmount() {
      disposed = true;
      refresh.cancel();
      logs.stop();
    },
  };
}

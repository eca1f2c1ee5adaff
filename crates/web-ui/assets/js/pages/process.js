// One process: every attempt (execution) with its times, exit reason and the agent's message,
// the resource's live progress, and replay / cancel for admins.

import { ApiError, get, post, session } from '../api.js';
import {
  absolute, badge, debounce, duration, ellipsis, emptyRow, h, idTag, jsonBlock, millis, processBadge, processesHref, replace,
  resourceHref, timeEl, toast, transition,
} from '../dom.js';

/** The steps of one attempt, in the order they ran: external handlers by phase (pre, handler,
 * post) with their result and time, the built-in agent call, and the error that ended it. */
function stepList(steps) {
  if (!steps.length) return h('span', { class: 'muted' }, 'no step');
  const tone = { ok: 'green', error: 'red', timeout: 'amber', shutdown: 'gray' };
  return h('ol', { class: 'steps' }, steps.map((step) => {
    if (step.handler) {
      return h('li', { class: 'step', dataset: { phase: step.phase || 'handler', handler: step.handler, result: step.result || '' } },
        badge(step.phase || 'handler', step.phase || 'handler', 'gray'), ' ',
        h('span', { class: 'mono', title: `priority ${step.priority ?? '—'}` }, step.event || step.handler), ' ',
        badge(step.result || 'sent', step.result || 'sent', tone[step.result] || 'gray'),
        step.ms != null ? h('span', { class: 'secondary' }, ` ${step.ms} ms`) : null,
        step.sent > 1 ? h('span', { class: 'secondary' }, ` · sent ${step.sent}×`) : null);
    }
    if (step.command) {
      return h('li', { class: 'step', dataset: { phase: 'handler', handler: 'built-in', result: 'ok' } },
        badge('agent', 'agent', 'gray'), ' ', h('span', { class: 'mono' }, step.command),
        step.agent ? h('span', { class: 'secondary' }, ` → ${step.agent}`) : null);
    }
    if (step.error) {
      return h('li', { class: 'step', dataset: { phase: 'error', result: 'error' } },
        badge('error', step.reason || 'error', 'red'), ' ', h('span', { class: 'msg' }, step.error),
        step.onError ? h('span', { class: 'secondary' }, ` → runs ${step.onError}`) : null);
    }
    return h('li', { class: 'step' }, h('span', { class: 'mono' }, JSON.stringify(step)));
  }));
}

export function mount(root, { id }) {
  let disposed = false;
  let process = null;
  let generation = 0;

  const title = h('h1', { class: 'mono' }, id);
  const subtitle = h('div', { class: 'sub' });
  const replay = h('button', { type: 'button', 'aria-label': 'Replay this process' }, 'Replay');
  const cancel = h('button', { type: 'button', class: 'danger', 'aria-label': 'Cancel this process' }, 'Cancel');
  const status = h('div', { id: 'process-status', class: 'col' });
  const executions = h('tbody');
  const facts = h('dl', { class: 'facts' });
  const resourceBox = h('div', { class: 'body' });
  const error = h('div', { class: 'callout red', role: 'alert', hidden: true });

  replace(root,
    h('header', { class: 'page-head' },
      h('div', null,
        h('nav', { class: 'crumbs', 'aria-label': 'Breadcrumb' }, h('a', { href: '/processes' }, 'Processes'), ' / ', h('span', { class: 'mono' }, id)),
        title, subtitle),
      h('div', { class: 'head-actions' }, replay, cancel)),
    h('div', { class: 'content' },
      error,
      status,
      h('div', { class: 'detail-grid' },
        h('div', { class: 'col' },
          h('section', { class: 'card', 'aria-labelledby': 'attempts-title' },
            h('header', null, h('h2', { id: 'attempts-title' }, 'Attempts'),
              h('span', { class: 'muted', style: 'font-size:.82rem' }, 'one row per execution, oldest first')),
            h('div', { class: 'table-wrap' }, h('table', { class: 'grid', 'aria-labelledby': 'attempts-title' },
              h('thead', null, h('tr', null,
                h('th', { scope: 'col' }, '#'), h('th', { scope: 'col' }, 'Started'), h('th', { scope: 'col', class: 'num' }, 'Duration'),
                h('th', { scope: 'col' }, 'Exit reason'), h('th', { scope: 'col' }, 'Agent message'), h('th', { scope: 'col' }, 'Steps'))),
              executions)))),
        h('div', { class: 'col side' },
          h('section', { class: 'card', 'aria-labelledby': 'resource-title' },
            h('header', null, h('h2', { id: 'resource-title' }, 'Resource')), resourceBox),
          h('section', { class: 'card', 'aria-labelledby': 'facts-title' },
            h('header', null, h('h2', { id: 'facts-title' }, 'Process')), h('div', { class: 'body' }, facts))))));

  async function load() {
    const mine = ++generation;
    try {
      const p = await get(`processinstances/${encodeURIComponent(id)}`);
      const [runs, resource] = await Promise.all([
        get(`processexecutions?processInstanceId=${encodeURIComponent(id)}`),
        get(p.links.resource).catch(() => null),
      ]);
      if (disposed || mine !== generation) return;
      process = p;
      error.hidden = true;
      render(p, runs.data || [], resource);
    } catch (err) {
      if (disposed || mine !== generation) return;
      error.hidden = false;
      replace(error, h('strong', null, err instanceof ApiError && err.status === 404 ? 'No such process' : 'Cannot load the process'), err.message);
    }
  }

  function render(p, runs, resource) {
    title.textContent = p.processName;
    replace(subtitle,
      h('span', { class: 'mono' }, p.id), ' on ', p.resourceType, ' ',
      idTag(p.resourceId, resourceHref(p.resourceType, p.resourceId)), '  ',
      processBadge(p));
    // Replay and cancel are for admins; a project key reads its project's processes only.
    const admin = Boolean(session()?.admin);
    replay.hidden = !admin;
    cancel.hidden = !admin;
    replay.disabled = !(p.actions && p.actions.replay);
    cancel.disabled = !(p.actions && p.actions.cancel);
    replay.title = replay.disabled ? 'Replay is for a process that is not running and did not succeed' : 'Run it again from its first attempt';
    cancel.title = cancel.disabled ? 'Only an unfinished process can be canceled' : 'End it now as CANCELED';

    const attempts = p.executionCount || 0;
    const callouts = [];
    if (p.state === 'running') {
      callouts.push(h('div', { class: 'callout blue' },
        h('strong', null, `Attempt ${attempts} is running`),
        `Claimed by ${p.runningProcessServerId || 'a server node'}; it waits for the agent's reply. `,
        resource && resource.transitioningMessage ? `Progress: ${resource.transitioningMessage}${resource.transitioningProgress != null ? ` (${resource.transitioningProgress}%)` : ''}.` : ''));
    } else if (p.state === 'delayed') {
      callouts.push(h('div', { class: 'callout blue' },
        h('strong', null, `Attempt ${attempts} failed; attempt ${attempts + 1} runs `, timeEl(p.runAfterTS ?? p.runAfter)),
        p.lastError ? h('div', { class: 'msg' }, p.lastError) : null));
    }
    if (p.result === 'FAILURE' || (p.lastError && p.state !== 'delayed' && p.result !== 'SUCCESS')) {
      callouts.push(h('div', { class: 'callout red' },
        h('strong', null, p.result === 'FAILURE' ? `Failed for good after ${attempts} attempt${attempts === 1 ? '' : 's'} (${p.exitReason || 'error'})` : 'Last error'),
        h('div', { class: 'msg' }, p.lastError || p.exitReason || '')));
    }
    replace(status, callouts);
    status.hidden = !callouts.length;

    replace(executions, runs.length ? runs.map((run, i) => {
      const ok = run.exitReason === 'DONE';
      const started = millis(run.startTime || run.created);
      return h('tr', { dataset: { execution: run.id } },
        h('td', null, h('span', { class: `attempt-n ${ok ? 'good' : run.endTime ? 'bad' : ''}`, 'aria-label': `Attempt ${i + 1}` }, String(i + 1))),
        h('td', { class: 'nowrap' }, started ? h('span', null, absolute(started)) : '—', h('span', { class: 'secondary' }, timeEl(started))),
        h('td', { class: 'num nowrap' }, duration(run.durationMillis)),
        h('td', null, run.exitReason ? badge(ok ? 'success' : run.exitReason === 'CANCELED' ? 'canceled' : 'error', run.exitReason) : badge('running', null, 'blue')),
        h('td', { class: run.message && !ok ? 'error-cell' : '' }, run.message ? h('span', { class: 'mono', style: 'font-size:.84rem' }, run.message) : h('span', { class: 'muted' }, ok ? 'done' : '—')),
        h('td', null, run.log ? h('div', null, stepList(run.log.steps || []), h('details', null, h('summary', null, 'raw log'), jsonBlock(run.log))) : '—'));
    }) : emptyRow(6, p.state === 'ready' ? 'Not started yet' : 'No attempt recorded', p.state === 'ready' ? 'It waits for a worker, or for the process ahead of it on the same resource.' : null));

    replace(resourceBox, resource ? h('div', null,
      h('dl', { class: 'facts' },
        h('dt', null, 'Name'), h('dd', null, resource.name ? ellipsis(resource.name) : h('span', { class: 'muted' }, '(none)')),
        h('dt', null, 'Id'), h('dd', null, idTag(resource.id, resourceHref(p.resourceType, resource.id))),
        h('dt', null, 'State'), h('dd', null, badge(resource.state), transition(resource)),
        resource.hostId ? [h('dt', null, 'Host'), h('dd', null, idTag(resource.hostId, resourceHref('host', resource.hostId)))] : null,
        resource.command ? [h('dt', null, 'Command'), h('dd', null, ellipsis([].concat(resource.command).join(' '), { cls: 'cmd' }))] : null),
      h('p', { style: 'margin-top:.8rem' }, h('a', { href: processesHref(p.resourceType, p.resourceId) }, 'Every process of this resource →')))
      : h('p', { class: 'muted' }, 'The resource is gone (purged).'));

    const row = (label, value) => [h('dt', null, label), h('dd', null, value ?? h('span', { class: 'muted' }, '—'))];
    replace(facts,
      row('Id', h('span', { class: 'id' }, p.id)),
      row('State', badge(p.state, null, { running: 'blue', delayed: 'amber', ready: 'gray', done: 'gray' }[p.state])),
      row('Result', p.result ? badge(p.result.toLowerCase(), p.result) : null),
      row('Exit reason', p.exitReason),
      row('Phase', p.phase),
      row('Attempts', String(attempts)),
      row('Created', timeEl(p.created)),
      row('Started', timeEl(p.startTime)),
      row('Ended', timeEl(p.endTime)),
      row('Next run', p.state === 'delayed' || p.state === 'ready' ? timeEl(p.runAfterTS ?? p.runAfter) : null),
      row('Node', p.runningProcessServerId || p.startProcessServerId ? h('span', { class: 'mono', style: 'font-size:.8rem' }, p.runningProcessServerId || p.startProcessServerId) : null),
      row('Data', p.data && Object.keys(p.data).length ? h('details', null, h('summary', null, 'show'), jsonBlock(p.data)) : null));
  }

  async function act(action) {
    const button = action === 'replay' ? replay : cancel;
    button.disabled = true;
    try {
      await post(`processinstances/${encodeURIComponent(id)}?action=${action}`);
      toast(action === 'replay' ? `Replaying ${id}.` : `Canceled ${id}.`);
    } catch (err) {
      toast(`${action} failed: ${err.message}`, { error: true });
    }
    load();
  }
  replay.addEventListener('click', () => act('replay'));
  cancel.addEventListener('click', () => {
    if (confirm(`Cancel ${id}? The resource stays as it is now.`)) act('cancel');
  });

  const refresh = debounce(load, 100, 500);
  load();
  return {
    title: id,
    onEvent(event) {
      if (event.name === 'live.open') refresh();
      else if (['state.change', 'process.change', 'resource.change'].includes(event.name) &&
        (!process || event.resourceId === process.resourceId)) refresh();
    },
    unmount() {
      disposed = true;
      refresh.cancel();
    },
  };
}

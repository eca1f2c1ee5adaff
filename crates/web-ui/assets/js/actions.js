// Resource actions shared by the lists and the detail pages: the confirmation before removing
// something that runs, the request, and the toast that links the process it started.

import { ApiError, latestProcess, post, request, session } from './api.js';
import { confirmDialog, toast } from './dom.js';

export const LABELS = {
  start: 'Start', stop: 'Stop', restart: 'Restart', remove: 'Remove', activate: 'Activate', deactivate: 'Deactivate',
};

/** The API collection of a type. */
export const PLURAL = { container: 'containers', volume: 'volumes', service: 'services', stack: 'stacks' };

const RUNNING = new Set(['running', 'starting', 'restarting', 'stopping', 'active', 'activating', 'updating-active']);

/** What to ask before `action` on `resource`, or null when it needs no confirmation. */
export function confirmation(type, resource, action) {
  if (action !== 'remove' || !RUNNING.has(resource.state)) return null;
  const name = resource.name || resource.id;
  const what = {
    container: `${name} is ${resource.state}: removing it stops its process on the host and deletes the container.`,
    service: `${name} is ${resource.state}: removing it removes its containers too.`,
    stack: `${name} is ${resource.state}: removing it removes its services and their containers.`,
    volume: `${name} is ${resource.state}: removing it deletes its directory on the host.`,
  }[type] || `${name} is ${resource.state}.`;
  return { title: `Remove ${name}?`, message: what, confirm: 'Remove' };
}

/**
 * Runs `action` on `resource` (asking first when it runs); answers the updated resource, or
 * null when the user said no or the request failed (a toast says why).
 */
export async function perform(type, resource, action) {
  const ask = confirmation(type, resource, action);
  if (ask && !(await confirmDialog(ask))) return null;
  try {
    const link = resource.actions && resource.actions[action];
    return link ? await request('POST', link, {})
      : await post(`${PLURAL[type]}/${encodeURIComponent(resource.id)}?action=${action}`);
  } catch (err) {
    const locked = err instanceof ApiError && err.status === 409 && err.detail;
    toast(`${LABELS[action] || action} ${resource.name || resource.id}: ${err.message}`, {
      error: true, link: locked && session()?.admin ? { href: `/processes/${err.detail}`, text: `see ${err.detail}` } : undefined,
    });
    return null;
  }
}

/** Finds the process an action started and says so in a toast; answers it (or null). */
export async function announce(type, resource, verb) {
  const process = await latestProcess(type, resource.id);
  if (process) {
    toast(`${verb} ${resource.name || resource.id}: process ${process.processName} `, { link: { href: `/processes/${process.id}`, text: process.id } });
  } else {
    toast(`${verb} ${resource.name || resource.id}.`);
  }
  return process;
}

// The REST client: HTTP Basic with the key kept in this tab's session storage only.

const KEY = 'drover.key';

/** The logged-in key: {access, secret, admin}, or null. */
export function session() {
  try {
    const value = JSON.parse(sessionStorage.getItem(KEY) || 'null');
    return value && value.access && value.secret ? value : null;
  } catch {
    return null;
  }
}

/** Whether this key may read processes: an admin key, or a key the API shows them to. */
export function seesProcesses(key = session()) {
  return Boolean(key && (key.admin || key.processes));
}

export function saveSession(value) {
  sessionStorage.setItem(KEY, JSON.stringify(value));
}

export function clearSession() {
  sessionStorage.removeItem(KEY);
}

/** A GDAPI error body as an exception. */
export class ApiError extends Error {
  constructor(status, body) {
    const message = (body && (body.message || body.code)) || `HTTP ${status}`;
    super(message);
    this.status = status;
    this.code = body && body.code;
    this.detail = body && body.detail;
  }
}

let onUnauthorized = () => {};

/** What to do when a request answers 401 (the key was removed or changed). */
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

function basic(access, secret) {
  const bytes = new TextEncoder().encode(`${access}:${secret}`);
  return `Basic ${btoa(String.fromCharCode(...bytes))}`;
}

/** The key in the form the subscribe WebSocket takes it (a subprotocol, never the URL). */
export function socketProtocols(key = session()) {
  const bytes = new TextEncoder().encode(`${key.access}:${key.secret}`);
  const b64url = btoa(String.fromCharCode(...bytes))
    .replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
  return ['drover.v1', `drover.basic.${b64url}`];
}

/**
 * One request. `path` is under /v1 ("containers?name=x") or an absolute link from a
 * response. Answers the parsed JSON; throws ApiError.
 */
export async function request(method, path, body, explicitKey) {
  const key = explicitKey || session();
  const url = /^https?:/.test(path) ? relativeTo(path) : `/v1/${path.replace(/^\/+/, '').replace(/^v1\//, '')}`;
  const headers = { Accept: 'application/json' };
  if (key) headers.Authorization = basic(key.access, key.secret);
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response;
  try {
    response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      // The key travels in the header; no cookies, and no browser login prompt on a 401.
      credentials: 'omit',
      cache: 'no-store',
    });
  } catch (error) {
    throw new ApiError(0, { message: `the server cannot be reached (${error.message})` });
  }
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = { message: text.slice(0, 200) };
  }
  if (!response.ok) {
    const error = new ApiError(response.status, json);
    if (response.status === 401 && !explicitKey) onUnauthorized(error);
    throw error;
  }
  return json;
}

/** Links in responses are absolute (built from the Host header); keep the path and query. */
function relativeTo(link) {
  const url = new URL(link);
  return url.pathname + url.search;
}

export const get = (path) => request('GET', path);
export const post = (path, body) => request('POST', path, body ?? {});
export const put = (path, body) => request('PUT', path, body);
export const del = (path) => request('DELETE', path);

/** Every item of a collection, following `pagination.next` up to `max` items. */
export async function all(path, max = 2000) {
  let page = await get(path);
  const data = [...(page.data || [])];
  while (page.pagination && page.pagination.next && data.length < max) {
    page = await get(page.pagination.next);
    data.push(...(page.data || []));
  }
  return data;
}

/** The newest process of a resource, to show what an action started. */
export async function latestProcess(type, id) {
  if (!seesProcesses()) return null;
  try {
    const page = await get(`processinstances?resourceType=${encodeURIComponent(type)}&resourceId=${encodeURIComponent(id)}&sort=desc&limit=1`);
    return page.data && page.data[0] ? page.data[0] : null;
  } catch {
    return null;
  }
}

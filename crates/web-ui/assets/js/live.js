// The live feed: one subscribe WebSocket for the whole UI, reconnecting with backoff.
// Pages react to events (and refetch, debounced); nothing polls.

import { session, socketProtocols } from './api.js';

/** What every page may react to. */
export const BASE_NAMES = [
  'resource.change', 'state.change', 'process.change', 'agent.ping', 'cluster.change', 'setting.change', 'apikey.change',
];

export class Live {
  constructor() {
    this.listeners = new Set();
    this.statusListeners = new Set();
    this.extra = [];
    this.socket = null;
    this.status = 'closed';
    this.retry = 0;
    this.timer = null;
    this.stopped = true;
  }

  /** The names subscribed now. */
  names() {
    return [...new Set([...BASE_NAMES, ...this.extra])];
  }

  /** Subscribes to more names (the Events page); reconnects when the set changed. */
  setExtra(names) {
    const next = [...new Set(names)].filter((n) => !BASE_NAMES.includes(n));
    if (next.join('\n') === this.extra.join('\n')) return;
    this.extra = next;
    if (!this.stopped) this.reconnect();
  }

  on(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  onStatus(fn) {
    this.statusListeners.add(fn);
    fn(this.status);
    return () => this.statusListeners.delete(fn);
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.socket) this.socket.close(1000, 'logout');
    this.socket = null;
    this.setStatus('closed');
  }

  reconnect() {
    if (this.socket) {
      const old = this.socket;
      this.socket = null;
      old.close(1000, 'resubscribe');
    }
    clearTimeout(this.timer);
    this.connect();
  }

  setStatus(status) {
    this.status = status;
    for (const fn of this.statusListeners) fn(status);
  }

  connect() {
    const key = session();
    if (!key || this.stopped) return;
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    const query = this.names().map((n) => `eventNames=${encodeURIComponent(n)}`).join('&');
    this.setStatus('connecting');
    let socket;
    try {
      socket = new WebSocket(`${scheme}://${location.host}/v1/subscribe?${query}`, socketProtocols(key));
    } catch {
      this.schedule();
      return;
    }
    this.socket = socket;
    let subscribed = false;
    socket.addEventListener('message', (message) => {
      if (this.socket !== socket) return;
      if (!subscribed) {
        // The server sends a ping as soon as the subscription is in place: from here on
        // nothing is missed. Whatever happened before, everyone refetches once.
        subscribed = true;
        this.retry = 0;
        this.setStatus('open');
        this.emit({ name: 'live.open', time: Date.now() });
      }
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return;
      }
      this.emit(event);
    });
    socket.addEventListener('close', () => {
      if (this.socket !== socket) return;
      this.socket = null;
      this.setStatus('closed');
      this.schedule();
    });
  }

  schedule() {
    if (this.stopped) return;
    const wait = Math.min(15000, 500 * 2 ** this.retry) * (0.8 + Math.random() * 0.4);
    this.retry = Math.min(this.retry + 1, 6);
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.connect(), wait);
  }

  emit(event) {
    for (const fn of this.listeners) {
      try {
        fn(event);
      } catch (error) {
        console.error('live listener failed', error);
      }
    }
  }
}

export const live = new Live();

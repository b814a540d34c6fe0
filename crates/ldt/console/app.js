/*
 * Late-Day Tokens Marketplace: web console (app.js).
 *
 * A dependency-free single-page app served by the ldt binary at /console/app.js.
 * Hash routes: #/orders, #/order/<id>, #/attention, #/inventory, #/live, #/faults.
 * It reads the JSON API under /api/v1, the Server-Sent Events stream
 * /api/v1/orders/events and the Prometheus text at /console/metrics.
 * Every piece of server data reaches the DOM through textContent / createElement,
 * never through innerHTML. Each page registers its timers and subscriptions with
 * its own context, which the router disposes of when the page is left.
 */
(function () {
  'use strict';

  // ------------------------------------------------------------------ constants

  const STATUSES = ['PENDING', 'SUCCESS', 'INSUFFICIENT_FUND', 'INSUFFICIENT_INVENTORY', 'TIMEOUT', 'UNKNOWN', 'CANCELLED'];
  const FINAL_STATUSES = STATUSES.filter((s) => s !== 'PENDING');
  const STEPS = ['payment', 'inventory', 'delivery'];
  const TOKEN_KEY = 'ldt-admin-token';
  const UUID_RE = /[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/i;
  const STATUS_COLORS = {
    SUCCESS: '#16a34a', PENDING: '#2563eb', TIMEOUT: '#d97706', INSUFFICIENT_FUND: '#ef4444',
    INSUFFICIENT_INVENTORY: '#be123c', UNKNOWN: '#9f1239', CANCELLED: '#6b7280',
  };
  const PALETTE = ['#2563eb', '#16a34a', '#d97706', '#9333ea', '#0891b2', '#dc2626', '#4b5563', '#db2777', '#65a30d', '#0d9488'];
  const COMPENSATION_KINDS = new Set(['refund', 'release', 'cancel_delivery', 'compensated']);
  const CHART_WINDOW_MS = 120000;

  let config = {
    version: '?', mode: '?', services: [], fault_injection: true,
    admin_token_required: false, trace_url_template: null,
  };
  let memToken = null;

  // ------------------------------------------------------------------ errors

  class ApiError extends Error {
    constructor(status, kind, message) {
      super(message || kind || ('HTTP ' + status));
      this.status = status;
      this.kind = kind;
    }
  }

  function errText(e) {
    if (!e) return 'unknown error';
    if (e instanceof ApiError) return e.message || e.kind || ('HTTP ' + e.status);
    return e.message || String(e);
  }

  let bannerTimer = null;
  function showError(msg) {
    const b = document.getElementById('error-banner');
    if (!b) return;
    setText(b.querySelector('.msg'), msg);
    b.hidden = false;
    clearTimeout(bannerTimer);
    bannerTimer = setTimeout(() => { b.hidden = true; }, 10000);
  }

  function reportError(e) {
    if (e && e.silent) return;
    try { console.error(e); } catch (_) { /* no console */ }
    showError(errText(e));
  }

  /** Wraps a handler so that neither a throw nor a rejected promise escapes. */
  function guard(fn) {
    return function (...args) {
      try {
        const r = fn.apply(this, args);
        if (r && typeof r.then === 'function') return r.then(undefined, reportError);
        return r;
      } catch (e) {
        reportError(e);
        return undefined;
      }
    };
  }

  window.addEventListener('error', (ev) => {
    if (ev && ev.error) showError('Console error: ' + errText(ev.error));
  });
  window.addEventListener('unhandledrejection', (ev) => {
    ev.preventDefault();
    showError(errText(ev.reason));
  });

  // ------------------------------------------------------------------ DOM helpers

  function h(tag, attrs, ...children) {
    const e = document.createElement(tag);
    if (attrs) {
      for (const [k, v] of Object.entries(attrs)) {
        if (v == null || v === false) continue;
        if (k === 'class') e.className = v;
        else if (k === 'text') e.textContent = String(v);
        else if (k.startsWith('on') && typeof v === 'function') e.addEventListener(k.slice(2), guard(v));
        else e.setAttribute(k, v === true ? '' : String(v));
      }
    }
    appendAll(e, children);
    return e;
  }

  function appendAll(e, children) {
    for (const c of children.flat(Infinity)) {
      if (c == null || c === false) continue;
      e.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function setText(node, text) {
    if (!node) return;
    const t = text == null ? '' : String(text);
    if (node.textContent !== t) node.textContent = t;
  }

  function setClass(node, cls) {
    if (node.className !== cls) node.className = cls;
  }

  function field(label, input, extra) {
    return h('label', { class: 'field' + (extra ? ' ' + extra : '') }, h('span', { class: 'field-label', text: label }), input);
  }

  function card(title, ...children) {
    return h('section', { class: 'card' }, title ? h('h2', { class: 'card-title' }, title) : null, ...children);
  }

  function kv(pairs, extra) {
    return h('dl', { class: 'kv' + (extra ? ' ' + extra : '') }, pairs.map(([label, el]) => [h('dt', { text: label }), h('dd', null, el)]));
  }

  function statusClass(s) {
    switch (s) {
      case 'SUCCESS': case 'DELIVERED': case 'done': return 'ok';
      case 'PENDING': case 'running': return 'info';
      case 'TIMEOUT': case 'REFUSED': case 'compensating': return 'warn';
      case 'CANCELLED': return 'muted';
      default: return 'bad';
    }
  }

  function badge(s, id) {
    return h('span', { id: id || null, class: 'badge ' + statusClass(s), text: s });
  }

  function setBadge(span, s) {
    setText(span, s);
    setClass(span, 'badge ' + statusClass(s));
  }

  /** Keeps a tbody's rows in the order of `items`, reusing rows by key (no stale elements). */
  function syncRows(tbody, items, o) {
    const map = tbody._rows || (tbody._rows = new Map());
    const seen = new Set();
    const list = [];
    for (const it of items) {
      const k = String(o.key(it));
      if (seen.has(k)) continue;
      seen.add(k);
      list.push([k, it]);
    }
    if (!list.length) {
      map.clear();
      tbody.replaceChildren(h('tr', { class: 'empty' }, h('td', { colspan: o.cols, text: o.empty || 'Nothing here.' })));
      return;
    }
    list.forEach(([k, it], i) => {
      let tr = map.get(k);
      if (!tr) {
        tr = o.make(k, it);
        tr.setAttribute(o.attr, k);
        map.set(k, tr);
      }
      o.fill(tr, it);
      const at = tbody.children[i];
      if (at !== tr) tbody.insertBefore(tr, at || null);
    });
    while (tbody.children.length > list.length) tbody.lastElementChild.remove();
    for (const k of [...map.keys()]) if (!seen.has(k)) map.delete(k);
  }

  // ------------------------------------------------------------------ formatting

  const pad = (n, w) => String(n).padStart(w || 2, '0');

  function sameDay(a, b) {
    return a.getFullYear() === b.getFullYear() && a.getMonth() === b.getMonth() && a.getDate() === b.getDate();
  }

  /** Local wall-clock time, with the date when not today: 14:03:07.123 / 2024-05-01 14:03:07.123 */
  function fmtTime(ms) {
    if (ms == null || !isFinite(ms)) return '—';
    const d = new Date(Number(ms));
    const t = pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds()) + '.' + pad(d.getMilliseconds(), 3);
    if (sameDay(d, new Date())) return t;
    return d.getFullYear() + '-' + pad(d.getMonth() + 1) + '-' + pad(d.getDate()) + ' ' + t;
  }

  function fullDate(ms) {
    if (ms == null || !isFinite(ms)) return '';
    try { return new Date(Number(ms)).toString(); } catch (_) { return ''; }
  }

  function timeEl(ms, cls) {
    const e = h('time', { class: cls || null, text: fmtTime(ms) });
    if (ms != null && isFinite(ms)) e.title = fullDate(ms);
    return e;
  }

  function setTime(el, ms) {
    setText(el, fmtTime(ms));
    const t = fullDate(ms);
    if (el.title !== t) el.title = t;
  }

  function fmtDur(ms) {
    if (ms == null || !isFinite(ms)) return '—';
    const neg = ms < 0;
    let a = Math.abs(ms);
    let s;
    if (a < 1000) s = Math.round(a) + ' ms';
    else if (a < 10000) s = (a / 1000).toFixed(2) + ' s';
    else if (a < 60000) s = (a / 1000).toFixed(1) + ' s';
    else if (a < 3600000) s = Math.floor(a / 60000) + ' min ' + Math.floor((a % 60000) / 1000) + ' s';
    else if (a < 86400000) s = Math.floor(a / 3600000) + ' h ' + Math.floor((a % 3600000) / 60000) + ' min';
    else { a = Math.floor(a / 3600000); s = Math.floor(a / 24) + ' d ' + (a % 24) + ' h'; }
    return (neg ? '-' : '') + s;
  }

  function relative(ms) {
    const d = Number(ms) - Date.now();
    return d >= 0 ? 'in ' + fmtDur(d) : fmtDur(-d) + ' ago';
  }

  function fmtNum(v, digits) {
    if (v == null || !isFinite(v)) return '0';
    if (digits != null) return Number(v).toFixed(digits);
    const a = Math.abs(v);
    if (a >= 100 || Number.isInteger(v)) return String(Math.round(v));
    if (a >= 10) return v.toFixed(1);
    return v.toFixed(2);
  }

  function shortId(id) { return String(id).slice(0, 8); }
  function orderHref(id) { return '#/order/' + encodeURIComponent(id); }
  function ordersHref(filters) {
    const q = new URLSearchParams();
    if (filters.status) q.set('status', filters.status);
    if (filters.username) q.set('username', filters.username);
    if (filters.since) q.set('since_ms', String(filters.since));
    const s = q.toString();
    return '#/orders' + (s ? '?' + s : '');
  }

  function faultList(faults) {
    const out = [];
    if (faults && typeof faults === 'object') {
      for (const step of STEPS) if (faults[step]) out.push(step + ': ' + faults[step]);
      for (const [k, v] of Object.entries(faults)) if (!STEPS.includes(k) && v) out.push(k + ': ' + v);
    }
    return out;
  }

  function faultNodes(o) {
    const list = faultList(o.faults);
    const nodes = [list.length ? list.join(', ') : '—'];
    if (o.fault_source === 'flags') {
      nodes.push(' ', h('span', { class: 'flag-mark', title: 'Drawn by the runtime fault flags', text: '⚑ flag' }));
    }
    return nodes;
  }

  function num(v) {
    const s = String(v == null ? '' : v).trim();
    if (!s) return null;
    const n = Number(s);
    return isFinite(n) ? n : null;
  }

  function toLocalInput(ms) {
    const d = new Date(ms);
    return d.getFullYear() + '-' + pad(d.getMonth() + 1) + '-' + pad(d.getDate()) + 'T' +
      pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds());
  }

  function decodeSafe(s) {
    try { return decodeURIComponent(s); } catch (_) { return s; }
  }

  /** Of two versions of an order, the more advanced one (a final status beats PENDING). */
  function better(a, b) {
    if (!a) return b;
    if (!b) return a;
    if (a.status !== 'PENDING' && b.status === 'PENDING') return a;
    return b;
  }

  function cmpOrders(a, b) {
    const d = (Number(b.created_at_ms) || 0) - (Number(a.created_at_ms) || 0);
    if (d) return d;
    return a.id < b.id ? 1 : a.id > b.id ? -1 : 0;
  }

  // ------------------------------------------------------------------ HTTP

  async function api(path, opts) {
    opts = opts || {};
    const headers = { Accept: opts.text ? 'text/plain, */*' : 'application/json' };
    let body;
    if (opts.body !== undefined) {
      headers['Content-Type'] = 'application/json';
      body = JSON.stringify(opts.body);
    }
    if (opts.admin) {
      const t = getToken();
      if (t) headers.Authorization = 'Bearer ' + t;
    }
    const ctl = typeof AbortController === 'function' ? new AbortController() : null;
    const timer = ctl ? setTimeout(() => ctl.abort(), opts.timeout || 15000) : null;
    let res;
    let text;
    try {
      res = await fetch(path, {
        method: opts.method || 'GET', headers, body, cache: 'no-store',
        credentials: 'same-origin', signal: ctl ? ctl.signal : undefined,
      });
      text = await res.text();
    } catch (e) {
      throw new ApiError(0, 'network', e && e.name === 'AbortError'
        ? 'the server did not answer in time (' + path + ')'
        : 'cannot reach the server (' + path + ')');
    } finally {
      if (timer) clearTimeout(timer);
    }
    if (!res.ok) {
      let data = null;
      try { data = JSON.parse(text); } catch (_) { /* not JSON */ }
      const kind = data && typeof data.error === 'string' ? data.error : 'http_' + res.status;
      let msg;
      if (data && typeof data.message === 'string' && data.message) msg = data.message;
      else if (text && text.length < 300 && !/^\s*</.test(text)) msg = text.trim();
      else msg = res.status + ' ' + (res.statusText || kind);
      throw new ApiError(res.status, kind, msg);
    }
    if (opts.text) return text;
    if (!text) return null;
    try {
      return JSON.parse(text);
    } catch (_) {
      throw new ApiError(res.status, 'bad_json', 'the server answered ' + path + ' with something that is not JSON');
    }
  }

  // ------------------------------------------------------------------ admin token

  function getToken() {
    try {
      const t = window.localStorage.getItem(TOKEN_KEY);
      if (t) return t;
    } catch (_) { /* storage unavailable */ }
    return memToken;
  }

  function setToken(t) {
    memToken = t || null;
    try {
      if (t) window.localStorage.setItem(TOKEN_KEY, t);
      else window.localStorage.removeItem(TOKEN_KEY);
    } catch (_) { /* storage unavailable: kept in memory */ }
    updateTokenButton();
  }

  function updateTokenButton() {
    const b = document.getElementById('admin-token-button');
    if (b) setText(b, getToken() ? 'Admin token: set ✓' : 'Admin token: not set');
  }

  let tokenPrompt = null;
  /** Shows the token modal; resolves once a token is saved, rejects if dismissed. */
  function askToken(reason) {
    if (tokenPrompt) return tokenPrompt;
    tokenPrompt = new Promise((resolve, reject) => {
      const input = h('input', { id: 'admin-token-input', type: 'password', autocomplete: 'off', spellcheck: 'false', placeholder: 'admin token' });
      const note = h('p', { class: 'modal-note', text: reason || 'This action needs the marketplace admin token.' });
      const err = h('p', { class: 'modal-error' });
      const save = h('button', { id: 'admin-token-save', type: 'button', class: 'btn primary', text: 'Save and continue' });
      const cancel = h('button', { type: 'button', class: 'btn ghost', text: 'Cancel' });
      const forget = getToken() ? h('button', { type: 'button', class: 'link-btn dark', text: 'Forget the stored token' }) : null;
      const box = h('div', { class: 'modal', role: 'dialog', 'aria-modal': 'true', 'aria-labelledby': 'admin-token-title' },
        h('h2', { id: 'admin-token-title', text: 'Admin token' }),
        note,
        field('Token', input, 'wide'),
        err,
        h('p', { class: 'muted small', text: 'It is kept in this browser (localStorage) and sent as a Bearer token with admin actions only.' }),
        h('div', { class: 'modal-actions' }, forget, h('span', { class: 'spacer' }), cancel, save));
      const overlay = h('div', { class: 'overlay' }, box);
      let done = false;
      const close = (ok) => {
        if (done) return;
        done = true;
        overlay.remove();
        document.removeEventListener('keydown', onKey, true);
        tokenPrompt = null;
        if (ok) resolve();
        else reject(new ApiError(401, 'unauthorized', 'this action needs the admin token'));
      };
      const doSave = () => {
        const v = input.value.trim();
        if (!v) { setText(err, 'Enter the token first.'); input.focus(); return; }
        setToken(v);
        close(true);
      };
      const onKey = (e) => {
        if (e.key === 'Escape') { e.preventDefault(); close(false); }
      };
      input.addEventListener('keydown', (e) => { if (e.key === 'Enter') { e.preventDefault(); doSave(); } });
      save.addEventListener('click', doSave);
      cancel.addEventListener('click', () => close(false));
      if (forget) forget.addEventListener('click', () => { setToken(null); setText(err, 'Forgotten.'); forget.remove(); });
      document.addEventListener('keydown', onKey, true);
      document.body.appendChild(overlay);
      setTimeout(() => { try { input.focus(); } catch (_) { /* ignore */ } }, 0);
    });
    return tokenPrompt;
  }

  /** An admin call: sends the stored token, asks for one when needed and retries. */
  async function adminApi(path, opts) {
    if (config.admin_token_required && !getToken()) {
      await askToken('This marketplace requires an admin token for this action.');
    }
    for (let tries = 0; ; tries++) {
      try {
        return await api(path, Object.assign({}, opts, { admin: true }));
      } catch (e) {
        if (e instanceof ApiError && e.status === 401 && tries < 3) {
          const had = !!getToken();
          await askToken(had
            ? 'The server refused the stored admin token (' + errText(e) + '). Enter the right one.'
            : 'This action needs the marketplace admin token.');
          continue;
        }
        throw e;
      }
    }
  }

  // ------------------------------------------------------------------ live order stream

  const stream = {
    es: null,
    subs: new Set(),
    retry: null,
    subscribe(fn) {
      this.subs.add(fn);
      this.open();
      return () => {
        this.subs.delete(fn);
        if (!this.subs.size) this.close();
      };
    },
    open() {
      if (this.es) return;
      if (typeof window.EventSource !== 'function') { this.state('unsupported'); return; }
      clearTimeout(this.retry);
      let es;
      try {
        // Gathered into one event every 250 ms: at a thousand orders a second, one event per
        // change costs the browser far more than the list it updates.
        es = new EventSource('/api/v1/orders/events?coalesce_ms=250');
      } catch (_) {
        this.state('off');
        return;
      }
      this.es = es;
      this.state('connecting');
      const deliver = (o) => {
        if (!o || typeof o !== 'object' || !o.id || !o.status) return;
        for (const fn of [...this.subs]) {
          try { fn(o); } catch (e) { reportError(e); }
        }
      };
      const onMsg = (ev) => {
        let o;
        try { o = JSON.parse(ev.data); } catch (_) { return; }
        if (Array.isArray(o)) o.forEach(deliver); else deliver(o);
      };
      es.addEventListener('orders', onMsg);
      es.addEventListener('order', onMsg);
      es.onmessage = onMsg;
      es.onopen = () => this.state('live');
      es.onerror = () => {
        if (es.readyState === 2) { // CLOSED: the browser gave up; try again later
          if (this.es === es) this.es = null;
          this.state('off');
          if (this.subs.size) this.retry = setTimeout(() => this.open(), 3000);
        } else {
          this.state('connecting');
        }
      };
    },
    close() {
      clearTimeout(this.retry);
      if (this.es) { try { this.es.close(); } catch (_) { /* ignore */ } }
      this.es = null;
      this.state('idle');
    },
    state(s) {
      const el = document.getElementById('sse-state');
      if (!el) return;
      el.dataset.state = s;
      const labels = { live: 'live updates on', connecting: 'connecting to stream…', off: 'stream offline (polling)', idle: 'stream idle', unsupported: 'no stream support (polling)' };
      setText(el.querySelector('.label'), labels[s] || s);
    },
  };

  // ------------------------------------------------------------------ attention badge

  async function refreshAttentionBadge() {
    const [s, d] = await Promise.allSettled([api('/api/v1/sagas?state=stuck'), api('/api/v1/dead-letters?limit=100')]);
    let n = 0;
    let more = false;
    let ok = false;
    if (s.status === 'fulfilled' && s.value) {
      ok = true;
      n += Array.isArray(s.value.sagas) ? s.value.sagas.length : 0;
      if (s.value.next != null) more = true;
    }
    if (d.status === 'fulfilled' && Array.isArray(d.value)) {
      ok = true;
      n += d.value.filter((x) => x && x.replayed_at_ms == null).length;
    }
    const b = document.getElementById('attention-badge');
    if (!b || !ok) return;
    setText(b, n + (more ? '+' : ''));
    b.hidden = n === 0;
    b.title = n + (more ? '+' : '') + ' stuck saga(s) and unreplayed dead letter(s)';
  }

  // ------------------------------------------------------------------ page context and router

  class PageCtx {
    constructor() {
      this.alive = true;
      this.timers = new Set();
      this.cleanups = [];
    }
    /** Runs fn every ms, never overlapping itself, until the page is left. */
    every(ms, fn) {
      const g = guard(fn);
      let busy = false;
      const id = setInterval(() => {
        if (!this.alive || busy) return;
        busy = true;
        Promise.resolve(g()).finally(() => { busy = false; });
      }, ms);
      this.timers.add(id);
      return id;
    }
    after(ms, fn) {
      const id = setTimeout(() => {
        this.timers.delete(id);
        if (this.alive) guard(fn)();
      }, ms);
      this.timers.add(id);
      return id;
    }
    clear(id) {
      if (id == null) return;
      clearTimeout(id);
      clearInterval(id);
      this.timers.delete(id);
    }
    onDispose(fn) { this.cleanups.push(fn); }
    dispose() {
      this.alive = false;
      for (const id of this.timers) { clearTimeout(id); clearInterval(id); }
      this.timers.clear();
      for (const f of this.cleanups) { try { f(); } catch (_) { /* ignore */ } }
      this.cleanups = [];
    }
  }

  const ROUTES = [
    [/^\/orders\/?$/, 'orders', 'Orders', pageOrders],
    [/^\/order\/(.+)$/, 'orders', 'Order', pageOrder],
    [/^\/attention\/?$/, 'attention', 'Attention', pageAttention],
    [/^\/inventory\/?$/, 'inventory', 'Inventory & users', pageInventory],
    [/^\/live\/?$/, 'live', 'Live', pageLive],
    [/^\/faults\/?$/, 'faults', 'Faults', pageFaults],
  ];

  let current = null;

  function route() {
    let hash = (location.hash || '').replace(/^#/, '');
    if (!hash || hash === '/') {
      history.replaceState(null, '', '#/orders');
      hash = '/orders';
    }
    const qi = hash.indexOf('?');
    const path = qi < 0 ? hash : hash.slice(0, qi);
    const query = new URLSearchParams(qi < 0 ? '' : hash.slice(qi + 1));
    if (current) current.dispose();
    current = null;
    const main = document.getElementById('main');
    main.replaceChildren();
    for (const [re, nav, title, fn] of ROUTES) {
      const m = path.match(re);
      if (!m) continue;
      const ctx = new PageCtx();
      current = ctx;
      for (const a of document.querySelectorAll('.nav a')) a.classList.toggle('active', a.dataset.nav === nav);
      document.title = title + ' · LDT console';
      guard(fn)(ctx, main, m, query);
      window.scrollTo(0, 0);
      return;
    }
    history.replaceState(null, '', '#/orders');
    route();
  }

  // ------------------------------------------------------------------ page: orders

  function pageOrders(ctx, main, _m, query) {
    const f = {
      status: STATUSES.includes(query.get('status')) ? query.get('status') : '',
      username: (query.get('username') || '').trim(),
      since: Number(query.get('since_ms')) > 0 ? Number(query.get('since_ms')) : null,
    };
    const st = { gen: 0, orders: new Map(), seen: new Map(), cursor: null, olderLoaded: false, loaded: false, trimmed: false, error: null };

    // counts
    const countSpans = {};
    const totalSpan = h('span', { class: 'chip-num', text: '0' });
    const counts = h('div', { id: 'order-counts', class: 'chips' });
    for (const s of STATUSES) {
      const n = h('span', { class: 'count', 'data-status': s, text: '0' });
      countSpans[s] = n;
      counts.append(h('button', {
        type: 'button', class: 'chip chip-' + statusClass(s), title: 'Show only ' + s + ' orders',
        onclick: () => { statusSel.value = s; applyFilters(); },
      }, h('span', { class: 'chip-label', text: s }), n));
    }
    counts.append(h('span', { class: 'chip chip-total' }, h('span', { class: 'chip-label', text: 'total' }), totalSpan));

    // search
    const search = h('input', { id: 'order-search', type: 'text', placeholder: 'Go to order id… (Enter)', autocomplete: 'off', spellcheck: 'false' });
    search.addEventListener('keydown', (e) => {
      if (e.key !== 'Enter') return;
      e.preventDefault();
      const v = search.value.trim();
      if (!v) return;
      const m = v.match(UUID_RE);
      location.hash = orderHref(m ? m[0] : v);
    });

    // new order form
    const nu = h('input', { id: 'new-username', type: 'text', placeholder: 'alice', autocomplete: 'off', spellcheck: 'false' });
    const np = h('input', { id: 'new-price', type: 'number', placeholder: '10', step: '1', min: '0' });
    const na = h('input', { id: 'new-amount', type: 'number', placeholder: '1', step: '1', min: '1' });
    const fs = h('select', { id: 'new-fault-step' }, h('option', { value: '', text: 'no fault' }), STEPS.map((s) => h('option', { value: s, text: s })));
    const fk = h('select', { id: 'new-fault-kind' }, h('option', { value: 'kill', text: 'kill' }), h('option', { value: 'timeout', text: 'timeout' }));
    const nb = h('button', { id: 'new-order-submit', type: 'submit', class: 'btn primary', text: 'Place order' });
    const nr = h('div', { id: 'new-order-result', class: 'form-result', 'aria-live': 'polite' });
    const form = h('form', { class: 'inline-form', novalidate: true, autocomplete: 'off' },
      field('Username', nu), field('Price', np, 'narrow'), field('Amount', na, 'narrow'),
      field('Fault at step', fs), field('Fault kind', fk), h('div', { class: 'field field-btn' }, nb));
    form.addEventListener('submit', (e) => { e.preventDefault(); guard(placeOrder)(); });

    async function placeOrder() {
      const price = num(np.value);
      const amount = num(na.value);
      if (price === null || amount === null) {
        setClass(nr, 'form-result error');
        nr.replaceChildren('Price and amount must be numbers.');
        return;
      }
      const body = { username: nu.value.trim(), price, amount };
      if (fs.value) body.faults = { [fs.value]: fk.value };
      nb.disabled = true;
      setClass(nr, 'form-result');
      nr.replaceChildren('Placing the order…');
      try {
        const o = await api('/api/v1/orders', { method: 'POST', body });
        if (!o || !o.id) throw new ApiError(0, 'bad_answer', 'the server did not return the new order');
        setClass(nr, 'form-result ok');
        nr.replaceChildren('Placed order ', h('a', { href: orderHref(o.id), class: 'mono', text: o.id }), ' ', badge(o.status || 'PENDING'));
        if (ctx.alive) onOrder(o);
      } catch (e) {
        setClass(nr, 'form-result error');
        nr.replaceChildren(errText(e));
        showError('New order: ' + errText(e));
      } finally {
        nb.disabled = false;
      }
    }

    // filters
    const statusSel = h('select', { id: 'filter-status' }, h('option', { value: '', text: 'All statuses' }), STATUSES.map((s) => h('option', { value: s, text: s })));
    statusSel.value = f.status;
    const userIn = h('input', { id: 'filter-username', type: 'text', placeholder: 'any user', autocomplete: 'off', spellcheck: 'false' });
    userIn.value = f.username;
    const sinceIn = h('input', { id: 'filter-since', type: 'datetime-local', step: '1' });
    if (f.since) sinceIn.value = toLocalInput(f.since);
    const clearBtn = h('button', {
      type: 'button', class: 'btn ghost', text: 'Clear filters',
      onclick: () => { statusSel.value = ''; userIn.value = ''; sinceIn.value = ''; applyFilters(); },
    });
    const caption = h('span', { class: 'muted small caption' });
    statusSel.addEventListener('change', guard(applyFilters));
    sinceIn.addEventListener('change', guard(applyFilters));
    let sinceTimer = null;
    sinceIn.addEventListener('input', () => { ctx.clear(sinceTimer); sinceTimer = ctx.after(500, applyFilters); });
    let userTimer = null;
    userIn.addEventListener('input', () => { ctx.clear(userTimer); userTimer = ctx.after(350, applyFilters); });
    userIn.addEventListener('change', () => { ctx.clear(userTimer); guard(applyFilters)(); });
    userIn.addEventListener('keydown', (e) => {
      if (e.key === 'Enter') { e.preventDefault(); ctx.clear(userTimer); guard(applyFilters)(); }
    });

    function applyFilters() {
      let since = sinceIn.value ? new Date(sinceIn.value).getTime() : null;
      if (since != null && !isFinite(since)) since = null;
      const nf = { status: statusSel.value, username: userIn.value.trim(), since };
      if (nf.status === f.status && nf.username === f.username && nf.since === f.since) return;
      Object.assign(f, nf);
      history.replaceState(null, '', ordersHref(f));
      reload();
    }

    function matches(o) {
      return (!f.status || o.status === f.status) &&
        (!f.username || o.username === f.username) &&
        (!f.since || Number(o.created_at_ms) >= f.since);
    }

    function listUrl(before) {
      const q = new URLSearchParams({ limit: '50', newest_first: 'true' });
      if (before != null) q.set('before', String(before));
      if (f.username) q.set('username', f.username);
      if (f.status) q.set('status', f.status);
      if (f.since) q.set('since_ms', String(f.since));
      return '/api/v1/orders?' + q.toString();
    }

    // table
    const tbody = h('tbody');
    const table = h('table', { id: 'orders-table', class: 'table' },
      h('thead', null, h('tr', null, ['Order', 'User', 'Price × amount', 'Status', 'Faults', 'Created', 'Duration']
        .map((t, i) => h('th', { class: i === 2 || i === 6 ? 'num' : null, text: t })))),
      tbody);
    const older = h('button', { id: 'orders-older', type: 'button', class: 'btn', text: 'Older orders', onclick: () => loadOlder() });

    function makeRow(id) {
      const tr = h('tr');
      const c = {
        id: h('td', { class: 'mono' }), user: h('td'), qty: h('td', { class: 'num' }), status: h('td', { class: 'status' }),
        faults: h('td', { class: 'faults' }), created: h('td', { class: 'time' }), dur: h('td', { class: 'num' }),
      };
      c.link = h('a', { href: orderHref(id), title: id, text: shortId(id) });
      c.id.append(c.link);
      c.userLink = h('a', { class: 'plain-link' });
      c.user.append(c.userLink);
      c.badge = h('span', { class: 'badge' });
      c.status.append(c.badge);
      tr.append(c.id, c.user, c.qty, c.status, c.faults, c.created, c.dur);
      tr._c = c;
      return tr;
    }

    function fillRow(tr, o) {
      const c = tr._c;
      setText(c.userLink, o.username);
      const href = ordersHref({ username: o.username });
      if (c.userLink.getAttribute('href') !== href) c.userLink.setAttribute('href', href);
      setText(c.qty, o.price + ' × ' + o.amount);
      setBadge(c.badge, o.status);
      const fsig = faultList(o.faults).join(',') + '|' + o.fault_source;
      if (c.faults._sig !== fsig) { c.faults._sig = fsig; c.faults.replaceChildren(...faultNodes(o)); }
      setTime(c.created, o.created_at_ms);
      setText(c.dur, o.finished_at_ms != null ? fmtDur(o.finished_at_ms - o.created_at_ms) : '—');
      tr.classList.toggle('is-pending', o.status === 'PENDING');
    }

    function render() {
      const list = [...st.orders.values()].sort(cmpOrders);
      const filtered = f.status || f.username || f.since;
      syncRows(tbody, list, {
        key: (o) => o.id, attr: 'data-order-id', make: makeRow, fill: fillRow, cols: 7,
        empty: st.error && !st.loaded ? 'Could not load orders: ' + st.error
          : !st.loaded ? 'Loading…' : filtered ? 'No orders match these filters.' : 'No orders yet.',
      });
      older.disabled = st.cursor == null;
      setText(older, st.cursor == null ? (st.loaded ? 'No older orders' : 'Older orders') : 'Older orders');
      setText(caption, st.loaded ? list.length + ' order' + (list.length === 1 ? '' : 's') + ' shown, newest first' : '');
    }

    // At a thousand orders a second the live list would grow without end, and every render
    // would sort it and every new order scan it (a browser took half a core on the server's
    // machine in the benchmark). While only the first page is loaded, the list keeps the
    // newest orders and now and then takes a fresh first page, and with it the cursor
    // "Older orders" continues from.
    const LIVE_ROWS = 100;
    let refreshQueued = false;
    function trim() {
      if (st.olderLoaded || st.orders.size <= LIVE_ROWS) return;
      const keep = [...st.orders.values()].sort(cmpOrders).slice(0, LIVE_ROWS / 2);
      st.orders = new Map(keep.map((o) => [o.id, o]));
      st.trimmed = true;
      if (refreshQueued) return;
      refreshQueued = true;
      ctx.after(2000, () => { refreshQueued = false; return loadFirst(false); });
    }

    let renderQueued = false;
    function scheduleRender() {
      if (renderQueued) return;
      renderQueued = true;
      ctx.after(100, () => { renderQueued = false; trim(); render(); });
    }

    async function loadFirst(reset) {
      const gen = st.gen;
      const started = Date.now();
      let page;
      try {
        page = await api(listUrl(null));
      } catch (e) {
        if (!ctx.alive || gen !== st.gen) return;
        st.error = errText(e);
        if (!st.loaded) render();
        showError('Orders: ' + errText(e));
        return;
      }
      if (!ctx.alive || gen !== st.gen) return;
      st.error = null;
      const P = page && Array.isArray(page.orders) ? page.orders.filter((o) => o && o.id) : [];
      const next = new Map();
      if (!reset) {
        let minP = Infinity;
        let maxP = -Infinity;
        for (const o of P) { minP = Math.min(minP, o.created_at_ms); maxP = Math.max(maxP, o.created_at_ms); }
        for (const o of st.orders.values()) {
          const seenAt = st.seen.get(o.id) || 0;
          if (seenAt >= started || (P.length && o.created_at_ms > maxP)) next.set(o.id, o);
          else if (st.olderLoaded && P.length && o.created_at_ms < minP) next.set(o.id, o);
        }
      }
      for (const o of P) next.set(o.id, better(next.get(o.id) || st.orders.get(o.id), o));
      for (const [id, o] of next) if (!matches(o)) next.delete(id);
      st.orders = next;
      if (reset || !st.olderLoaded) st.cursor = page && page.next != null ? page.next : null;
      st.loaded = true;
      st.trimmed = false;
      for (const [id, t] of st.seen) if (t < started - 60000) st.seen.delete(id);
      render();
    }

    async function loadOlder() {
      // A trimmed list's cursor is behind what it shows: a fresh first page first.
      if (st.trimmed) await loadFirst(false);
      if (st.cursor == null) return;
      const gen = st.gen;
      older.disabled = true;
      setText(older, 'Loading…');
      try {
        const page = await api(listUrl(st.cursor));
        if (!ctx.alive || gen !== st.gen) return;
        for (const o of (page && page.orders) || []) {
          if (o && o.id && matches(o)) st.orders.set(o.id, better(st.orders.get(o.id), o));
        }
        st.cursor = page && page.next != null ? page.next : null;
        st.olderLoaded = true;
      } catch (e) {
        showError('Older orders: ' + errText(e));
      } finally {
        if (ctx.alive && gen === st.gen) render();
      }
    }

    function reload() {
      st.gen++;
      st.orders = new Map();
      st.cursor = null;
      st.olderLoaded = false;
      st.loaded = false;
      st.error = null;
      render();
      return loadFirst(true);
    }

    /** A new or changed order (from the stream or the form). */
    function onOrder(o) {
      st.seen.set(o.id, Date.now());
      const had = st.orders.get(o.id);
      const merged = better(had, o);
      if (!matches(merged)) {
        if (had) st.orders.delete(o.id);
      } else if (had) {
        st.orders.set(o.id, merged);
      } else {
        let oldest = Infinity;
        for (const x of st.orders.values()) oldest = Math.min(oldest, x.created_at_ms);
        if (st.cursor == null || !st.orders.size || o.created_at_ms >= oldest) st.orders.set(o.id, merged);
      }
      scheduleRender();
      scheduleCounts();
    }

    async function loadCounts() {
      let c;
      try {
        c = await api('/api/v1/orders/counts');
      } catch (e) {
        if (ctx.alive) showError('Order counts: ' + errText(e));
        return;
      }
      if (!ctx.alive || !c || typeof c !== 'object') return;
      let total = 0;
      for (const [k, v] of Object.entries(c)) if (isFinite(v)) total += Number(v);
      for (const s of STATUSES) {
        const n = Number(c[s]) || 0;
        setText(countSpans[s], String(n));
        countSpans[s].parentNode.classList.toggle('zero', n === 0);
      }
      setText(totalSpan, String(total));
    }

    let countsQueued = false;
    function scheduleCounts() {
      if (countsQueued) return;
      countsQueued = true;
      ctx.after(700, () => { countsQueued = false; return loadCounts(); });
    }

    main.append(
      h('div', { class: 'page-head' }, h('h1', { text: 'Orders' }), h('div', { class: 'head-tools' }, search)),
      counts,
      card('New order', form, nr),
      h('section', { class: 'card' },
        h('div', { class: 'toolbar' },
          field('Status', statusSel), field('Username', userIn), field('Created since', sinceIn), clearBtn,
          h('span', { class: 'spacer' }), caption),
        h('div', { class: 'table-wrap' }, table),
        h('div', { class: 'table-foot' }, older)));

    render();
    ctx.onDispose(stream.subscribe((o) => onOrder(o)));
    loadFirst(true);
    loadCounts();
    ctx.every(5000, () => Promise.all([loadFirst(false), loadCounts()]));
  }

  // ------------------------------------------------------------------ page: one order

  function pageOrder(ctx, main, m) {
    const id = decodeSafe(m[1]).trim();
    if (!id) { location.hash = '#/orders'; return; }
    const enc = encodeURIComponent(id);
    let order = null;
    let saga = null;
    let gone = false;
    let extra = 0;
    let userFor = null;

    // header
    const statusEl = h('span', { id: 'order-status', class: 'badge muted', text: '…' });
    const traceSlot = h('span', { class: 'trace-slot' });
    const cancelBtn = h('button', { id: 'cancel-order', type: 'button', class: 'btn danger', text: 'Cancel order', hidden: true });
    let armed = false;
    let armTimer = null;
    let cancelRequested = false;
    const disarm = () => {
      armed = false;
      ctx.clear(armTimer);
      if (!cancelRequested) { setText(cancelBtn, 'Cancel order'); cancelBtn.classList.remove('armed'); }
    };
    cancelBtn.addEventListener('click', guard(async () => {
      if (cancelRequested || cancelBtn.disabled) return;
      if (!armed) {
        armed = true;
        setText(cancelBtn, 'Really cancel?');
        cancelBtn.classList.add('armed');
        armTimer = ctx.after(8000, disarm);
        return;
      }
      ctx.clear(armTimer);
      armed = false;
      cancelBtn.disabled = true;
      setText(cancelBtn, 'Cancelling…');
      try {
        const o = await adminApi('/api/v1/orders/' + enc + '/cancel', { method: 'POST' });
        cancelRequested = true;
        cancelBtn.classList.remove('armed');
        setText(cancelBtn, 'Cancellation requested');
        if (o && o.id) applyOrder(o);
      } catch (e) {
        cancelBtn.disabled = false;
        disarm();
        showError('Cancel: ' + errText(e));
      }
      refresh();
    }));

    // details
    const d = {};
    const val = (key) => (d[key] = h('span', { id: 'order-' + key, text: '—' }));
    d.userLink = h('a', { id: 'order-user', href: '#/inventory', text: '—' });
    const details = card('Order',
      kv([
        ['User', d.userLink], ['Price', val('price')], ['Amount', val('amount')], ['Total', val('total')],
        ['Faults', val('faults')], ['Fault source', val('fault-source')],
        ['Created', val('created')], ['Finished', val('finished')], ['Duration', val('duration')],
      ]));

    // user
    const credits = h('span', { id: 'user-credits', class: 'big-inline', text: '—' });
    const userName = h('span', { class: 'mono' });
    const delBody = h('tbody');
    const userCard = card('User',
      kv([['Name', userName], ['Credits', credits]]),
      h('h3', { class: 'sub-title', text: 'Deliveries' }),
      h('div', { class: 'table-wrap scroll-y' }, h('table', { id: 'user-deliveries', class: 'table compact' },
        h('thead', null, h('tr', null, h('th', { text: 'Order' }), h('th', { class: 'num', text: 'Amount' }), h('th', { text: 'Status' }), h('th', { text: 'Updated' }))),
        delBody)));

    // saga
    const sg = {
      phase: h('span', { id: 'saga-phase', class: 'badge muted', text: '—' }),
      step: h('span', { id: 'saga-step', text: '—' }),
      status: h('span', { id: 'saga-status', text: '—' }),
      pending: h('span', { id: 'saga-pending', text: '—' }),
      attempts: h('span', { id: 'saga-attempts', text: '—' }),
      deadline: h('span', { id: 'saga-deadline', text: '—' }),
      stuck: h('span', { id: 'saga-stuck', text: '—' }),
    };
    const retryBtn = h('button', { id: 'retry-saga', type: 'button', class: 'btn warn', text: 'Retry compensation', hidden: true });
    retryBtn.addEventListener('click', guard(async () => {
      retryBtn.disabled = true;
      setText(retryBtn, 'Retrying…');
      try {
        const v = await adminApi('/api/v1/sagas/' + enc + '/retry', { method: 'POST' });
        if (v && v.order_id) applySaga(v);
        guard(refreshAttentionBadge)();
      } catch (e) {
        showError('Retry: ' + errText(e));
      } finally {
        retryBtn.disabled = false;
        setText(retryBtn, 'Retry compensation');
      }
      refresh();
    }));
    const sagaNote = h('p', { class: 'muted', text: 'Loading the saga…' });
    const timeline = h('ol', { id: 'timeline', class: 'timeline' });
    const sagaCard = h('section', { class: 'card saga-card' },
      h('div', { class: 'card-head' }, h('h2', { class: 'card-title', text: 'Saga' }), retryBtn),
      kv([
        ['Phase', sg.phase], ['Step', sg.step], ['Saga status', sg.status], ['Pending compensations', sg.pending],
        ['Attempts', sg.attempts], ['Next deadline', sg.deadline], ['Stuck reason', sg.stuck],
      ], 'two-col'),
      h('h3', { class: 'sub-title', text: 'Timeline' }),
      sagaNote,
      timeline);

    const notFound = h('section', { class: 'card notice bad', hidden: true });
    const body = h('div', { class: 'order-body' }, h('div', { class: 'grid-2' }, details, userCard), sagaCard);

    main.append(
      h('div', { class: 'page-head' },
        h('div', null, h('a', { href: '#/orders', class: 'back', text: '← Orders' }),
          h('h1', { class: 'order-title' }, 'Order ', h('span', { class: 'mono', text: id }))),
        h('div', { class: 'head-tools' }, statusEl, traceSlot, cancelBtn)),
      notFound, body);

    function applyOrder(o) {
      const prev = order;
      order = better(prev, o);
      o = order;
      setBadge(statusEl, o.status);
      cancelBtn.hidden = o.status !== 'PENDING';
      setText(d.userLink, o.username);
      const uh = '#/inventory?user=' + encodeURIComponent(o.username);
      if (d.userLink.getAttribute('href') !== uh) d.userLink.setAttribute('href', uh);
      setText(d.price, o.price);
      setText(d.amount, o.amount);
      setText(d.total, isFinite(o.price * o.amount) ? String(o.price * o.amount) : '—');
      const fsig = faultList(o.faults).join(',') + '|' + o.fault_source;
      if (d.faults._sig !== fsig) { d.faults._sig = fsig; d.faults.replaceChildren(...faultNodes(o)); }
      setText(d['fault-source'], o.fault_source || '—');
      setTime(d.created, o.created_at_ms);
      setTime(d.finished, o.finished_at_ms);
      updateDuration();
      if (config.trace_url_template && o.trace_id && !traceSlot.firstChild) {
        const url = String(config.trace_url_template).split('{trace_id}').join(encodeURIComponent(o.trace_id));
        if (/^https?:\/\//i.test(url) || url.startsWith('/')) {
          traceSlot.append(h('a', { id: 'trace-link', class: 'btn ghost', href: url, target: '_blank', rel: 'noopener noreferrer', text: 'View trace ↗', title: 'Trace ' + o.trace_id }));
        }
      }
      if (prev && prev.status === 'PENDING' && o.status !== 'PENDING') extra = 1;
      document.title = 'Order ' + shortId(o.id) + ' ' + o.status + ' · LDT console';
    }

    function updateDuration() {
      if (!order) return;
      if (order.finished_at_ms != null) setText(d.duration, fmtDur(order.finished_at_ms - order.created_at_ms));
      else setText(d.duration, 'running for ' + fmtDur(Date.now() - order.created_at_ms));
    }

    function updateDeadline() {
      if (saga && saga.deadline_at_ms != null) setText(sg.deadline, fmtTime(saga.deadline_at_ms) + ' (' + relative(saga.deadline_at_ms) + ')');
      else setText(sg.deadline, '—');
    }

    function applySaga(s) {
      saga = s;
      setBadge(sg.phase, s.phase || '—');
      setText(sg.step, s.step || '—');
      if (s.status) {
        if (sg.status._v !== s.status) { sg.status._v = s.status; sg.status.replaceChildren(badge(s.status)); }
      } else if (sg.status._v !== null) { sg.status._v = null; sg.status.replaceChildren('not decided'); }
      const pend = Array.isArray(s.pending_compensations) ? s.pending_compensations : [];
      setText(sg.pending, pend.length ? pend.join(' → ') : 'none');
      setText(sg.attempts, String(s.attempts || 0));
      updateDeadline();
      setText(sg.stuck, s.stuck_reason || '—');
      sg.stuck.classList.toggle('stuck-text', !!s.stuck_reason);
      retryBtn.hidden = !(s.stuck_reason || Number(s.attempts) > 0);
      sagaCard.classList.toggle('is-stuck', !!s.stuck_reason);
      if (Array.isArray(s.log)) renderTimeline(s.log);
    }

    function entrySig(e) { return [e.at_ms, e.step, e.kind, e.event].join('|'); }

    function renderTimeline(log) {
      const items = timeline.children;
      let prefixOk = items.length <= log.length;
      for (let i = 0; prefixOk && i < items.length; i++) if (items[i]._sig !== entrySig(log[i])) prefixOk = false;
      if (!prefixOk) timeline.replaceChildren();
      const t0 = log.length ? Number(log[0].at_ms) : 0;
      for (let i = timeline.children.length; i < log.length; i++) timeline.append(makeEvent(log[i], t0, log[i - 1]));
      sagaNote.hidden = log.length > 0;
      if (!log.length) setText(sagaNote, 'The saga has logged nothing yet.');
    }

    function makeEvent(e, t0, prev) {
      const kind = String(e.kind || '');
      const text = String(e.event == null ? '' : e.event);
      const cls = ['event'];
      const tags = [];
      if (COMPENSATION_KINDS.has(kind)) { cls.push('compensation'); tags.push('compensation'); }
      if (/^late\b/i.test(text) || /duplicate/i.test(text)) { cls.push('ignored'); tags.push('ignored'); }
      if (kind === 'deadline' || (kind !== 'order_finished' && /^timeout\b/.test(text))) { cls.push('deadline'); tags.push('deadline'); }
      if (/^stuck\b/i.test(text) || kind === 'compensation_failed') { cls.push('stuck'); tags.push('stuck'); }
      if (kind === 'retry') cls.push('retry');
      if (kind === 'cancel') cls.push('operator');
      if (kind === 'order_placed') cls.push('start');
      if (kind === 'order_finished') cls.push('finished');
      if (/^(insufficient|failed|refused)\b/i.test(text)) cls.push('failure');
      if (/^done\b/i.test(text)) cls.push('success');
      const li = h('li', { class: cls.join(' '), 'data-kind': kind, 'data-step': e.step == null ? '' : e.step });
      li._sig = entrySig(e);
      const off = Number(e.at_ms) - t0;
      const offEl = h('span', { class: 'ev-off', text: '+' + fmtDur(off) });
      if (prev) offEl.title = '+' + fmtDur(Number(e.at_ms) - Number(prev.at_ms)) + ' after the previous entry';
      const textEl = kind === 'order_finished' && STATUSES.includes(text)
        ? h('span', { class: 'ev-text' }, badge(text))
        : h('span', { class: 'ev-text', text });
      appendAll(li, [
        h('span', { class: 'ev-dot', 'aria-hidden': 'true' }),
        timeEl(e.at_ms, 'ev-time'),
        offEl,
        h('span', { class: 'ev-step', text: e.step || '—' }),
        h('span', { class: 'ev-kind', text: kind }),
        textEl,
        tags.length ? h('span', { class: 'ev-tags' }, tags.map((t) => h('span', { class: 'ev-tag ' + t, text: t }))) : null]);
      return li;
    }

    function fillDelivery(tr, x) {
      const c = tr._c;
      setText(c.link, shortId(x.order_id));
      setText(c.amount, x.amount);
      setBadge(c.badge, x.status);
      setTime(c.time, x.updated_at_ms != null ? x.updated_at_ms : x.created_at_ms);
      tr.classList.toggle('current', x.order_id === id);
    }

    async function loadUser(username) {
      const [u, ds] = await Promise.allSettled([
        api('/api/v1/users/' + encodeURIComponent(username)),
        api('/api/v1/deliveries?username=' + encodeURIComponent(username)),
      ]);
      if (!ctx.alive) return;
      setText(userName, username);
      if (u.status === 'fulfilled' && u.value) setText(credits, u.value.credits);
      else if (u.status === 'rejected' && u.reason.status === 404) setText(credits, 'unknown user');
      else if (u.status === 'rejected' && userFor !== username) showError('User: ' + errText(u.reason));
      if (ds.status === 'fulfilled') {
        const list = Array.isArray(ds.value) ? ds.value.slice().reverse() : [];
        syncRows(delBody, list, {
          key: (x) => x.order_id, attr: 'data-order-id', cols: 4, empty: 'No deliveries.',
          make: deliveryRowMaker, fill: fillDelivery,
        });
      }
      userFor = username;
    }

    function showNotFound(msg) {
      gone = true;
      body.hidden = true;
      cancelBtn.hidden = true;
      setBadge(statusEl, 'not found');
      notFound.hidden = false;
      notFound.replaceChildren(
        h('h2', { class: 'card-title', text: 'No such order' }),
        h('p', { text: msg || ('There is no order with id ' + id + '.') }),
        h('p', null, h('a', { href: '#/orders', text: 'Back to the orders' })));
    }

    async function doRefresh() {
      const [or, sr] = await Promise.allSettled([api('/api/v1/orders/' + enc), api('/api/v1/sagas/' + enc)]);
      if (!ctx.alive) return;
      if (or.status === 'fulfilled' && or.value) {
        applyOrder(or.value);
      } else if (or.status === 'rejected') {
        if (or.reason.status === 404 && !order) { showNotFound(or.reason.message); return; }
        showError('Order: ' + errText(or.reason));
      }
      if (sr.status === 'fulfilled' && sr.value) {
        applySaga(sr.value);
      } else if (sr.status === 'rejected') {
        if (sr.reason.status === 404) {
          if (!saga) setText(sagaNote, 'No saga for this order yet.');
        } else {
          showError('Saga: ' + errText(sr.reason));
        }
      }
      if (order) await loadUser(order.username);
    }

    let running = null;
    let again = false;
    function refresh() {
      if (running) { again = true; return running; }
      running = (async () => {
        try {
          do { again = false; await doRefresh(); } while (again && ctx.alive && !gone);
        } catch (e) {
          reportError(e);
        } finally {
          running = null;
        }
      })();
      return running;
    }

    let tick = 0;
    ctx.every(1000, () => {
      tick++;
      updateDeadline();
      if (order && order.status === 'PENDING') updateDuration();
      if (gone) return undefined;
      if (!order || order.status === 'PENDING') return refresh();
      if (extra > 0) { extra--; return refresh(); }
      if (saga && saga.phase && saga.phase !== 'done' && tick % 2 === 0) return refresh();
      return undefined;
    });
    let refreshQueued = false;
    ctx.onDispose(stream.subscribe((o) => {
      if (o.id !== id || gone) return;
      applyOrder(o);
      if (!refreshQueued) {
        refreshQueued = true;
        ctx.after(150, () => { refreshQueued = false; return refresh(); });
      }
    }));
    refresh();
  }

  function deliveryRowMaker(k) {
    const tr = h('tr');
    const c = {
      link: h('a', { href: orderHref(k), class: 'mono', title: k }),
      amount: h('td', { class: 'num' }), badge: h('span', { class: 'badge' }), time: h('td', { class: 'time' }),
    };
    tr.append(h('td', null, c.link), c.amount, h('td', null, c.badge), c.time);
    tr._c = c;
    return tr;
  }

  function fillDeliveryPlain(tr, x) {
    const c = tr._c;
    setText(c.link, shortId(x.order_id));
    setText(c.amount, x.amount);
    setBadge(c.badge, x.status);
    setTime(c.time, x.updated_at_ms != null ? x.updated_at_ms : x.created_at_ms);
  }

  // ------------------------------------------------------------------ page: attention

  function pageAttention(ctx, main) {
    const thr = h('input', { id: 'attention-threshold-s', type: 'number', min: '0', step: '1', value: '10' });
    const stuckBody = h('tbody');
    const dlBody = h('tbody');
    const stuckCount = h('span', { class: 'count-pill', text: '…' });
    const dlCount = h('span', { class: 'count-pill', text: '…' });
    const stuckMore = h('p', { class: 'muted small', hidden: true });
    const updated = h('span', { class: 'muted small' });
    const thresholdMs = () => {
      const v = num(thr.value);
      return v == null || v < 0 ? 10000 : Math.round(v * 1000);
    };

    main.append(
      h('div', { class: 'page-head' }, h('h1', { text: 'Needs attention' }), h('div', { class: 'head-tools' }, updated)),
      h('section', { class: 'card' },
        h('div', { class: 'card-head' },
          h('h2', { class: 'card-title' }, 'Stuck and slow sagas ', stuckCount),
          field('Compensating longer than (s)', thr, 'narrow inline')),
        h('p', { class: 'muted small', text: 'Sagas whose compensation cannot succeed until an operator retries it, and sagas that have been compensating, unchanged, for longer than the threshold.' }),
        h('div', { class: 'table-wrap' }, h('table', { id: 'stuck-sagas', class: 'table' },
          h('thead', null, h('tr', null, ['Order', 'Phase', 'Pending compensations', 'Attempts', 'Stuck reason', 'Age', 'Unchanged for', '']
            .map((t, i) => h('th', { class: i === 3 || i === 5 || i === 6 ? 'num' : null, text: t })))),
          stuckBody)),
        stuckMore),
      h('section', { class: 'card' },
        h('div', { class: 'card-head' }, h('h2', { class: 'card-title' }, 'Dead letters ', dlCount)),
        h('p', { class: 'muted small', text: 'Messages parked after failing repeatedly. Replaying sends one back to the queue it came from.' }),
        h('div', { class: 'table-wrap' }, h('table', { id: 'dead-letters', class: 'table' },
          h('thead', null, h('tr', null, ['Origin queue', 'Reason', 'Times parked', 'Parked', 'Replayed', 'Payload', '']
            .map((t, i) => h('th', { class: i === 2 ? 'num' : null, text: t })))),
          dlBody))));

    function makeSagaRow(k) {
      const tr = h('tr');
      const c = {
        link: h('a', { href: orderHref(k), class: 'mono', title: k, text: shortId(k) }),
        phase: h('span', { class: 'badge' }), pending: h('td'), attempts: h('td', { class: 'num' }),
        reason: h('td', { class: 'reason' }), age: h('td', { class: 'num' }), idle: h('td', { class: 'num' }),
        btn: h('button', { type: 'button', class: 'btn small warn retry', text: 'Retry' }),
      };
      c.btn.addEventListener('click', guard(async () => {
        if (tr._busy) return;
        tr._busy = true;
        c.btn.disabled = true;
        setText(c.btn, 'Retrying…');
        try {
          await adminApi('/api/v1/sagas/' + encodeURIComponent(k) + '/retry', { method: 'POST' });
          setText(c.btn, 'Retried');
        } catch (e) {
          setText(c.btn, 'Retry');
          showError('Retry ' + shortId(k) + ': ' + errText(e));
        } finally {
          tr._busy = false;
          c.btn.disabled = false;
        }
        guard(refreshAttentionBadge)();
        await refresh();
      }));
      tr.append(h('td', null, c.link), h('td', null, c.phase), c.pending, c.attempts, c.reason, c.age, c.idle, h('td', { class: 'actions' }, c.btn));
      tr._c = c;
      return tr;
    }

    function fillSagaRow(tr, s) {
      const c = tr._c;
      setBadge(c.phase, s.phase || '—');
      const pend = Array.isArray(s.pending_compensations) ? s.pending_compensations : [];
      setText(c.pending, pend.length ? pend.join(' → ') : '—');
      setText(c.attempts, String(s.attempts || 0));
      setText(c.reason, s.stuck_reason || (s._slow ? 'compensating for long' : '—'));
      c.reason.classList.toggle('stuck-text', !!s.stuck_reason);
      setText(c.age, fmtDur(Date.now() - s.created_at_ms));
      c.age.title = 'created ' + fmtTime(s.created_at_ms);
      setText(c.idle, fmtDur(Date.now() - s.updated_at_ms));
      c.idle.title = 'last change ' + fmtTime(s.updated_at_ms);
      tr.classList.toggle('is-stuck', !!s.stuck_reason);
    }

    function makeLetterRow() {
      const tr = h('tr');
      const c = {
        queue: h('td', { class: 'mono' }), reason: h('td', { class: 'reason' }), times: h('td', { class: 'num' }),
        parked: h('td', { class: 'time' }), replayed: h('td', { class: 'time' }), payload: h('td', { class: 'payload' }),
        btn: h('button', { type: 'button', class: 'btn small replay', text: 'Replay' }),
      };
      c.btn.addEventListener('click', guard(async () => {
        const letter = tr._item;
        if (!letter || tr._busy || letter.replayed_at_ms != null) return;
        tr._busy = true;
        c.btn.disabled = true;
        setText(c.btn, 'Replaying…');
        try {
          const res = await adminApi('/api/v1/dead-letters/' + encodeURIComponent(letter.id) + '/replay', { method: 'POST' });
          tr._busy = false;
          const upd = res && typeof res === 'object' && res.id ? res : Object.assign({}, letter, { replayed_at_ms: Date.now() });
          if (upd.replayed_at_ms == null) upd.replayed_at_ms = Date.now();
          fillLetterRow(tr, upd);
          guard(refreshAttentionBadge)();
        } catch (e) {
          tr._busy = false;
          fillLetterRow(tr, letter);
          showError('Replay: ' + errText(e));
        }
      }));
      tr.append(c.queue, c.reason, c.times, c.parked, c.replayed, c.payload, h('td', { class: 'actions' }, c.btn));
      tr._c = c;
      return tr;
    }

    function fillLetterRow(tr, x) {
      const c = tr._c;
      tr._item = x;
      setText(c.queue, x.origin_queue);
      setText(c.reason, x.reason);
      setText(c.times, x.times_parked);
      setTime(c.parked, x.parked_at_ms);
      if (x.replayed_at_ms != null) setTime(c.replayed, x.replayed_at_ms);
      else { setText(c.replayed, '—'); c.replayed.title = 'not replayed'; }
      const payload = x.payload == null ? '' : String(x.payload);
      if (c.payload._sig !== payload) {
        c.payload._sig = payload;
        let pretty = payload;
        try { pretty = JSON.stringify(JSON.parse(payload), null, 2); } catch (_) { /* not JSON: shown as is */ }
        c.payload.replaceChildren(h('details', null,
          h('summary', { text: payload.length + ' chars' }),
          h('pre', { class: 'payload-pre', text: pretty })));
      }
      const replayed = x.replayed_at_ms != null;
      tr.classList.toggle('replayed', replayed);
      if (!tr._busy) {
        c.btn.disabled = replayed;
        setText(c.btn, replayed ? 'replayed' : 'Replay');
      }
    }

    async function refresh() {
      const [stuck, slow, letters] = await Promise.allSettled([
        api('/api/v1/sagas?state=stuck'),
        api('/api/v1/sagas?phase=compensating&older_than_ms=' + thresholdMs()),
        api('/api/v1/dead-letters?limit=100'),
      ]);
      if (!ctx.alive) return;
      const errors = [];
      if (stuck.status === 'fulfilled' && slow.status === 'fulfilled') {
        const merged = new Map();
        for (const s of (stuck.value && stuck.value.sagas) || []) merged.set(s.order_id, Object.assign({}, s));
        for (const s of (slow.value && slow.value.sagas) || []) {
          if (!merged.has(s.order_id)) merged.set(s.order_id, Object.assign({ _slow: true }, s));
        }
        const list = [...merged.values()];
        syncRows(stuckBody, list, {
          key: (s) => s.order_id, attr: 'data-order-id', cols: 8, make: makeSagaRow, fill: fillSagaRow,
          empty: 'No stuck sagas, and none compensating for longer than the threshold.',
        });
        setText(stuckCount, String(list.length));
        const more = (stuck.value && stuck.value.next != null) || (slow.value && slow.value.next != null);
        stuckMore.hidden = !more;
        setText(stuckMore, 'More sagas match than shown (first page only).');
      } else {
        const e = stuck.status === 'rejected' ? stuck.reason : slow.reason;
        errors.push('Sagas: ' + errText(e));
      }
      if (letters.status === 'fulfilled') {
        const list = Array.isArray(letters.value) ? letters.value.slice().reverse() : [];
        syncRows(dlBody, list, {
          key: (x) => x.id, attr: 'data-dead-letter-id', cols: 7, make: makeLetterRow, fill: fillLetterRow,
          empty: 'No dead letters.',
        });
        const open = list.filter((x) => x.replayed_at_ms == null).length;
        setText(dlCount, list.length + (list.length ? ' (' + open + ' not replayed)' : ''));
      } else {
        errors.push('Dead letters: ' + errText(letters.reason));
      }
      if (errors.length) showError(errors.join(' · '));
      setText(updated, 'updated ' + fmtTime(Date.now()) + ' · every 3 s');
    }

    let thrTimer = null;
    const onThr = () => { ctx.clear(thrTimer); thrTimer = ctx.after(400, refresh); };
    thr.addEventListener('input', onThr);
    thr.addEventListener('change', onThr);
    syncRows(stuckBody, [], { cols: 8, empty: 'Loading…' });
    syncRows(dlBody, [], { cols: 7, empty: 'Loading…' });
    refresh();
    ctx.every(3000, refresh);
  }

  // ------------------------------------------------------------------ page: inventory and users

  function pageInventory(ctx, main, _m, query) {
    const avail = h('span', { id: 'stock-available', class: 'big-num', text: '—' });
    const initial = h('span', { id: 'stock-initial', class: 'big-num small-big', text: '—' });
    const restocked = h('span', { id: 'stock-restocked', class: 'big-num small-big', text: '—' });
    const bar = h('div', { class: 'bar-fill' });
    const barLabel = h('span', { class: 'muted small' });

    const amountIn = h('input', { id: 'restock-amount', type: 'number', min: '1', step: '1', placeholder: '100' });
    const restockBtn = h('button', { id: 'restock-submit', type: 'submit', class: 'btn primary', text: 'Restock' });
    const restockRes = h('div', { id: 'restock-result', class: 'form-result', 'aria-live': 'polite' });
    const restockForm = h('form', { class: 'inline-form', novalidate: true }, field('Tokens to add', amountIn), h('div', { class: 'field field-btn' }, restockBtn));
    restockForm.addEventListener('submit', (e) => { e.preventDefault(); guard(doRestock)(); });

    const lookupIn = h('input', { id: 'user-lookup', type: 'text', placeholder: 'username', autocomplete: 'off', spellcheck: 'false' });
    const lookupBtn = h('button', { id: 'user-lookup-submit', type: 'submit', class: 'btn', text: 'Look up' });
    const lookupForm = h('form', { class: 'inline-form', novalidate: true }, field('User', lookupIn), h('div', { class: 'field field-btn' }, lookupBtn));
    lookupForm.addEventListener('submit', (e) => { e.preventDefault(); guard(() => lookup(lookupIn.value.trim(), true))(); });
    const lookupRes = h('div', { id: 'lookup-result', class: 'lookup-result' });

    main.append(
      h('div', { class: 'page-head' }, h('h1', { text: 'Inventory & users' })),
      h('div', { class: 'grid-2' },
        card('Stock',
          h('div', { class: 'stats' },
            h('div', { class: 'stat' }, h('div', { class: 'stat-label', text: 'Available' }), avail),
            h('div', { class: 'stat' }, h('div', { class: 'stat-label', text: 'Initial' }), initial),
            h('div', { class: 'stat' }, h('div', { class: 'stat-label', text: 'Restocked' }), restocked)),
          h('div', { class: 'bar' }, bar), barLabel,
          h('h3', { class: 'sub-title', text: 'Restock' }), restockForm, restockRes),
        card('User lookup', lookupForm, lookupRes)));

    function applyStock(s) {
      if (!s || typeof s !== 'object') return;
      setText(avail, s.available);
      setText(initial, s.initial);
      setText(restocked, s.restocked);
      const cap = Number(s.initial) + Number(s.restocked);
      const pct = cap > 0 ? Math.max(0, Math.min(100, (Number(s.available) / cap) * 100)) : 0;
      bar.style.width = pct.toFixed(1) + '%';
      setText(barLabel, cap > 0 ? pct.toFixed(1) + '% of the ' + cap + ' tokens ever stocked are available' : '');
    }

    async function loadStock() {
      try {
        const s = await api('/api/v1/inventory');
        if (ctx.alive) applyStock(s);
      } catch (e) {
        if (ctx.alive) showError('Inventory: ' + errText(e));
      }
    }

    async function doRestock() {
      const n = num(amountIn.value);
      if (n === null) {
        setClass(restockRes, 'form-result error');
        setText(restockRes, 'Enter how many tokens to add.');
        return;
      }
      restockBtn.disabled = true;
      setClass(restockRes, 'form-result');
      setText(restockRes, 'Restocking…');
      try {
        const s = await adminApi('/api/v1/inventory/restock', { method: 'POST', body: { amount: n } });
        applyStock(s);
        setClass(restockRes, 'form-result ok');
        setText(restockRes, 'Restocked ' + n + ' tokens' + (s && s.available != null ? '; ' + s.available + ' available.' : '.'));
      } catch (e) {
        setClass(restockRes, 'form-result error');
        setText(restockRes, errText(e));
        showError('Restock: ' + errText(e));
      } finally {
        restockBtn.disabled = false;
      }
    }

    let looked = null;
    let lookupGen = 0;
    const lCredits = h('span', { id: 'lookup-credits', class: 'big-num', text: '—' });
    const lNote = h('p', { class: 'muted small' });
    const lLink = h('a', { id: 'lookup-orders-link', class: 'btn ghost', href: '#/orders', text: 'Orders of this user →' });
    const lTitle = h('h3', { class: 'sub-title' });
    const lBody = h('tbody');
    const lTable = h('table', { id: 'lookup-deliveries', class: 'table compact' },
      h('thead', null, h('tr', null, h('th', { text: 'Order' }), h('th', { class: 'num', text: 'Amount' }), h('th', { text: 'Status' }), h('th', { text: 'Updated' }))),
      lBody);

    async function lookup(name, fresh) {
      if (!name) {
        looked = null;
        lookupRes.replaceChildren(h('p', { class: 'form-result error', text: 'Enter a username.' }));
        return;
      }
      const gen = ++lookupGen;
      if (fresh) {
        looked = name;
        history.replaceState(null, '', '#/inventory?user=' + encodeURIComponent(name));
        setText(lCredits, '…');
        setText(lNote, '');
        syncRows(lBody, [], { cols: 4, empty: 'Loading…' });
        setText(lTitle, 'Deliveries of ' + name);
        lLink.setAttribute('href', ordersHref({ username: name }));
        lookupRes.replaceChildren(
          h('div', { class: 'stat' }, h('div', { class: 'stat-label', text: 'Credits' }), lCredits), lNote, lLink,
          lTitle, h('div', { class: 'table-wrap scroll-y' }, lTable));
      }
      const [u, ds] = await Promise.allSettled([
        api('/api/v1/users/' + encodeURIComponent(name)),
        api('/api/v1/deliveries?username=' + encodeURIComponent(name)),
      ]);
      if (!ctx.alive || gen !== lookupGen) return;
      if (u.status === 'fulfilled' && u.value) {
        setText(lCredits, u.value.credits);
        setText(lNote, '');
      } else if (u.status === 'rejected') {
        setText(lCredits, '—');
        setText(lNote, u.reason.status === 404 ? 'No user named “' + name + '”.' : 'Could not load the user: ' + errText(u.reason));
        if (u.reason.status !== 404 && fresh) showError('User: ' + errText(u.reason));
      }
      if (ds.status === 'fulfilled') {
        const list = Array.isArray(ds.value) ? ds.value.slice().reverse() : [];
        syncRows(lBody, list, { key: (x) => x.order_id, attr: 'data-order-id', cols: 4, empty: 'No deliveries.', make: deliveryRowMaker, fill: fillDeliveryPlain });
      } else {
        syncRows(lBody, [], { cols: 4, empty: 'Could not load deliveries: ' + errText(ds.reason) });
      }
    }

    const initialUser = (query.get('user') || '').trim();
    if (initialUser) { lookupIn.value = initialUser; lookup(initialUser, true); }
    loadStock();
    ctx.every(5000, () => Promise.all([loadStock(), looked ? lookup(looked, false) : null]));
  }

  // ------------------------------------------------------------------ metrics parsing

  /** Parses Prometheus text; series with the same name and labels are summed. */
  function parseProm(text) {
    const byKey = new Map();
    for (const raw of String(text).split('\n')) {
      const line = raw.trim();
      if (!line || line[0] === '#') continue;
      const nm = /^[a-zA-Z_:][a-zA-Z0-9_:]*/.exec(line);
      if (!nm) continue;
      const name = nm[0];
      let i = name.length;
      const labels = {};
      let bad = false;
      if (line[i] === '{') {
        i++;
        for (;;) {
          while (line[i] === ' ' || line[i] === ',') i++;
          if (i >= line.length) { bad = true; break; }
          if (line[i] === '}') { i++; break; }
          const lm = /^[a-zA-Z_][a-zA-Z0-9_]*/.exec(line.slice(i));
          if (!lm) { bad = true; break; }
          i += lm[0].length;
          while (line[i] === ' ') i++;
          if (line[i] !== '=') { bad = true; break; }
          i++;
          while (line[i] === ' ') i++;
          if (line[i] !== '"') { bad = true; break; }
          i++;
          let v = '';
          while (i < line.length && line[i] !== '"') {
            if (line[i] === '\\' && i + 1 < line.length) {
              const ch = line[i + 1];
              v += ch === 'n' ? '\n' : ch;
              i += 2;
            } else {
              v += line[i++];
            }
          }
          if (line[i] !== '"') { bad = true; break; }
          i++;
          labels[lm[0]] = v;
        }
      }
      if (bad) continue;
      const tok = line.slice(i).trim().split(/\s+/)[0];
      let value;
      if (tok === '+Inf' || tok === 'Inf') value = Infinity;
      else if (tok === '-Inf') value = -Infinity;
      else value = Number(tok);
      if (tok === '' || Number.isNaN(value)) continue;
      const key = name + '{' + Object.keys(labels).sort().map((k) => k + '=' + JSON.stringify(labels[k])).join(',') + '}';
      const prev = byKey.get(key);
      if (prev) prev.value += value;
      else byKey.set(key, { name, labels, value });
    }
    const byName = new Map();
    for (const s of byKey.values()) {
      if (!byName.has(s.name)) byName.set(s.name, []);
      byName.get(s.name).push(s);
    }
    return byName;
  }

  function sumBy(sample, name, label) {
    const out = new Map();
    for (const s of sample.get(name) || []) {
      const k = label ? (s.labels[label] == null ? '' : s.labels[label]) : '';
      out.set(k, (out.get(k) || 0) + s.value);
    }
    return out;
  }

  function sumAll(sample, name) {
    let t = 0;
    for (const s of sample.get(name) || []) t += s.value;
    return t;
  }

  function buckets(sample, name) {
    const m = sumBy(sample, name, 'le');
    const list = [];
    for (const [le, c] of m) {
      const b = le === '+Inf' || le === 'Inf' ? Infinity : Number(le);
      if (!Number.isNaN(b)) list.push({ le: b, c });
    }
    return list.sort((a, b) => a.le - b.le);
  }

  /** Like Prometheus' histogram_quantile, on cumulative buckets. */
  function quantile(q, bs) {
    if (!bs.length) return null;
    let run = 0;
    const cum = bs.map((b) => { run = Math.max(run, b.c); return { le: b.le, c: run }; });
    const total = cum[cum.length - 1].c;
    if (!(total > 0)) return null;
    const rank = q * total;
    let prevLe = 0;
    let prevC = 0;
    for (const b of cum) {
      if (b.c >= rank) {
        if (b.le === Infinity) return prevLe;
        if (b.c === prevC) return b.le;
        return prevLe + (b.le - prevLe) * (rank - prevC) / (b.c - prevC);
      }
      if (b.le !== Infinity) prevLe = b.le;
      prevC = b.c;
    }
    return prevLe;
  }

  // ------------------------------------------------------------------ charts

  /** A round step for about five grid intervals up to v, and the top it gives. */
  function niceScale(v) {
    if (!(v > 0)) v = 1;
    const raw = v / 5;
    const exp = Math.pow(10, Math.floor(Math.log10(raw)));
    const f = raw / exp;
    const step = (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * exp;
    const n = Math.max(1, Math.ceil(v / step - 1e-9));
    return { step, n, top: step * n };
  }

  function drawChart(canvas, series, o) {
    if (!canvas || !canvas.getContext) return;
    const g = canvas.getContext('2d');
    if (!g) return;
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(120, canvas.clientWidth || 300);
    const ht = Math.max(80, canvas.clientHeight || 150);
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(ht * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(ht * dpr);
    }
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, ht);
    const L = 50;
    const R = 8;
    const T = 8;
    const B = 20;
    const pw = w - L - R;
    const ph = ht - T - B;
    const now = o.now;
    const t0 = now - CHART_WINDOW_MS;
    let max = 0;
    for (const s of series) for (const p of s.points) if (p.t >= t0 && p.v != null && isFinite(p.v)) max = Math.max(max, p.v);
    const scale = niceScale(Math.max(max, o.minTop || 0));
    const top = scale.top;
    const fmt = o.fmt || ((v) => fmtNum(v));
    g.font = '11px system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif';
    g.lineWidth = 1;
    g.textBaseline = 'middle';
    g.textAlign = 'right';
    for (let i = 0; i <= scale.n; i++) {
      const y = Math.round(T + ph * (1 - i / scale.n)) + 0.5;
      g.strokeStyle = i === 0 ? '#cbd5e1' : '#eef0f3';
      g.beginPath(); g.moveTo(L, y); g.lineTo(L + pw, y); g.stroke();
      g.fillStyle = '#6b7280';
      g.fillText(fmt(Number((scale.step * i).toPrecision(6))), L - 6, y);
    }
    g.textAlign = 'center';
    g.textBaseline = 'top';
    for (const sec of [120, 90, 60, 30, 0]) {
      const x = L + pw * (1 - sec / 120);
      g.fillStyle = '#6b7280';
      g.fillText(sec ? '-' + sec + ' s' : 'now', Math.min(Math.max(x, L + 12), L + pw - 12), T + ph + 5);
    }
    g.save();
    g.beginPath();
    g.rect(L, T - 1, pw, ph + 2);
    g.clip();
    for (const s of series) {
      g.strokeStyle = s.color;
      g.lineWidth = s.width || 1.75;
      g.setLineDash(s.dash ? [5, 4] : []);
      g.beginPath();
      let pen = false;
      for (const p of s.points) {
        if (p.t < t0 - 2000) continue;
        if (p.v == null || !isFinite(p.v)) { pen = false; continue; }
        const x = L + pw * ((p.t - t0) / CHART_WINDOW_MS);
        const y = T + ph * (1 - p.v / top);
        if (pen) g.lineTo(x, y); else g.moveTo(x, y);
        pen = true;
      }
      g.stroke();
    }
    g.restore();
    g.setLineDash([]);
  }

  function updateLegend(el, series, fmt) {
    const sig = series.map((s) => s.label + s.color + (s.dash ? 'd' : '')).join('|');
    if (el._sig !== sig) {
      el._sig = sig;
      el._vals = [];
      el.replaceChildren(...series.map((s) => {
        const v = h('span', { class: 'legend-val' });
        el._vals.push(v);
        const sw = h('span', { class: 'swatch' + (s.dash ? ' dashed' : '') });
        sw.style.borderColor = s.color;
        sw.style.backgroundColor = s.dash ? 'transparent' : s.color;
        return h('span', { class: 'legend-item' }, sw, h('span', { class: 'legend-label', text: s.label }), v);
      }));
    }
    if (!fmt) return;
    series.forEach((s, i) => {
      const last = s.points.length ? s.points[s.points.length - 1].v : null;
      setText(el._vals[i], last == null ? '' : fmt(last));
    });
  }

  // ------------------------------------------------------------------ page: live

  function pageLive(ctx, main) {
    const samples = [];
    const hist = [];
    let failing = false;

    const big = (id, unit) => {
      const v = h('span', { id, class: 'big-num', text: '0' });
      return [v, h('div', { class: 'big-wrap' }, v, h('span', { class: 'big-unit', text: unit }))];
    };
    const [thrV, thrW] = big('live-throughput', 'orders/s');
    const [p50V, p50W] = big('live-p50', 'ms p50');
    const [p99V, p99W] = big('live-p99', 'ms p99');
    const [shedV, shedW] = big('live-shed', 'shed/s');
    const [backV, backW] = big('live-backlog', 'in outboxes');
    const [lagV, lagW] = big('live-lag', 'messages of lag');
    const byStatus = h('div', { id: 'live-by-status', class: 'mini-stats' });
    const latNote = h('div', { class: 'muted small' });
    const statusLine = h('span', { class: 'muted small', text: 'waiting for the first sample…' });
    const canvas = (id) => h('canvas', { id, class: 'chart', width: '600', height: '150' });
    const cThr = canvas('chart-throughput');
    const cLat = canvas('chart-latency');
    const cShed = canvas('chart-shed');
    const cBack = canvas('chart-backlog');
    const lThr = h('div', { class: 'legend' });
    const lLat = h('div', { class: 'legend' });
    const lShed = h('div', { class: 'legend' });
    const lBack = h('div', { class: 'legend' });
    const backBody = h('tbody');
    const lagBody = h('tbody');
    const statusSpans = {};
    for (const s of FINAL_STATUSES) {
      const v = h('span', { class: 'mini-val', 'data-status': s, text: '0' });
      statusSpans[s] = v;
      const dot = h('span', { class: 'swatch' });
      dot.style.backgroundColor = STATUS_COLORS[s];
      dot.style.borderColor = STATUS_COLORS[s];
      byStatus.append(h('span', { class: 'mini-stat' }, dot, h('span', { class: 'mini-label', text: s }), v));
    }

    const chartCard = (title, bigs, cv, legend, ...extra) => h('section', { class: 'card chart-card' },
      h('div', { class: 'card-head' }, h('h2', { class: 'card-title', text: title }), h('div', { class: 'bigs' }, bigs)),
      cv, legend, ...extra);

    main.append(
      h('div', { class: 'page-head' }, h('h1', { text: 'Live' }), h('div', { class: 'head-tools' }, statusLine)),
      h('div', { class: 'grid-2 charts' },
        chartCard('Throughput by final status', [thrW], cThr, lThr, byStatus),
        chartCard('Saga duration (last ~10 s)', [p50W, p99W], cLat, lLat, latNote),
        chartCard('Shed orders', [shedW], cShed, lShed),
        chartCard('Outbox backlog and consumer lag', [backW, lagW], cBack, lBack,
          h('div', { class: 'grid-2 tight' },
            h('table', { id: 'outbox-backlog', class: 'table compact' }, h('thead', null, h('tr', null, h('th', { text: 'Outbox (service)' }), h('th', { class: 'num', text: 'Backlog' }))), backBody),
            h('table', { id: 'consumer-lag', class: 'table compact' }, h('thead', null, h('tr', null, h('th', { text: 'Queue' }), h('th', { class: 'num', text: 'Lag' }))), lagBody)))));

    const kvRow = () => {
      const tr = h('tr');
      tr._c = { k: h('td', { class: 'mono' }), v: h('td', { class: 'num' }) };
      tr.append(tr._c.k, tr._c.v);
      return tr;
    };
    const kvFill = (tr, [k, v]) => { setText(tr._c.k, k || '(none)'); setText(tr._c.v, fmtNum(v)); };

    function sampleAt(tMin) {
      for (const s of samples) if (s.t >= tMin) return s;
      return samples[0];
    }

    async function tick() {
      let text;
      try {
        text = await api('/console/metrics', { text: true, timeout: 5000 });
      } catch (e) {
        if (!ctx.alive) return;
        setText(statusLine, 'metrics unavailable: ' + errText(e));
        if (!failing) showError('Metrics: ' + errText(e));
        failing = true;
        const t = Date.now();
        hist.push({ t, gap: true });
        draw(t);
        return;
      }
      if (!ctx.alive) return;
      failing = false;
      const now = Date.now();
      const cur = { t: now, m: parseProm(text) };
      const prev = samples.length ? samples[samples.length - 1] : null;
      samples.push(cur);
      while (samples.length && samples[0].t < now - 15000) samples.shift();

      const point = { t: now, rates: {}, p50: null, p99: null, shed: 0, backlog: new Map(), lag: new Map() };
      const curOrders = sumBy(cur.m, 'ldt_orders_total', 'status');
      if (prev) {
        const dt = Math.max(0.001, (now - prev.t) / 1000);
        const prevOrders = sumBy(prev.m, 'ldt_orders_total', 'status');
        const keys = new Set([...FINAL_STATUSES, ...curOrders.keys()]);
        for (const k of keys) {
          if (k === 'PENDING' || k === '') continue;
          const d = (curOrders.get(k) || 0) - (prevOrders.get(k) || 0);
          point.rates[k] = d > 0 ? d / dt : 0;
        }
        const ds = sumAll(cur.m, 'ldt_orders_shed_total') - sumAll(prev.m, 'ldt_orders_shed_total');
        point.shed = ds > 0 ? ds / dt : 0;
      } else {
        for (const k of FINAL_STATUSES) point.rates[k] = 0;
      }
      // latency over ~10 s from bucket deltas, all statuses together
      const old = sampleAt(now - 10500);
      let lat = null;
      if (old && old !== cur) {
        const nb = buckets(cur.m, 'ldt_saga_duration_ms_bucket');
        const ob = new Map(buckets(old.m, 'ldt_saga_duration_ms_bucket').map((b) => [b.le, b.c]));
        let reset = false;
        const delta = nb.map((b) => {
          const dc = b.c - (ob.get(b.le) || 0);
          if (dc < 0) reset = true;
          return { le: b.le, c: dc };
        });
        lat = reset ? nb : delta;
      }
      point.p50 = lat ? quantile(0.5, lat) : null;
      point.p99 = lat ? quantile(0.99, lat) : null;
      point.backlog = sumBy(cur.m, 'ldt_outbox_backlog', 'service');
      point.lag = sumBy(cur.m, 'ldt_consumer_lag_messages', 'queue');
      hist.push(point);
      while (hist.length && hist[0].t < now - CHART_WINDOW_MS - 5000) hist.shift();

      // big numbers
      const recent = hist.filter((p) => !p.gap && p.t >= now - 5500 && p !== hist[0]);
      const avg = (f) => (recent.length ? recent.reduce((a, p) => a + f(p), 0) / recent.length : 0);
      const totalRate = (p) => Object.values(p.rates || {}).reduce((a, v) => a + v, 0);
      setText(thrV, fmtNum(avg(totalRate), 1));
      for (const s of FINAL_STATUSES) setText(statusSpans[s], fmtNum(avg((p) => (p.rates && p.rates[s]) || 0), 1));
      setText(p50V, fmtNum(point.p50 || 0, 0));
      setText(p99V, fmtNum(point.p99 || 0, 0));
      setText(latNote, point.p50 == null ? 'No saga finished in the last ~10 s (shown as 0).' : 'Interpolated from the ldt_saga_duration_ms histogram buckets.');
      setText(shedV, fmtNum(avg((p) => p.shed || 0), 1));
      let backTotal = 0;
      for (const v of point.backlog.values()) backTotal += v;
      let lagTotal = 0;
      for (const v of point.lag.values()) lagTotal += v;
      setText(backV, fmtNum(backTotal));
      setText(lagV, fmtNum(lagTotal));
      syncRows(backBody, [...point.backlog.entries()].sort(), { key: (e) => e[0], attr: 'data-service', cols: 2, empty: 'No outbox series (0).', make: kvRow, fill: kvFill });
      syncRows(lagBody, [...point.lag.entries()].sort(), { key: (e) => e[0], attr: 'data-queue', cols: 2, empty: 'No consumer lag series (0).', make: kvRow, fill: kvFill });
      let n = 0;
      for (const list of cur.m.values()) n += list.length;
      setText(statusLine, 'updated ' + fmtTime(now) + ' · ' + n + ' series · every 1 s');
      draw(now);
    }

    function pts(f) {
      return hist.map((p) => ({ t: p.t, v: p.gap ? null : f(p) }));
    }

    function draw(now) {
      // throughput: a line per status seen moving in the window (SUCCESS at least)
      const seen = new Set();
      for (const p of hist) if (p.rates) for (const [k, v] of Object.entries(p.rates)) if (v > 0) seen.add(k);
      const statuses = [...new Set([...FINAL_STATUSES, ...seen])].filter((s) => s === 'SUCCESS' || seen.has(s));
      const thrSeries = statuses.map((s, i) => ({
        label: s, color: STATUS_COLORS[s] || PALETTE[i % PALETTE.length],
        points: pts((p) => (p.rates && p.rates[s]) || 0),
      }));
      drawChart(cThr, thrSeries, { now, minTop: 1, fmt: (v) => fmtNum(v) });
      updateLegend(lThr, thrSeries, null);

      const latSeries = [
        { label: 'p50', color: '#2563eb', points: pts((p) => p.p50 || 0) },
        { label: 'p99', color: '#9333ea', points: pts((p) => p.p99 || 0) },
      ];
      drawChart(cLat, latSeries, { now, minTop: 10, fmt: (v) => fmtNum(v) + ' ms' });
      updateLegend(lLat, latSeries, (v) => fmtNum(v, 0) + ' ms');

      const shedSeries = [{ label: 'shed/s', color: '#dc2626', points: pts((p) => p.shed || 0) }];
      drawChart(cShed, shedSeries, { now, minTop: 1 });
      updateLegend(lShed, shedSeries, (v) => fmtNum(v, 1) + '/s');

      const svc = new Set();
      const qs = new Set();
      for (const p of hist) {
        if (p.backlog) for (const k of p.backlog.keys()) svc.add(k);
        if (p.lag) for (const k of p.lag.keys()) qs.add(k);
      }
      const backSeries = [];
      let ci = 0;
      for (const k of [...svc].sort()) {
        backSeries.push({ label: 'outbox ' + (k || '(none)'), color: PALETTE[ci++ % PALETTE.length], points: pts((p) => (p.backlog && p.backlog.get(k)) || 0) });
      }
      for (const k of [...qs].sort()) {
        backSeries.push({ label: 'lag ' + (k || '(none)'), dash: true, color: PALETTE[ci++ % PALETTE.length], points: pts((p) => (p.lag && p.lag.get(k)) || 0) });
      }
      if (!backSeries.length) backSeries.push({ label: 'backlog', color: PALETTE[0], points: pts(() => 0) });
      drawChart(cBack, backSeries, { now, minTop: 5 });
      updateLegend(lBack, backSeries, (v) => fmtNum(v));
    }

    draw(Date.now());
    tick();
    ctx.every(1000, tick);
  }

  // ------------------------------------------------------------------ page: faults

  function pageFaults(ctx, main) {
    const bodyEl = h('div', { class: 'faults-body' }, h('p', { class: 'muted', text: 'Loading the fault flags…' }));
    main.append(
      h('div', { class: 'page-head' }, h('h1', { text: 'Fault injection' })),
      card('Runtime fault flags',
        h('p', { class: 'lead', text: 'Each flag makes that share of new orders (only those that carry no fault of their own) fail at the step (its handler dies: the order ends UNKNOWN) or stall there past its deadline (the order ends TIMEOUT); such orders are marked "flag" in the orders list.' }),
        bodyEl));

    function disabled(why) {
      bodyEl.replaceChildren(h('div', { id: 'faults-disabled', class: 'notice warn' },
        h('strong', { text: 'Fault injection is disabled on this marketplace.' }), ' ',
        why || 'The server was started without fault injection, so these flags cannot be set here.'));
    }

    function form(flags) {
      const inputs = {};
      const rows = STEPS.map((step) => {
        const cur = (flags && flags[step]) || {};
        const fail = h('input', { id: 'fault-' + step + '-fail', type: 'number', min: '0', max: '100', step: '1' });
        const stall = h('input', { id: 'fault-' + step + '-stall', type: 'number', min: '0', max: '100', step: '1' });
        fail.value = String(cur.fail_percent == null ? 0 : cur.fail_percent);
        stall.value = String(cur.stall_percent == null ? 0 : cur.stall_percent);
        inputs[step] = { fail, stall };
        return h('tr', { 'data-step': step },
          h('th', { scope: 'row', text: step }),
          h('td', null, h('span', { class: 'pct-input' }, fail, h('span', { class: 'pct', text: '%' }))),
          h('td', null, h('span', { class: 'pct-input' }, stall, h('span', { class: 'pct', text: '%' }))));
      });
      const save = h('button', { id: 'faults-save', type: 'button', class: 'btn primary', text: 'Save flags' });
      const zero = h('button', { type: 'button', class: 'btn ghost', text: 'Set all to 0' });
      const status = h('span', { id: 'faults-status', class: 'form-result', role: 'status' });
      const markDirty = () => { setClass(status, 'form-result muted'); setText(status, 'unsaved changes'); };
      for (const s of STEPS) for (const inp of [inputs[s].fail, inputs[s].stall]) inp.addEventListener('input', markDirty);
      zero.addEventListener('click', () => {
        for (const s of STEPS) { inputs[s].fail.value = '0'; inputs[s].stall.value = '0'; }
        markDirty();
      });
      save.addEventListener('click', guard(async () => {
        const body = {};
        for (const [k, v] of Object.entries(flags || {})) if (k !== 'enabled') body[k] = v;
        for (const s of STEPS) {
          const fail = num(inputs[s].fail.value);
          const stall = num(inputs[s].stall.value);
          for (const [what, v] of [['fail', fail], ['stall', stall]]) {
            if (v === null || v < 0 || v > 100 || !Number.isInteger(v)) {
              setClass(status, 'form-result error');
              setText(status, s + ' ' + what + ' must be a whole number from 0 to 100');
              return;
            }
          }
          body[s] = Object.assign({}, body[s] && typeof body[s] === 'object' ? body[s] : {}, { fail_percent: fail, stall_percent: stall });
        }
        save.disabled = true;
        setClass(status, 'form-result');
        setText(status, 'saving…');
        try {
          const res = await adminApi('/api/v1/faults', { method: 'PUT', body });
          if (!ctx.alive) return;
          if (res && typeof res === 'object') {
            flags = res;
            for (const s of STEPS) {
              if (res[s]) {
                inputs[s].fail.value = String(res[s].fail_percent == null ? 0 : res[s].fail_percent);
                inputs[s].stall.value = String(res[s].stall_percent == null ? 0 : res[s].stall_percent);
              }
            }
          }
          setClass(status, 'form-result ok');
          setText(status, 'saved');
        } catch (e) {
          if (!ctx.alive) return;
          if (e instanceof ApiError && e.status === 403) { disabled(errText(e)); return; }
          setClass(status, 'form-result error');
          setText(status, errText(e));
          showError('Fault flags: ' + errText(e));
        } finally {
          save.disabled = false;
        }
      }));
      bodyEl.replaceChildren(
        h('table', { id: 'fault-flags', class: 'table flags-table' },
          h('thead', null, h('tr', null, h('th', { text: 'Step' }),
            h('th', { text: 'Fail %', title: 'The step\'s handler fails: the order ends UNKNOWN' }),
            h('th', { text: 'Stall %', title: 'The step answers past its deadline: the order ends TIMEOUT' }))),
          h('tbody', null, rows)),
        h('div', { class: 'form-actions' }, save, zero, status));
    }

    (async () => {
      try {
        const flags = await api('/api/v1/faults');
        if (!ctx.alive) return;
        if (!flags || flags.enabled === false || (flags.enabled == null && config.fault_injection === false)) disabled();
        else form(flags);
      } catch (e) {
        if (!ctx.alive) return;
        if (e instanceof ApiError && (e.status === 403 || e.status === 404)) disabled(errText(e));
        else {
          bodyEl.replaceChildren(h('p', { class: 'form-result error', text: 'Could not load the fault flags: ' + errText(e) }));
          showError('Fault flags: ' + errText(e));
        }
      }
    })();
  }

  // ------------------------------------------------------------------ boot

  async function boot() {
    const banner = document.getElementById('error-banner');
    if (banner) {
      const close = banner.querySelector('.close');
      if (close) close.addEventListener('click', () => { banner.hidden = true; });
    }
    const tokenBtn = document.getElementById('admin-token-button');
    if (tokenBtn) {
      tokenBtn.addEventListener('click', () => {
        askToken('Set the admin token used for admin actions (cancel, retry, replay, restock, fault flags).').catch(() => {});
      });
    }
    updateTokenButton();
    try {
      const c = await api('/console/config.json', { timeout: 5000 });
      if (c && typeof c === 'object') config = Object.assign({}, config, c);
    } catch (e) {
      showError('Could not load the console configuration: ' + errText(e));
    }
    const info = document.getElementById('build-info');
    if (info) {
      const services = Array.isArray(config.services) ? config.services.join(', ') : '';
      const remote = Array.isArray(config.remote_services) ? config.remote_services.join(', ') : '';
      info.replaceChildren();
      appendAll(info, [
        h('div', { text: 'v' + config.version + ' · ' + config.mode }),
        services ? h('div', { class: 'services', text: 'runs: ' + services, title: 'Services this process runs' }) : null,
        remote ? h('div', { class: 'services', text: 'reaches: ' + remote, title: 'Services this process reaches elsewhere' }) : null]);
    }
    window.addEventListener('hashchange', () => guard(route)());
    guard(route)();
    guard(refreshAttentionBadge)();
    setInterval(() => guard(refreshAttentionBadge)(), 5000);
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', () => guard(boot)());
  else guard(boot)();
})();

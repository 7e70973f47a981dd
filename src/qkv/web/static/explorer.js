// The qkv explorer page. It lays out the numbers the server sends (the lens' records); it never
// computes a weight, a score or a contribution itself. Every string from a text or a record is
// put in the page as text (textContent / createTextNode), never as markup.
'use strict';
const $ = id => document.getElementById(id);
const PAGE = 300; // token chips per page: a 4,096-token text is 14 pages, never 4,096 nodes at once
const SVGNS = 'http://www.w3.org/2000/svg';
const st = {
  client: Array.from(crypto.getRandomValues(new Uint8Array(8)), b => b.toString(16).padStart(2, '0')).join(''),
  cap: null, query: null, layer: 0, head: 0, key: null, page: 0,
  rec: null, grid: null, gridFor: '', cmp: null, busy: null, seq: 0, lseq: 0, cseq: 0, reveal: false,
  status: '', // the shown run's line (tokens · model · shape · time); a compare adds its own after it
};

// ---- small helpers ------------------------------------------------------------------------
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v; else if (k.startsWith('on')) e[k] = v;
    else if (k === 'style') e.style.cssText = v; // the CSP (style-src 'self') refuses a style attribute, not the CSSOM
    else e.setAttribute(k, v);
  }
  for (const c of kids) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  return e;
}
function svg(tag, attrs, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
// 3 significant digits, as the CLI and the standalone page: 0.0254, 0.00288 (a weight of 0.0004
// printed 0.000 beside a bar of its own length); 100 and over as whole numbers
const fmt = x => x === null || x === undefined || Number.isNaN(x) ? '—' : Math.abs(x) >= 100 ? x.toFixed(0) : x.toPrecision(3);
// a value that rounds to zero prints 0.00, never −0.00 (a decrease that is not there)
const fmt2 = x => x === null || x === undefined ? '—' : (Math.abs(x) < 0.005 ? 0 : x).toFixed(2);
const tokText = j => { const t = st.cap.tokens[j][0]; return t.trim() || t; };
function showError(msg) { const e = $('error'); e.hidden = !msg; e.textContent = msg || ''; }
function tip(ev, s) { const t = $('tip'); t.textContent = s; t.style.display = 'block'; t.style.left = (ev.clientX + 12) + 'px'; t.style.top = (ev.clientY + 12) + 'px'; }
function untip() { $('tip').style.display = 'none'; }

async function api(path, body, signal) {
  const r = await fetch(path, body === undefined ? { signal } : {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body), signal });
  const doc = await r.json();
  if (!r.ok) { const e = new Error(doc.error || r.statusText); e.status = r.status; throw e; }
  return doc;
}

// ---- run: one forward per text ------------------------------------------------------------
// again: {text, model, query, layer, head, key} of a shown run the server no longer keeps: run
// that text with that model (not the text box's, which may have been edited since) and open
// that token, layer, head and key (not the last token)
async function run(again) {
  if (st.busy) st.busy.abort(); // a newer run replaces the older one (the server cancels it too)
  const ctl = new AbortController(); st.busy = ctl;
  const seq = ++st.seq;
  showError(''); $('status').textContent = 'running…'; st.status = '';
  document.body.classList.add('running'); // the shown results are the old text's until it is back
  const prog = $('prog'); prog.hidden = false; prog.value = 0;
  const poll = setInterval(async () => {
    try {
      const p = await api('/api/progress?client=' + st.client, undefined, ctl.signal);
      if (p.of && st.busy === ctl) { prog.value = p.done / p.of; $('status').textContent = `layer ${p.done} of ${p.of}`; }
    } catch (e) { /* the run ended or was replaced */ }
  }, 250);
  try {
    const text = again ? again.text : $('text').value, model = again ? again.model : $('model').value;
    const cap = await api('/api/run', { model, text, client: st.client }, ctl.signal);
    if (seq !== st.seq) return;
    st.busy = null; clearInterval(poll); prog.hidden = true; // progress is over: the run is back
    document.body.classList.remove('running');
    st.cap = cap; st.grid = null; st.gridFor = ''; st.cmp = null; st.cseq++; // drop a compare of the old text
    if (again) { st.layer = again.layer; st.head = again.head; }
    st.layer = Math.min(st.layer, cap.layers - 1); st.head = Math.min(st.head, cap.heads - 1);
    fillLayerHead();
    let q = cap.tokens.length - 1; // the last token that is not a special one
    while (q > 0 && cap.tokens[q][1] === cap.tokens[q][2]) q--;
    if (again && again.query < cap.tokens.length) q = again.query;
    st.status = `${cap.tokens.length} tokens · ${cap.model} · ${cap.layers} layers × ${cap.heads} heads${cap.dtype && cap.dtype !== 'float32' ? ' · ' + cap.dtype : ''} · ${cap.server_ms.toFixed(0)} ms`;
    $('status').textContent = st.status;
    st.page = Math.floor(q / PAGE);
    await selectQuery(q, again && again.key !== null && again.key < cap.tokens.length ? again.key : null);
    if ($('cmp-on').checked) await compare();
  } catch (e) {
    if (e.name !== 'AbortError' && e.status !== 409 && seq === st.seq) { showError(e.message); $('status').textContent = ''; }
  } finally {
    clearInterval(poll);
    if (seq === st.seq) { prog.hidden = true; document.body.classList.remove('running'); if (st.busy === ctl) st.busy = null; }
  }
}

function fillLayerHead() {
  const L = $('layer'), H = $('head');
  L.replaceChildren(...Array.from({ length: st.cap.layers }, (_, i) => el('option', { value: i }, i)));
  H.replaceChildren(...Array.from({ length: st.cap.heads }, (_, i) => el('option', { value: i }, i)));
  L.value = st.layer; H.value = st.head;
}

// ---- token chips, paged -------------------------------------------------------------------
function drawPager() {
  const n = st.cap.tokens.length, pages = Math.ceil(n / PAGE), p = $('pager');
  if (pages <= 1) { p.replaceChildren(el('span', {}, `${n} tokens — click one to see what it looked up`)); return; }
  const go = x => { st.page = Math.max(0, Math.min(pages - 1, x)); $('tokens').scrollTop = 0; drawTokens(); };
  const jump = el('input', { type: 'number', min: 0, max: n - 1, placeholder: 'token #' });
  jump.onchange = () => {
    const i = Number(jump.value);
    if (jump.value === '' && !jump.validity.badInput) return; // the box was cleared
    if (jump.value === '' || !Number.isInteger(i) || i < 0 || i >= n) {
      showError(`go to: the tokens are numbered 0 to ${n - 1}; ${jump.value === '' ? 'that is not a number' : jump.value + ' is not one of them'}`);
      return;
    }
    showError(''); st.page = Math.floor(i / PAGE); selectQuery(i);
  };
  p.replaceChildren(el('button', { id: 'prev', onclick: () => go(st.page - 1) }, '‹'),
    el('span', { id: 'pageinfo' }, `tokens ${st.page * PAGE}–${Math.min(n, (st.page + 1) * PAGE) - 1} of ${n} (page ${st.page + 1} of ${pages})`),
    el('button', { id: 'next', onclick: () => go(st.page + 1) }, '›'), el('span', {}, 'go to'), jump);
}
function drawTokens() {
  untip(); // the chip under the mouse is about to be replaced: its tooltip would go stale
  drawPager();
  const W = new Map();
  if (st.rec) for (const k of st.rec.layers[0].heads[0].keys) W.set(k.index, k.weight);
  const mx = Math.max(1e-12, ...W.values());
  const lo = st.page * PAGE, hi = Math.min(st.cap.tokens.length, lo + PAGE), frag = document.createDocumentFragment();
  const key = effectiveKey();
  for (let j = lo; j < hi; j++) {
    const t = st.cap.tokens[j], special = t[1] === t[2];
    const c = el('span', { class: 'chip' + (special ? ' sp' : '') + (j === st.query ? ' q' : '') + (j === key ? ' key' : ''), 'data-i': j },
      special ? t[0] : (t[0].trim() || t[0]));
    const w = W.get(j);
    if (w) c.style.background = `rgba(76,120,168,${(0.85 * w / mx).toFixed(3)})`;
    c.onclick = () => selectQuery(j);
    c.onmousemove = ev => tip(ev, `${JSON.stringify(t[0])} token ${j}` + (w === undefined ? '' : `\nweight ${fmt(w)} (layer ${st.layer} head ${st.head})`));
    c.onmouseleave = untip;
    frag.append(c);
  }
  const box = $('tokens');
  box.replaceChildren(frag);
  const qc = st.reveal && box.querySelector('.chip.q');
  if (qc) { // the chosen token in view inside the box (a 300-chip page is taller than the box)
    const b = box.getBoundingClientRect(), c = qc.getBoundingClientRect();
    if (c.top < b.top || c.bottom > b.bottom) box.scrollTop += c.top - b.top - (b.height - c.height) / 2;
  }
  st.reveal = false;
}

// ---- one query: lookup of the chosen head, the grid over every head --------------------------
const effectiveKey = () => st.key !== null ? st.key : st.rec ? st.rec.neuron.key.index : null;

async function selectQuery(i, key = null) {
  st.query = i; st.key = key; st.page = Math.floor(i / PAGE); st.reveal = true;
  await lookup();
  if ($('cmp-on').checked && st.cmp) await compare();
}
async function lookup() {
  if (!st.cap) return;
  const body = { id: st.cap.id, query: st.query, layer: st.layer, head: st.head, key: st.key, top: $('all-keys').checked ? 0 : 20 };
  const seq = ++st.lseq;
  try {
    const rec = await api('/api/lookup', body);
    if (seq !== st.lseq) return; // a newer click (another query, head, key or text) was sent since
    st.rec = rec; showError('');
    drawTokens(); drawLookup(); drawHeadView(); drawNeuron(); drawCompare();
    const key = effectiveKey(), want = `${st.cap.id}/${st.query}/${key}`;
    if (st.gridFor !== want) {
      st.gridFor = want;
      const g = await api('/api/grid', { id: st.cap.id, query: st.query, key });
      if (st.gridFor === want) { st.grid = g; }
    }
    drawGrid();
  } catch (e) { if (seq === st.lseq) await recover(e); }
}
async function recover(e) {
  if (e.status === 404 && st.cap) { // evicted: the shown run's text again, then what was clicked
    showError('the server no longer keeps this run; running its text again…');
    return run({ text: st.cap.text, model: st.cap.model, query: st.query, layer: st.layer, head: st.head, key: st.key });
  }
  showError(e.message);
}

function drawLookup() {
  const r = st.rec, h = r.layers[0].heads[0], key = effectiveKey();
  const byC = [...h.keys].sort((a, b) => b.contribution - a.contribution).map(k => k.index);
  const mw = Math.max(1e-12, ...h.keys.map(k => k.weight)), mc = Math.max(1e-12, ...h.keys.map(k => k.contribution));
  const shown = h.keys.slice(0, 200);
  // A cut list keeps the top k by weight ∪ the top k by contribution (and the sinks): a rank
  // among the kept keys is the true rank up to k, past k it is only known to be > k.
  const cut = h.keys.length < h.n_keys, rank = n => cut && n > r.top ? `>${r.top}` : String(n);
  const rows = shown.map((k, r0) => {
    const rc = byC.indexOf(k.index) + 1, exact = !cut || rc <= r.top; // else: true rank ≥ rc
    // the terminal's rule (lens/terminal.py content_flag): "carries less" ≥ 2 places lower by content
    // than by weight (a lower bound suffices), "carries more" ≥ 3 places higher (exact ranks)
    const mark = rc > r0 + 2 && k.weight > 0.05 ? 'carries less' : (exact && rc + 2 < r0 + 1 ? 'carries more' : ''), less = mark === 'carries less';
    const tr = el('tr', { class: 'pick' + (k.index === key ? ' sel' : ''), 'data-key': tokText(k.index), 'data-j': k.index },
      el('td', { class: 'rw' }, rank(r0 + 1)), el('td', { class: 'l' }, tokText(k.index)), el('td', {}, k.index), el('td', { class: 'score' }, fmt(k.score)),
      el('td', { class: 'l weight' }, el('span', { class: 'bar', style: `width:${(80 * k.weight / mw).toFixed(1)}px` }), fmt(k.weight)),
      el('td', { class: 'l contribution' }, el('span', { class: 'bar c', style: `width:${(80 * k.contribution / mc).toFixed(1)}px` }), fmt(k.contribution)),
      el('td', { class: 'rc' + (less ? ' less' : '') }, rank(rc) + (mark ? ' ' + mark : '')));
    tr.onclick = () => { st.key = k.index; lookup(); };
    return tr;
  });
  const kept = (cut ? `top ${r.top} by weight and by contribution (${h.keys.length} of ${h.n_keys} keys; a rank past ${r.top} shows as >${r.top})` : `all ${h.n_keys} keys`)
    + (shown.length < h.keys.length ? `, the ${shown.length} with most weight listed (export JSON for all)` : '');
  $('lookup').replaceChildren(
    el('h2', {}, `${JSON.stringify(tokText(r.query.index))} (token ${r.query.index}) · layer ${st.layer} head ${st.head} (kv head ${h.kv_head})`),
    el('div', { class: 'sub' }, `entropy ${fmt(h.entropy)} nats · ‖output‖ ${fmt(h.output_norm)} · ${h.sink ? `the learned sink takes ${fmt(h.sink)} of the weight · ` : ''}${kept} · a row whose rank by content is far below its rank by weight is marked carries less · click a row to pick that key`),
    el('table', { id: 'keys' }, el('tr', {}, el('th', {}, '#'), el('th', { class: 'l' }, 'key'), el('th', {}, 'idx'), el('th', {}, 'score'),
      el('th', { class: 'l' }, 'weight'), el('th', { class: 'l' }, 'contribution'), el('th', {}, 'rank by content')), ...rows),
    ...experts(r), ...r.notes.map(n => el('div', { class: 'sub' }, '• ' + n)));
  $('keyname').textContent = key === null ? '—' : `${JSON.stringify(tokText(key))} (token ${key})`;
}

// A mixture-of-experts model: the experts the query went to (the record's "experts", every
// sparse layer, as the model routed it), the selected layer's in a line, all of them in a row.
const pairs = x => x.experts.map((e, n) => `${e} (${fmt(x.weights[n])})`).join(', ');
function experts(r) {
  if (!r.experts) return []; // a dense model
  const ls = r.experts.layers, x = ls.find(y => y.layer === st.layer), q = JSON.stringify(tokText(r.query.index));
  const line = el('div', { id: 'experts-line' }, x ? `experts of ${q} in layer ${st.layer}: ${pairs(x)} of ${x.n_experts}`
    : `layer ${st.layer} is dense: every token goes through its one MLP`);
  const cells = ls.map(y => {
    const td = el('td', { class: 'l' + (y.layer === st.layer ? ' sel' : ''), 'data-l': y.layer }, `L${y.layer}: ${pairs(y)}`);
    td.onclick = () => { st.layer = y.layer; $('layer').value = y.layer; lookup(); };
    return td;
  });
  return [el('div', { id: 'experts' }, line,
    el('div', { class: 'sub' }, `its experts (routing weight) in each of the ${ls.length} sparse layers · click one to open that layer`),
    el('table', { id: 'experts-row' }, el('tr', {}, ...cells)))];
}

function drawGrid() {
  const g = st.grid, by = $('gridby').value;
  untip();
  if (!g) { $('grid').replaceChildren(); return; }
  const M = g[by], mx = by === 'entropy' ? Math.max(1e-12, ...M.flat()) : 1;
  const head = el('tr', {}, el('th', {}, 'L\\H'), ...M[0].map((_, h) => el('th', {}, h)));
  const rows = M.map((row, l) => el('tr', {}, el('th', {}, l), ...row.map((x, h) => {
    const td = el('td', { class: 'cell' + (l === st.layer && h === st.head ? ' sel' : ''), 'data-l': l, 'data-h': h });
    td.style.background = by === 'entropy' ? `rgba(44,160,44,${(x / mx).toFixed(3)})` : `rgba(214,39,40,${Math.min(1, x).toFixed(3)})`;
    td.onmousemove = ev => tip(ev, `layer ${l} head ${h}: ${by === 'entropy' ? 'entropy ' + fmt(x) + ' nats' : 'weight ' + fmt(x)}`);
    td.onmouseleave = untip;
    td.onclick = () => { st.layer = l; st.head = h; $('layer').value = l; $('head').value = h; lookup(); };
    return td;
  })));
  const what = by === 'entropy' ? 'entropy of each head\'s row (nats; darker = more spread)'
    : `weight ${JSON.stringify(tokText(g.query))} → ${JSON.stringify(tokText(g.key))}`;
  $('grid').replaceChildren(el('h2', {}, `layers × heads: ${what}`), el('div', { class: 'sub' }, 'click a cell to open that head'), el('table', {}, head, ...rows));
}

function drawHeadView() { // lines from the query to its kept keys; thickness = weight or contribution
  const h = st.rec.layers[0].heads[0], by = $('lineby').value, key = effectiveKey();
  const ks = [...h.keys].sort((a, b) => b[by] - a[by]).slice(0, 40).sort((a, b) => a.index - b.index);
  const mx = Math.max(1e-12, ...ks.map(k => k[by])), row = 18, H = Math.max(row * ks.length, row) + 10, Wd = 460;
  const s = svg('svg', { width: Wd, height: H, id: 'lines' }), qy = H / 2;
  s.append(svg('text', { x: 150, y: qy + 4, 'text-anchor': 'end', fill: '#d62728' }, `${tokText(st.query)} (${st.query})`));
  ks.forEach((k, r) => {
    const y = r * row + 14, w = k[by] / mx;
    const ln = svg('line', { x1: 156, y1: qy, x2: 300, y2: y - 4, stroke: by === 'weight' ? '#4c78a8' : '#f58518', 'stroke-width': (0.5 + 9 * w).toFixed(2), 'stroke-opacity': (0.25 + 0.75 * w).toFixed(2), 'data-j': k.index });
    const tx = svg('text', { x: 306, y, fill: k.index === key ? '#1f77b4' : '#222', 'font-weight': k.index === key ? 'bold' : 'normal' }, `${tokText(k.index)} (${k.index}) ${fmt(k[by])}`);
    tx.style.cursor = 'pointer'; tx.onclick = () => { st.key = k.index; lookup(); };
    s.append(ln, tx);
  });
  $('headview').replaceChildren(el('h2', {}, `head view · layer ${st.layer} head ${st.head} · line thickness = ${by}`),
    el('div', { class: 'sub' }, `the ${ks.length} kept keys with most ${by}, in text order`), s);
}

function drawNeuron() { // the record's Q·K neuron view, numbers as sent
  const V = st.rec.neuron, D = st.rec.neuron_dims, row = 18, lw = 250, bw = 150, mid = lw + bw;
  const mx = Math.max(1e-12, ...D.product.map(Math.abs));
  const h = st.rec.layers[0].heads[0], rk = h.keys.find(k => k.index === V.key.index);
  const s = svg('svg', { width: mid + bw + 80, height: row * D.dims.length + 26, id: 'nbars' });
  s.append(svg('line', { x1: mid, y1: 0, x2: mid, y2: row * D.dims.length + 4, stroke: '#888' }));
  D.dims.forEach((d, r) => {
    const p = D.product[r], w = bw * Math.abs(p) / mx, y = r * row + 2;
    s.append(svg('text', { x: 0, y: y + 12 }, `d ${d}  q ${D.q[r].toFixed(3)}  k ${D.k[r].toFixed(3)}`),
      svg('rect', { class: 'nbar', 'data-d': d, x: p < 0 ? mid - w : mid, y, width: w.toFixed(2), height: row - 5, fill: p < 0 ? '#4c78a8' : '#e45756' }),
      svg('text', { x: p < 0 ? mid + 4 : mid - 4, y: y + 12, 'text-anchor': p < 0 ? 'start' : 'end' }, p.toFixed(3)));
  });
  s.append(svg('text', { x: mid, y: row * D.dims.length + 20, 'text-anchor': 'middle' },
    `q_d·k_d (red +, blue −); share of Σ after ${D.dims.length} dims: ${D.share[D.share.length - 1].toFixed(3)}`));
  const rope = V.rope_dims ? `after RoPE (${V.rope_dims} of ${D.d} dims rotated)` : 'no RoPE';
  $('neuron').replaceChildren(
    el('h2', {}, `Q·K neuron view · layer ${V.layer} head ${V.head} (kv head ${V.kv_head}) · ${JSON.stringify(tokText(V.query.index))} → ${JSON.stringify(tokText(V.key.index))}`),
    el('div', { class: 'sub' }, `d = ${D.d}, q and k ${rope}; top ${D.dims.length} dimensions by |q_d·k_d|`),
    el('div', { class: 'ident' }, 'Σ q_d·k_d = ', el('span', { id: 'ndot' }, D.dot.toPrecision(6)), ' × scale ', el('span', { id: 'nscale' }, D.scale.toPrecision(6)),
      ' = score ', el('span', { id: 'nscore' }, D.score.toPrecision(6)), el('span', { class: 'sub' }, ` (the record's score for this key: ${rk && rk.score !== null ? rk.score.toPrecision(6) : '—'})`)),
    s);
}

// ---- compare: two texts side by side, per-head differences ----------------------------------
async function compare() {
  if (!st.cap) return;
  const line = extra => (st.status ? st.status + ' · ' : '') + extra; // the run's line stays
  showError(''); $('status').textContent = line('comparing…');
  const seq = ++st.cseq;
  try {
    const doc = await api('/api/compare', { model: st.cap.model, a: st.cap.text, b: $('text-b').value, query: st.query });
    if (seq !== st.cseq) return; // a newer compare (another token, text or run) was sent since
    st.cmp = doc; $('compare').hidden = false; drawCompare();
    $('status').textContent = line(`compared in ${doc.server_ms.toFixed(0)} ms`);
  } catch (e) { if (seq === st.cseq) { showError(e.message); $('status').textContent = st.status; } }
}
function drawCompare() {
  const c = st.cmp, box = $('compare');
  if (!c || !$('cmp-on').checked) { box.hidden = true; return; }
  box.hidden = false;
  const hm = c.heads.find(x => x.layer === st.layer && x.head === st.head);
  const tokA = c.tokens[0], tokB = c.tokens[1], txt = (toks, j) => toks[j].text.trim() || toks[j].text;
  const side = (w, toks, label, index) => { // index: the matched keys' positions in this text
    const m = new Map(index.map((j, r) => [j, w[r]])), mx = Math.max(1e-12, ...m.values());
    return el('div', { class: 'cmptext' }, el('b', {}, label + ' '), ...toks.map((t, j) => {
      const x = m.get(j), s = el('span', { class: 'chip' }, txt(toks, j));
      if (x) s.style.background = `rgba(76,120,168,${(0.85 * x / mx).toFixed(3)})`;
      if (j === c.query[label === 'A' ? 0 : 1].index) s.classList.add('q');
      return s;
    }));
  };
  const D = hm.delta_weight, order = hm.index.map((j, r) => r).sort((a, b) => Math.abs(D[b]) - Math.abs(D[a]));
  const rows = order.slice(0, 30).map(r => el('tr', { 'data-key': txt(tokA, hm.index[r]) },
    el('td', { class: 'l' }, txt(tokA, hm.index[r])), el('td', {}, hm.index[r]),
    el('td', { class: 'wa' }, fmt2(hm.weight[0][r])), el('td', { class: 'wb' }, fmt2(hm.weight[1][r])),
    el('td', { class: 'dw' }, (D[r] >= 0 || fmt2(D[r]) === '0.00' ? '+' : '') + fmt2(D[r])),
    el('td', {}, fmt2(hm.contribution[0][r])), el('td', {}, fmt2(hm.contribution[1][r]))));
  const mx = Math.max(1e-12, ...c.moved.flat());
  const grid = el('table', { id: 'cmpgrid' }, el('tr', {}, el('th', {}, 'L\\H'), ...c.moved[0].map((_, h) => el('th', {}, h))),
    ...c.moved.map((row, l) => el('tr', {}, el('th', {}, l), ...row.map((x, h) => {
      const td = el('td', { class: 'cell' + (l === st.layer && h === st.head ? ' sel' : '') });
      td.style.cssText = `width:20px;height:15px;padding:0;border:1px solid #fff;cursor:pointer;background:rgba(148,103,189,${(x / mx).toFixed(3)})`;
      td.onmousemove = ev => tip(ev, `layer ${l} head ${h}: max |Δweight| ${fmt(x)}`); td.onmouseleave = untip;
      td.onclick = () => { st.layer = l; st.head = h; $('layer').value = l; $('head').value = h; lookup(); };
      return td;
    }))));
  box.replaceChildren(el('h2', {}, `compare · ${JSON.stringify(txt(tokA, c.query[0].index))} (token ${c.query[0].index}) in A vs ${JSON.stringify(txt(tokB, c.query[1].index))} (token ${c.query[1].index}) in B · layer ${st.layer} head ${st.head}`),
    ...c.notes.map(n => el('div', { class: 'sub' }, '• ' + n)),
    el('div', { class: 'two' }, side(hm.weight[0], tokA, 'A', hm.index), side(hm.weight[1], tokB, 'B', hm.index_b)),
    el('div', { class: 'two' },
      el('div', {}, el('div', { class: 'sub' }, 'matched keys by |Δweight| (B − A) in this head'),
        el('table', { id: 'cmpkeys' }, el('tr', {}, el('th', { class: 'l' }, 'key'), el('th', {}, 'idx'), el('th', {}, 'weight A'), el('th', {}, 'weight B'), el('th', {}, 'Δweight'), el('th', {}, 'contrib A'), el('th', {}, 'contrib B')), ...rows)),
      el('div', {}, el('div', { class: 'sub' }, 'max |Δweight| per layer × head (click a cell)'), grid)));
}

// ---- export ---------------------------------------------------------------------------------
async function exportAs(format) {
  if (!st.rec) return;
  try {
    const r = await fetch('/api/export', { method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ id: st.cap.id, query: st.query, layer: st.layer, head: st.head, key: effectiveKey(), top: $('all-keys').checked ? 0 : 20, format }) });
    if (!r.ok) throw new Error((await r.json()).error);
    const name = (r.headers.get('Content-Disposition') || '').split('filename="')[1]?.replace('"', '') || `qkv.${format}`;
    const a = el('a', { href: URL.createObjectURL(await r.blob()), download: name });
    document.body.append(a); a.click(); a.remove();
  } catch (e) { showError(e.message); }
}

// ---- wiring ---------------------------------------------------------------------------------
async function init() {
  try {
    const m = await api('/api/models');
    $('model').replaceChildren(...m.models.map(x => el('option', { value: x.name }, x.name + (x.context ? ` (${x.layers}×${x.heads}, ${x.context} tokens)` : ''))));
  } catch (e) { showError(e.message); }
  $('run').onclick = () => run();
  $('text').onkeydown = ev => { if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) run(); };
  $('layer').onchange = () => { st.layer = +$('layer').value; lookup(); };
  $('head').onchange = () => { st.head = +$('head').value; lookup(); };
  $('gridby').onchange = drawGrid;
  $('lineby').onchange = drawHeadView;
  $('all-keys').onchange = lookup;
  $('cmp-on').onchange = () => { if ($('cmp-on').checked && st.cap && !st.cmp) compare(); else drawCompare(); };
  $('cmp-run').onclick = () => { $('cmp-on').checked = true; compare(); };
  $('exp-json').onclick = () => exportAs('json');
  $('exp-png').onclick = () => exportAs('png');
}
init();

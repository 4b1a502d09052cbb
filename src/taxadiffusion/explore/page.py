"""The explorer's one page: HTML, CSS and plain JavaScript, served by the app itself (no CDN, no
framework, no build step), as Python strings so an installed package needs no data files.

Text from the server (taxon names, messages) is only ever set as textContent, never as HTML.
"""

HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>TaxaDiffusion explorer</title><link rel="stylesheet" href="style.css"></head>
<body>
<header><h1>TaxaDiffusion explorer</h1><span id="runinfo">loading&hellip;</span></header>
<main>
<aside id="left">
  <form id="searchform" autocomplete="off">
    <input id="q" type="search" placeholder="Name, binomial, or Genus &gt; new epithet" aria-label="search">
    <button id="searchbtn" type="submit">Search</button>
  </form>
  <div id="searchout"></div>
  <h2>Taxonomy <small>(images per node; <span class="few">few-shot</span> species marked)</small></h2>
  <ul id="tree" class="tree"></ul>
</aside>
<section id="right">
  <div id="selected" class="panel">Pick a taxon in the tree or search for one.</div>
  <form id="settings" class="panel" autocomplete="off">
    <label>images <input id="n" type="number" value="4"></label>
    <label>guidance <select id="guidance"></select></label>
    <label>scale <input id="scale" type="text" inputmode="decimal" size="5"></label>
    <label>guide level <select id="guide_level"></select></label>
    <label>steps <input id="steps" type="number"></label>
    <label>scheduler <select id="scheduler"></select></label>
    <label>seed <input id="seed" type="number" value="0"></label>
    <label>level <select id="level"></select></label>
    <label>max siblings <input id="max_siblings" type="number" value="12"></label>
    <div class="buttons">
      <button id="gen" type="button">Generate</button>
      <button id="traits" type="button">Trait row</button>
      <button id="sibs" type="button">Sibling grid</button>
    </div>
  </form>
  <div id="error" role="alert" hidden></div>
  <div id="results"></div>
</section>
</main>
<script src="app.js"></script>
</body></html>
"""

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1b1b1b; background: #f6f6f3; }
header { background: #24412f; color: #fff; padding: 8px 16px; display: flex; gap: 16px; align-items: baseline; }
header h1 { font-size: 18px; margin: 0; }
main { display: flex; gap: 16px; padding: 12px; align-items: flex-start; }
#left { width: 340px; flex: none; }
#right { flex: 1; min-width: 0; }
.panel { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px; margin-bottom: 10px; }
#searchform { display: flex; gap: 6px; } #q { flex: 1; padding: 4px; }
h2 { font-size: 15px; margin: 14px 0 6px; } h2 small { font-weight: normal; color: #666; }
.tree, .tree ul { list-style: none; padding-left: 14px; margin: 0; } .tree { padding-left: 0; }
.tree li { margin: 1px 0; white-space: nowrap; }
.toggle { width: 20px; border: none; background: none; cursor: pointer; padding: 0; }
.pick { border: none; background: none; cursor: pointer; padding: 0 2px; color: #1a4d8f; font: inherit; }
.pick:hover, .pick.on { text-decoration: underline; background: #e8f0e0; }
.rank, .count { color: #777; font-size: 12px; margin-left: 4px; }
.few { background: #ffe2a8; color: #6b4500; border-radius: 3px; padding: 0 4px; font-size: 11px; margin-left: 4px; }
.unseen { background: #e0d8ff; color: #3b2a86; border-radius: 3px; padding: 0 4px; font-size: 11px; margin-left: 4px; }
#searchout .hit { display: block; text-align: left; }
#searchout .msg { color: #8a1f11; margin: 4px 0; }
#settings { display: flex; flex-wrap: wrap; gap: 8px 14px; align-items: center; }
#settings input[type=number] { width: 70px; } .buttons { display: flex; gap: 8px; width: 100%; }
.buttons button { padding: 6px 14px; font-weight: 600; }
#error { background: #fde8e4; border: 1px solid #e4a598; color: #8a1f11; padding: 8px; border-radius: 6px; margin-bottom: 10px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px; margin-bottom: 12px; }
.card h3 { font-size: 14px; margin: 0 0 6px; } .card.error .status { color: #8a1f11; }
.row { display: flex; gap: 16px; flex-wrap: wrap; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: 12px; color: #555; max-width: 520px; }
figure img { image-rendering: pixelated; border: 1px solid #ccc; max-width: 100%; }
pre.cmd { background: #f0f0ec; padding: 6px; white-space: pre-wrap; word-break: break-all; font-size: 12px; }
progress { width: 240px; } .note { color: #444; font-size: 12px; }
table { border-collapse: collapse; font-size: 12px; margin-top: 6px; } td, th { border: 1px solid #ccc; padding: 2px 6px; }
.crumbs button { margin-right: 2px; }
"""

SCRIPT = r"""
'use strict';
const $ = (id) => document.getElementById(id);
const state = { info: null, node: null };
const SEP = ' > ';

function el(tag, props, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === 'text') e.textContent = v; else if (k === 'cls') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of kids) if (c) e.append(c);
  return e;
}

// Every answer is JSON; a failure carries {"error": message}, shown as it is.
async function api(url, opts) {
  let r;
  try { r = await fetch(url, opts); } catch (e) { throw new Error('the explorer server is not reachable'); }
  const data = await r.json().catch(() => ({ error: 'answer ' + r.status + ' was not JSON' }));
  if (!r.ok) throw new Error(data.error || ('error ' + r.status));
  return data;
}
function showError(msg) { const e = $('error'); e.textContent = msg || ''; e.hidden = !msg; }
const q = encodeURIComponent;

function badges(n) {
  const out = n.unseen ? [] : [el('span', { cls: 'count', text: n.count + ' img' })];
  if (n.few_shot) out.push(el('span', { cls: 'few', text: 'few-shot' }));
  else if (n.few_shot_below) out.push(el('span', { cls: 'few', text: n.few_shot_below + ' few-shot' }));
  if (n.unseen) out.push(el('span', { cls: 'unseen', text: 'unseen' }));
  return out;
}

function treeItem(n) {
  const li = el('li', { 'data-lineage': n.lineage });
  const kids = el('ul', { hidden: '' });
  const tog = el('button', { cls: 'toggle', type: 'button', text: n.children ? '\u25b8' : '\u00b7',
    'aria-label': 'open ' + n.label });
  tog.addEventListener('click', () => toggle(li, tog, kids, n));
  li.append(tog, el('button', { cls: 'pick', type: 'button', text: n.label, onclick: () => select(n.lineage) }),
    el('span', { cls: 'rank', text: n.rank }), ...badges(n), kids);
  return li;
}

async function toggle(li, tog, kids, n) {
  if (!n.children) return;
  if (!kids.hidden) { kids.hidden = true; tog.textContent = '\u25b8'; return; }
  if (!li.dataset.loaded) {
    const d = await api('api/tree?path=' + q(n.lineage));
    kids.replaceChildren(...d.children.map(treeItem)); li.dataset.loaded = '1';
  }
  kids.hidden = false; tog.textContent = '\u25be';
}

// open the tree down to a lineage so a search hit is shown in place
async function reveal(path) {
  for (let i = 1; i < path.length; i++) {
    const li = document.querySelector('#tree li[data-lineage="' + CSS.escape(path.slice(0, i).join(SEP)) + '"]');
    if (!li) return;
    const kids = li.querySelector(':scope > ul');
    if (kids.hidden) li.querySelector(':scope > .toggle').click();
    for (let t = 0; t < 50 && !li.dataset.loaded; t++) await new Promise((r) => setTimeout(r, 20));
  }
  document.querySelectorAll('.pick.on').forEach((b) => b.classList.remove('on'));
  const own = document.querySelector('#tree li[data-lineage="' + CSS.escape(path.join(SEP)) + '"] > .pick');
  if (own) { own.classList.add('on'); own.scrollIntoView({ block: 'nearest' }); }
}

async function search(ev) {
  ev.preventDefault();
  const out = $('searchout'); out.replaceChildren(); showError('');
  try {
    const d = await api('api/search?q=' + q($('q').value));
    if (d.message) out.append(el('div', { cls: 'msg', text: d.message }));
    if (d.total > d.matches.length) out.append(el('div', { cls: 'note', text: 'first ' + d.matches.length + ' of ' + d.total }));
    for (const n of d.matches) out.append(el('button', { cls: 'pick hit', type: 'button', onclick: () => select(n.lineage) },
      el('span', { text: n.label }), el('span', { cls: 'rank', text: n.rank }), ...badges(n)));
    if (d.suggestions.length) {
      out.append(el('div', { cls: 'note', text: 'Did you mean:' }));
      for (const n of d.suggestions) out.append(el('button', { cls: 'pick hit suggestion', type: 'button',
        onclick: () => { $('q').value = n.label; select(n.lineage); } }, el('span', { text: n.label }),
        el('span', { cls: 'rank', text: n.rank })));
    }
  } catch (e) { out.append(el('div', { cls: 'msg', text: e.message })); }
}

async function select(lineage) {
  showError('');
  let n;
  try { n = await api('api/node?taxon=' + q(lineage)); } catch (e) { showError(e.message); return; }
  state.node = n;
  const box = $('selected'); box.replaceChildren();
  const crumbs = el('div', { cls: 'crumbs' });
  n.ancestors.forEach((a, i) => {
    if (i) crumbs.append(' \u203a ');
    crumbs.append(i < n.known_depth ? el('button', { cls: 'pick', type: 'button', text: a.name, onclick: () => select(a.lineage) })
      : el('span', { cls: 'unseen', text: a.name }));
  });
  box.append(el('h3', { id: 'selname', text: n.rank + ': ' + n.label }, ...badges(n)), crumbs);
  if (n.child_rank && !n.unseen) {
    const inp = el('input', { id: 'newname', placeholder: 'new ' + n.child_rank + ' name', size: '18' });
    box.append(el('div', { cls: 'note' }, 'Unseen ' + n.child_rank + ' under ' + n.name + ': ', inp,
      el('button', { id: 'usenew', type: 'button', text: 'Use', onclick: () => inp.value.trim() && select(n.lineage + SEP + inp.value.trim()) })));
  }
  const lv = $('level'); lv.replaceChildren(el('option', { value: '', text: 'its own (' + n.rank + ')' }));
  state.info.ranks.slice(0, n.level).forEach((r) => lv.append(el('option', { value: r, text: r })));
  reveal(n.path);
}

function settings(kind) {
  const v = (id) => $(id).value.trim();
  return { kind, taxon: state.node.lineage, n: v('n'), guidance: v('guidance'), scale: v('scale'),
    guide_level: v('guide_level'), steps: v('steps'), scheduler: v('scheduler'), seed: v('seed'),
    level: v('level'), max_siblings: v('max_siblings') };
}

function figure(url, name, caption, cls) {
  return el('figure', {}, el('img', { cls, src: url, alt: caption }),
    el('figcaption', {}, caption + ' ', el('a', { href: url + '?download=1', download: name, text: 'Download ' + name })));
}

async function submit(kind) {
  showError('');
  if (!state.node) { showError('pick a taxon first (tree or search)'); return; }
  let job;
  try { job = await api('api/jobs', { method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(settings(kind)) }); } catch (e) { showError(e.message); return; }
  const bar = el('progress', { max: '1', value: '0' }), status = el('span', { cls: 'status', text: 'queued' });
  const card = el('div', { cls: 'card', 'data-kind': kind, 'data-job': job.job },
    el('h3', { text: kind + ': ' + job.taxon }), el('div', {}, bar, ' ', status));
  $('results').prepend(card);
  const trainingBox = el('div', {});
  if (kind === 'sample') training(job.taxon, trainingBox);
  for (;;) {
    try { job = await api('api/jobs/' + job.job); } catch (e) { status.textContent = e.message; card.classList.add('error'); return; }
    if (job.state === 'queued') status.textContent = 'queued, ' + job.ahead + ' ahead';
    if (job.state === 'running') { bar.max = job.total || 1; bar.value = job.step; status.textContent = 'step ' + job.step + ' / ' + job.total; }
    if (job.state === 'error') { status.textContent = job.error; card.classList.add('error'); card.dataset.state = 'error'; return; }
    if (job.state === 'done') break;
    await new Promise((r) => setTimeout(r, 200));
  }
  const res = job.result;
  bar.value = bar.max; status.textContent = 'done in ' + job.seconds + ' s';
  card.querySelector('h3').textContent = res.title;
  const row = el('div', { cls: 'row' }, ...res.images.map((im) => figure(im.url, im.name, 'Generated, seed ' + res.seed + '.', 'result')), trainingBox);
  card.append(row, el('div', { cls: 'note', text: res.note }), el('div', { cls: 'note', text: 'Reproduce with:' }),
    el('pre', { cls: 'cmd', text: res.command }));
  for (const t of res.tables) {
    const tb = el('table', {}, el('tr', {}, ...t.columns.map((c) => el('th', { text: c }))));
    for (const r of t.rows) tb.append(el('tr', {}, ...r.map((c) => el('td', { text: String(c) }))));
    card.append(el('div', { cls: 'note', text: t.caption }), tb);
  }
  card.dataset.state = 'done';
}

async function training(taxon, box) {
  try {
    const d = await api('api/training?taxon=' + q(taxon));
    if (d.url) box.append(figure(d.url, 'training.png', 'Training images: ' + d.shown + ' of ' + d.count + (d.message ? ' (' + d.message + ')' : ''), 'training'));
    else box.append(el('div', { cls: 'note', text: d.message || 'no training images' }));
  } catch (e) { box.append(el('div', { cls: 'note', text: e.message })); }
}

async function start() {
  const info = state.info = await api('api/info');
  const s = Object.entries(info.summary).map(([r, k]) => k + ' ' + r).join(', ');
  $('runinfo').textContent = info.run + ' \u2014 ' + s + ' \u2014 ' + info.few_shot_species + ' few-shot species \u2014 ' + info.device;
  const d = info.defaults;
  $('guidance').replaceChildren(...info.guidance.map((g) => el('option', { value: g, text: g })));
  $('scheduler').replaceChildren(...info.schedulers.map((g) => el('option', { value: g, text: g })));
  $('guide_level').replaceChildren(...info.ranks.slice(0, -1).map((r, i) => el('option', { value: String(i), text: i + ' ' + r })));
  $('guidance').value = d.guidance; $('scheduler').value = d.scheduler; $('guide_level').value = String(d.guide_level);
  $('scale').value = d.scale; $('steps').value = d.steps;
  $('level').replaceChildren(el('option', { value: '', text: 'its own' }));
  $('n').title = '1 to ' + info.limits.n.sample + ' (grids: ' + info.limits.n.traits + ')';
  const top = await api('api/tree');
  $('tree').replaceChildren(...top.children.map(treeItem));
}

$('searchform').addEventListener('submit', search);
$('gen').addEventListener('click', () => submit('sample'));
$('traits').addEventListener('click', () => submit('traits'));
$('sibs').addEventListener('click', () => submit('siblings'));
start().catch((e) => showError(e.message));
"""
